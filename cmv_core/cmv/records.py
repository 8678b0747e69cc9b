"""Pushshift record files: told from a Cornell dump by content, joined into thread lines.

Pushshift exports hold submissions and comments as separate Reddit API records (one JSON
object a line), joined by `link_id`. They are told from a Cornell dump by content, grouped
here into one Cornell-format thread line per submission, and cleaned by the same code
(docs/DATA.md, "Files users have").
"""

from __future__ import annotations

import sqlite3
import zlib
from collections.abc import Iterator
from typing import Any

import orjson

from cmv_core import storage
from cmv_core.cmv.dump import Line
from cmv_core.cmv.threads import LineRejected, as_float, thread_id_of

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
    return as_float(obj.get("retrieved_on", obj.get("retrieved_utc")))


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
                    as_float(obj.get("created_utc")),
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
