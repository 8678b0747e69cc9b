"""Read the CMV dump: stream lines, parse threads, rebuild comment trees, clean text.

The line format and the cleaning rules are described in CMV_DATA.md. Reading
is streaming (one line = one thread is the unit of memory); parsing and tree
building are pure functions so they can be tested without files.
"""

from __future__ import annotations

import html
import operator
import re
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from cmv_core import storage
from cmv_core.cmv.deltas import Comment, has_delta_token, might_contain_delta

# Thread files inside an input directory. Tan et al.'s archive also holds
# pair_task/ and op_task/ files in another line format: those are not threads.
# Cornell thread files; Pushshift's subreddit dumps (changemyview_submissions.zst) and monthly ones (RS_2015-01.zst)
_THREAD_FILE = re.compile(
    r"\.(?:jsonlist|jsonl|json)(?:\.gz|\.bz2|\.zst)?$"
    r"|(?:_submissions|_comments|(?:^|/)R[SC]_\d{4}-\d{2})\.zst$"
)
_NOT_THREADS = re.compile(r"(?:^|/)(?:pair_task|op_task)/|_pair_data\.|_op_data\.")


# --- inputs -----------------------------------------------------------------------


def _is_dir(uri: str) -> bool:
    if uri.endswith("/"):
        return True
    if storage.is_s3(uri):
        return not storage.exists(uri)  # a prefix, not an object
    return storage.local_path(uri).is_dir()


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files to read, in order: each input as given; a directory (or prefix) becomes
    its thread files (`*.jsonlist`, `*.jsonl`, `*.json`, optionally `.gz`/`.bz2`/`.zst`, and
    Pushshift's `*_submissions.zst`, `*_comments.zst`, `RS_YYYY-MM.zst`, `RC_YYYY-MM.zst`),
    sorted, skipping Tan et al.'s pair_task/op_task files."""
    files: list[str] = []
    for uri in inputs:
        if not _is_dir(uri):
            files.append(uri)
            continue
        found = [
            storage.join(uri, rel)
            for rel in storage.list_files(uri)
            if _THREAD_FILE.search(rel) and not _NOT_THREADS.search(rel)
        ]
        if not found:
            raise FileNotFoundError(
                f"no thread files (*.jsonlist[.gz|.bz2|.zst], *.jsonl..., *_comments.zst) under {uri}"
            )
        files.extend(found)
    return files


@dataclass(slots=True)
class Line:
    file: str
    number: int  # 1-based
    raw: bytes
    error: str | None = None  # the stream itself broke here (truncated .gz/.bz2)


def iter_lines(files: Iterable[str]) -> Iterator[Line]:
    """Every line of every file, streamed. A compressed stream that ends early or is
    corrupt yields one `Line` with `error` set and reading goes on with the next file
    (a file that cannot be opened at all is an error, raised)."""
    for uri in files:
        number = 0
        with storage.open_read(uri, "rb") as f:
            try:
                for raw in f:
                    number += 1
                    yield Line(uri, number, raw)
            except (EOFError, OSError, zlib.error) as e:
                yield Line(uri, number + 1, b"", error=f"{type(e).__name__}: {e}")


# --- parsing ----------------------------------------------------------------------


class LineRejected(ValueError):
    """A line that cannot be used as a thread; `reason` is a stable stats key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_line(raw: bytes) -> dict[str, Any]:
    """JSON-decode one dump line into a submission dict, or raise LineRejected."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise LineRejected("invalid_json", str(e)) from None
    if not isinstance(obj, dict):
        raise LineRejected("not_an_object", type(obj).__name__)
    return obj


def thread_id_of(sub: dict[str, Any]) -> str:
    tid = sub.get("id")
    if isinstance(tid, str) and tid:
        return tid
    name = sub.get("name")
    if isinstance(name, str) and name.startswith("t3_") and len(name) > 3:
        return name[3:]
    raise LineRejected("missing_id", "submission has neither `id` nor a `t3_` name")


def _float(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _str(x: Any) -> str:
    return x if isinstance(x, str) else ""


# --- text -------------------------------------------------------------------------


# An entity left after one unescape: the text was escaped twice (`&amp;#8710;` -> `&#8710;`).
_ENTITY_LEFT = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|amp|lt|gt|quot|apos|nbsp);")


def unescape(text: str) -> str:
    """Undo the dump's HTML escaping (`&gt;` `&amp;` `&lt;` `&#8710;`), and a second layer where
    the text was escaped twice: `&amp;#8710;` ends as `∆`, not `&#8710;` (seen in real comments).

    (html.unescape measured faster here than chains of str.replace guarded to
    give the same result.)
    """
    if "&" not in text:
        return text
    text = html.unescape(text)
    if "&" in text and _ENTITY_LEFT.search(text):
        text = html.unescape(text)
    return text


_FOOTNOTE = re.compile(r"^.*Hello,? users of CMV! This is a footnote from your moderators", re.M | re.I)
_TRAILING_JUNK = re.compile(r"(?:\n[ \t]*(?:(?:>|_{3,}|-{3,}|\*{3,})[ \t]*)?)+\Z")


def remove_footnote(text: str) -> str:
    """Cut the moderators' footnote (from its line to the end of the post) and the
    rule / empty quote lines that lead into it."""
    if "footnote from your moderators" not in text:  # skip the regex for most posts
        return text
    m = _FOOTNOTE.search(text)
    if m is None:
        return text
    head = text[: m.start()]
    return _TRAILING_JUNK.sub("", "\n" + head)[1:].rstrip()


_BLANKS = re.compile(r"\n{3,}")


# (no two adjacent quantifiers share characters: a line of spaces after "Edit" stays linear)
_EDIT_START = re.compile(r"^[\s*_#~]*(?:edit|update)[\s#\d]*(?:[*_]+\s*)?[:\-\u2013\u2014]", re.I)
_ANNOUNCES = re.compile(r"delta|changed my (?:view|mind)|view (?:has been |was |is |got )?changed|\bcmv'?d\b", re.I)


def remove_delta_edits(text: str) -> str:
    """Drop "EDIT: ..." / "Update 2: ..." blocks that announce a delta or a changed view.

    A block runs from a line starting with the edit marker to the next blank
    line. Such edits were written after the view changed, so they leak the
    outcome into a prompt. Other edits ("EDIT: formatting") stay.
    """
    low = text.lower()
    if ("edit" not in low and "update" not in low) or (not _ANNOUNCES.search(text) and not has_delta_token(text)):
        return text
    lines = text.split("\n")
    keep: list[str] = []
    i = 0
    while i < len(lines):
        if _EDIT_START.match(lines[i]):
            j = i
            while j < len(lines) and lines[j].strip():
                j += 1
            block = "\n".join(lines[i:j])
            if _ANNOUNCES.search(block) or has_delta_token(block):
                i = j
                continue
        keep.append(lines[i])
        i += 1
    return _BLANKS.sub("\n\n", "\n".join(keep)).strip()


def clean_op_text(selftext: str, *, strip_delta_edits: bool) -> str:
    text = remove_footnote(unescape(selftext))
    if strip_delta_edits:
        text = remove_delta_edits(text)
    return text.strip()


# --- trees ------------------------------------------------------------------------


@dataclass(slots=True)
class Skipped:
    """A comment object left out of the tree, and why (a stable stats key)."""

    reason: str
    raw: Any
    comment_id: str | None = None


@dataclass(slots=True)
class Thread:
    thread_id: str
    title: str
    op_author: str
    op_text: str
    created_utc: float | None
    comments: list[Comment]  # real, rooted, chronological; bodies unescaped
    skipped: list[Skipped] = field(default_factory=list)
    more_placeholders: int = 0
    continue_stubs: int = 0
    # comments whose body passed deltas.might_contain_delta (read once, here)
    delta_candidates: list[Comment] = field(default_factory=list)


# Skip reasons that are expected in a healthy dump (counted, not written to rejects).
BENIGN_SKIPS = frozenset({"more_placeholder", "continue_stub"})


def build_thread(sub: dict[str, Any], *, strip_delta_edits: bool = True) -> Thread:
    """Rebuild one thread from a parsed submission: real comments only, each reachable
    from the submission through `parent_id`, sorted by `created_utc` (stable).

    "more" placeholders (no body, a `children` list) and "_" stubs are counted and
    dropped; a placeholder never replaces a real comment with the same id. A
    comment whose parent is absent is dropped with its whole subtree.

    This loop runs for every comment object of the dump, so the well-formed case
    is a straight line of dict lookups; anything unusual takes `_odd_comment`.
    """
    thread_id = thread_id_of(sub)
    raw_comments = sub.get("comments")
    if raw_comments is None:
        raw_comments = []
    if type(raw_comments) is not list:
        raise LineRejected("bad_comments", f"`comments` is {type(raw_comments).__name__}, not a list")

    skipped: list[Skipped] = []
    counts = {"more_placeholder": 0, "continue_stub": 0}
    by_id: dict[str, Comment] = {}
    root = "t3_" + thread_id
    pending: dict[str, None] = {}  # ids not known to reach the submission yet (ordered set)
    candidates: list[Comment] = []
    floats = True  # every created_utc a float: sort with a C key function
    for c in raw_comments:
        try:
            cid = c["id"]
            parent_id = c["parent_id"]
            body = c["body"]
        except (KeyError, TypeError):
            fields = _odd_comment(c, skipped, counts)
            if fields is None:
                continue
            cid, parent_id, body = fields
        if type(cid) is not str or type(parent_id) is not str or not cid or not parent_id or cid == "_":
            fields = _odd_comment(c, skipped, counts)
            if fields is None:
                continue
            cid, parent_id, body = fields
        if cid in by_id:
            skipped.append(Skipped("duplicate_comment", c, cid))
            continue
        if type(body) is not str:
            body = ""
        elif "&" in body:
            body = unescape(body)
        t = c.get("created_utc")
        if type(t) is not float:
            t = _float(t)
            floats = floats and t is not None
        # Rooted already when listed after a rooted parent (the usual order); the
        # others wait in `pending` (usually empty) and are settled by _rooted.
        if parent_id != root and (
            parent_id[3:] not in by_id or not parent_id.startswith("t1_") or (pending and parent_id[3:] in pending)
        ):
            pending[cid] = None
        comment: Comment = {
            "id": cid,
            "parent_id": parent_id,
            "author": c.get("author") or "[deleted]",
            "body": body,
            "created_utc": t,
        }
        by_id[cid] = comment
        # one-character tests first (a memchr each); almost every body stops here
        if ("\u2206" in body or "\u0394" in body or "#" in body or "!" in body) and might_contain_delta(body):
            candidates.append(comment)

    comments = _rooted(by_id, root, list(pending), skipped, raw_comments) if pending else list(by_id.values())
    chrono = _by_time if floats else _chrono_key
    comments.sort(key=chrono)
    candidates.sort(key=chrono)  # stable, like the sort above: same relative order

    return Thread(
        thread_id=thread_id,
        title=unescape(_str(sub.get("title"))),
        op_author=_str(sub.get("author")) or "[deleted]",
        op_text=clean_op_text(_str(sub.get("selftext")), strip_delta_edits=strip_delta_edits),
        created_utc=_float(sub.get("created_utc")),
        comments=comments,
        skipped=skipped,
        more_placeholders=counts["more_placeholder"],
        continue_stubs=counts["continue_stub"],
        delta_candidates=candidates,
    )


def _odd_comment(c: Any, skipped: list[Skipped], counts: dict[str, int]) -> tuple[str, str, Any] | None:
    """Classify a comment object the fast path could not take: placeholders and stubs
    are counted, bad objects recorded in `skipped`; a real comment missing only
    its body comes back as (id, parent_id, "")."""
    if not isinstance(c, dict):
        skipped.append(Skipped("comment_not_an_object", c))
        return None
    cid = c.get("id")
    if cid == "_":
        counts["continue_stub"] += 1
        return None
    if "body" not in c and ("children" in c or c.get("kind") == "more"):
        counts["more_placeholder"] += 1
        return None
    if not isinstance(cid, str) or not cid:
        skipped.append(Skipped("comment_missing_id", c))
        return None
    parent_id = c.get("parent_id")
    if not isinstance(parent_id, str) or not parent_id:
        skipped.append(Skipped("comment_missing_parent_id", c, cid))
        return None
    return cid, parent_id, c.get("body")


def _rooted(
    by_id: dict[str, Comment], root: str, pending: list[str], skipped: list[Skipped], raw_comments: list[Any]
) -> list[Comment]:
    """The comments reachable from the submission; the others go to `skipped`.

    All comments but the `pending` ones were settled while reading (listed after
    a rooted parent). The pending ones walk up their chain once each (memoised,
    so linear overall) and get a reason when they are not rooted:
    `parent_missing` where the chain breaks, `parent_cycle`, and
    `ancestor_missing` for everything below.
    """
    good = by_id.keys() - set(pending)
    verdicts: dict[str, str] = {}  # id -> reason, for comments that are not rooted
    for cid in pending:
        chain: list[str] = []
        on_chain: set[str] = set()
        cur = cid
        verdict: str | None
        while True:
            if cur in good:
                verdict = None
                break
            if cur in verdicts:
                verdict = "ancestor_missing"
                break
            chain.append(cur)
            on_chain.add(cur)
            parent = by_id[cur]["parent_id"]
            if parent == root:
                verdict = None
                break
            pid = parent[3:] if parent.startswith("t1_") else None
            if pid is None or pid not in by_id:
                verdict = "parent_missing"
                break
            if pid in on_chain:
                verdict = "parent_cycle"
                break
            cur = pid
        for i, x in enumerate(reversed(chain)):
            if verdict is None:
                good.add(x)
            else:
                # the comment where the chain broke gets the reason; its descendants inherit
                verdicts[x] = verdict if i == 0 else "ancestor_missing"

    if verdicts:  # rare: find the dump's own objects for the rejects file
        raw_of: dict[str, Any] = {}
        for c in raw_comments:
            if isinstance(c, dict) and c.get("id") in verdicts and ("body" in c or "children" not in c):
                raw_of.setdefault(c["id"], c)
    comments = []
    for cid, c in by_id.items():
        if cid in good:
            comments.append(c)
        else:
            skipped.append(Skipped(verdicts[cid], raw_of.get(cid, c), cid))
    return comments


_by_time = operator.itemgetter("created_utc")


def _chrono_key(c: Comment) -> float:
    t = c["created_utc"]
    return float("inf") if t is None else t


# --- Pushshift record files -------------------------------------------------------
#
# Pushshift exports hold submissions and comments as separate Reddit API records (one JSON
# object a line), joined by `link_id`. They are told from a Cornell dump by content, grouped
# here into one Cornell-format thread line per submission, and cleaned by the same code.

SNIFF_LINES = 1000  # lines read at most to tell a record file from a thread dump


def record_kind(obj: dict[str, Any]) -> str:
    """ "thread" (a Cornell line: a submission with its `comments`), "comment" (a Pushshift
    comment record: `body` and `link_id`), "submission" (a Pushshift submission: `title`),
    or "unknown"."""
    if "comments" in obj:
        return "thread"
    if "body" in obj and "link_id" in obj:
        return "comment"
    if "title" in obj:
        return "submission"
    return "unknown"


def sniff_file(uri: str) -> str:
    """ "cornell" as soon as one of the file's first SNIFF_LINES lines is a thread (has `comments`;
    a dump's thread without comments may lack the key, so one submission-like line decides
    nothing); else "pushshift" when one is a submission or comment record; else "cornell" (the
    thread path reports the lines, or the broken stream, as before)."""
    records = False
    try:
        with storage.open_read(uri, "rb") as f:
            for i, raw in enumerate(f):
                if i >= SNIFF_LINES:
                    break
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    kind = record_kind(obj)
                    if kind == "thread":
                        return "cornell"
                    records = records or kind != "unknown"
    except (EOFError, OSError, zlib.error):
        pass
    return "pushshift" if records else "cornell"


def _retrieved(obj: dict[str, Any]) -> float | None:
    return _float(obj.get("retrieved_on", obj.get("retrieved_utc")))


class RecordStore:
    """Pushshift records in an sqlite file: submissions and comments deduplicated by id, comments
    grouped by `link_id`. On disk, not in memory: the full subreddit is ~1.5M comment records, and
    only the raw line (bytes, not a parsed dict) and a few keys are kept per record.

    Duplicates: the record with the later `retrieved_on` is kept; where either lacks it, the one
    read later. A submission keeps the place of its first appearance (threads come out in that order).
    """

    def __init__(self, path: str):
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-65536"):
            self.db.execute("PRAGMA " + pragma)
        self.db.execute(
            "CREATE TABLE subs (seq INTEGER PRIMARY KEY, link TEXT UNIQUE, retrieved REAL,"
            " file INTEGER, line INTEGER, raw BLOB)"
        )
        # id NULL (a comment without a usable id): kept, never merged; build_thread reports it
        self.db.execute(
            "CREATE TABLE comments (id TEXT UNIQUE, link TEXT, t REAL, retrieved REAL,"
            " file INTEGER, line INTEGER, raw BLOB)"
        )
        self.db.execute("BEGIN")
        self.submission_records = 0
        self.comment_records = 0
        self.threads = 0  # submissions kept, known after finish_loading

    def add(self, obj: dict[str, Any], raw: bytes, file: int, line: int) -> tuple[str, str] | None:
        """Store one parsed record; (reason, detail) when it cannot be used."""
        kind = record_kind(obj)
        if kind == "comment":
            link = obj["link_id"]
            if type(link) is not str or not link.startswith("t3_") or len(link) <= 3:
                return "bad_link_id", f"`link_id` is {link!r}, not t3_<submission id>"
            cid = obj.get("id")
            self.db.execute(
                "INSERT INTO comments VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET link=excluded.link,"
                " t=excluded.t, retrieved=excluded.retrieved, file=excluded.file, line=excluded.line,"
                " raw=excluded.raw WHERE excluded.retrieved IS NULL OR comments.retrieved IS NULL"
                " OR excluded.retrieved >= comments.retrieved",
                (
                    cid if type(cid) is str and cid else None,
                    link,
                    _float(obj.get("created_utc")),
                    _retrieved(obj),
                    file,
                    line,
                    raw.strip(),
                ),
            )
            self.comment_records += 1
            return None
        if kind == "submission":
            try:
                link = "t3_" + thread_id_of(obj)
            except LineRejected as exc:
                return exc.reason, exc.detail
            self.db.execute(
                "INSERT INTO subs(link, retrieved, file, line, raw) VALUES (?,?,?,?,?) ON CONFLICT(link) DO UPDATE"
                " SET retrieved=excluded.retrieved, file=excluded.file, line=excluded.line, raw=excluded.raw"
                " WHERE excluded.retrieved IS NULL OR subs.retrieved IS NULL OR excluded.retrieved >= subs.retrieved",
                (link, _retrieved(obj), file, line, raw.strip()),
            )
            self.submission_records += 1
            return None
        if kind == "thread":
            return "thread_in_record_file", "a Cornell thread line (with `comments`) among Pushshift records"
        return "unknown_record", "neither a submission (`title`) nor a comment (`body` and `link_id`)"

    def finish_loading(self) -> dict[str, int]:
        """Index the comments by thread; the counts for stats.json."""
        self.db.execute("COMMIT")
        self.db.execute("CREATE INDEX comments_by_link ON comments (link)")
        n_subs = self.db.execute("SELECT COUNT(*) FROM subs").fetchone()[0]
        n_comments = self.db.execute("SELECT COUNT(*) FROM comments").fetchone()[0]
        self.threads = n_subs
        return {
            "submissions": self.submission_records,
            "comments": self.comment_records,
            "duplicate_submissions": self.submission_records - n_subs,
            "duplicate_comments": self.comment_records - n_comments,
        }

    def orphans(self) -> Iterator[tuple[int, int, str, str | None, bytes]]:
        """(file, line, link_id, id, raw) of each comment whose submission is not in the store, in input order."""
        yield from self.db.execute(
            "SELECT file, line, link, id, raw FROM comments c WHERE NOT EXISTS"
            " (SELECT 1 FROM subs s WHERE s.link = c.link) ORDER BY file, line"
        )

    def thread_lines(self, files: list[str]) -> Iterator[Line]:
        """One Cornell-format thread line per submission, in order of first appearance, located at the
        submission record. Comments are listed by time, then by id in base-36 order (Reddit's creation
        order), so the output does not depend on the order of the records or of the files."""
        subs = self.db.cursor()
        for link, file, line, raw in subs.execute("SELECT link, file, line, raw FROM subs ORDER BY seq"):
            comments = self.db.execute(
                "SELECT raw FROM comments WHERE link = ? ORDER BY t IS NULL, t, length(id), id", (link,)
            )
            # spliced, not re-encoded: the record is a JSON object without `comments` (checked on load)
            body = b",".join(r for (r,) in comments)
            yield Line(files[file], line, raw[:-1] + b',"comments":[' + body + b"]}")

    def locate(self, comment_id: str | None) -> tuple[int, int] | None:
        """(file, line) of the comment record kept for an id."""
        if comment_id is None:
            return None
        return self.db.execute("SELECT file, line FROM comments WHERE id = ?", (comment_id,)).fetchone()

    def close(self) -> None:
        self.db.close()
