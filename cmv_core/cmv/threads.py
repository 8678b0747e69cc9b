"""Parse a dump line into a submission and rebuild its comment tree.

The line format and the tree rules are docs/DATA.md's "One line = one thread". Parsing and tree
building are pure functions over one line, so they can be tested without files.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import orjson

from cmv_core.cmv.deltas import Comment, might_contain_delta
from cmv_core.cmv.text import clean_op_text, unescape

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


def as_float(x: Any) -> float | None:
    """A time or number as the dump writes it: a float, an int or a string of digits (Pushshift); else None."""
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
    """
    thread_id = thread_id_of(sub)
    raw_comments = _comment_objects(sub)
    root = "t3_" + thread_id
    skipped: list[Skipped] = []
    counts = {"more_placeholder": 0, "continue_stub": 0}
    by_id, pending, candidates, floats = _read_comments(raw_comments, root, skipped, counts)

    comments = _rooted(by_id, root, pending, skipped, raw_comments) if pending else list(by_id.values())
    chrono = _by_time if floats else _chrono_key
    comments.sort(key=chrono)
    candidates.sort(key=chrono)  # stable, like the sort above: same relative order

    return Thread(
        thread_id=thread_id,
        title=unescape(_str(sub.get("title"))),
        op_author=_str(sub.get("author")) or "[deleted]",
        op_text=clean_op_text(_str(sub.get("selftext")), strip_delta_edits=strip_delta_edits),
        created_utc=as_float(sub.get("created_utc")),
        comments=comments,
        skipped=skipped,
        more_placeholders=counts["more_placeholder"],
        continue_stubs=counts["continue_stub"],
        delta_candidates=candidates,
    )


def _read_comments(
    raw_comments: list[Any], root: str, skipped: list[Skipped], counts: dict[str, int]
) -> tuple[dict[str, Comment], list[str], list[Comment], bool]:
    """One pass over a thread's comment objects: (real comments by id, in listed order; the ids not
    known to reach the submission `root` yet; the delta candidates; whether every created_utc is a
    float). Objects left out go to `skipped` or `counts` (_odd_comment).

    This loop runs for every comment object of the dump, so the well-formed case
    is a straight line of dict lookups; anything unusual takes `_odd_comment`.
    """
    by_id: dict[str, Comment] = {}
    pending: dict[str, None] = {}  # ids not known to reach the submission yet (ordered set)
    candidates: list[Comment] = []
    floats = True  # every created_utc a float: sort with a C key function
    for c in raw_comments:
        try:
            cid = c["id"]
            parent_id = c["parent_id"]
            body = c["body"]
        except (KeyError, TypeError):
            cid = None  # not the usual shape: the test below hands it to _odd_comment
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
            t = as_float(t)
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
    return by_id, list(pending), candidates, floats


def _comment_objects(sub: dict[str, Any]) -> list[Any]:
    """The submission's `comments` list (none: empty), or LineRejected when it is not a list."""
    raw_comments = sub.get("comments")
    if raw_comments is None:
        return []
    if type(raw_comments) is not list:
        raise LineRejected("bad_comments", f"`comments` is {type(raw_comments).__name__}, not a list")
    return raw_comments


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
