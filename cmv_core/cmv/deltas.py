"""The delta rules of docs/DATA.md, as pure functions over one rebuilt thread.

Everything here works on comments in the clean stage's output schema
(``id``, ``parent_id``, ``author``, ``body``, ``created_utc``; bodies already
HTML-unescaped), so the format stage can reuse the helpers on
``conversations.jsonl.gz`` rows without touching the raw dump.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

DELTABOT = "deltabot"  # compared lower-case: the account is "DeltaBot"
DELETED = frozenset({"[deleted]", "[removed]"})

# `&#8710;` is what users typed to get ∆ on Reddit; the dump escapes the `&`,
# so after one unescape it can still read `&#8710;`. Both spellings count.
_TOKENS_EXACT = ("\u2206", "\u0394", "&#8710;", "&amp;#8710;")
_BANG_DELTA = "!delta"  # any case
_QUOTE_LINE = re.compile(r"^[ \t]*(?:>|&gt;)")
_CODE_LINE = re.compile(r"^(?: {4}|\t)")
_CODE_SPAN = re.compile(r"(`+).*?\1")
# "delta awarded to" (2014-2016 and DB3) and "point awarded to" (the earliest DeltaBot, 2013:
# "Confirmed - 1 point awarded to /u/NAME").
_AWARDED = re.compile(r"(?:delta|point) awarded to\s+(?:/?u/)?([A-Za-z0-9_\-\\]+)", re.IGNORECASE)
# A DeltaBot reply that says the delta was rejected or taken back confirms nothing,
# even when it names the user ("The delta awarded to /u/NAME has been removed.").
_NOT_CONFIRMED = re.compile(r"\brejected\b|has been removed|\bcan(?:not|'t) award\b|\balready awarded\b", re.IGNORECASE)
_DB3_PARAMS = re.compile(r"DB3PARAMSSTART.*?(?:DB3PARAMSEND|\Z)", re.DOTALL)


class Comment(TypedDict):
    id: str
    parent_id: str
    author: str
    body: str
    created_utc: float | None


class Branch(TypedDict):
    recipient: str
    comment_ids: list[str]


@dataclass(frozen=True, slots=True)
class Delta:
    awarding_comment_id: str
    awarder: str
    rewarded_comment_id: str
    recipient: str
    from_op: bool
    confirmed: bool
    # DeltaBot answered the delta comment but did not confirm it (rejections such
    # as "You have already awarded..."). Counted in stats, not in the schema.
    rejected_by_deltabot: bool = False

    def to_record(self) -> dict:
        """The clean stage's `deltas` entry (docs/ARCHITECTURE.md schema, nothing more)."""
        return {
            "awarding_comment_id": self.awarding_comment_id,
            "awarder": self.awarder,
            "rewarded_comment_id": self.rewarded_comment_id,
            "recipient": self.recipient,
            "from_op": self.from_op,
            "confirmed": self.confirmed,
        }


# --- token detection -------------------------------------------------------------


def might_contain_delta(text: str) -> bool:
    """Cheap pre-filter: False means no delta token anywhere (quotes and code included).

    Runs on every comment of the dump. Substring tests run at memory speed (and
    a non-ASCII needle in an ASCII string is rejected without scanning); the
    per-line rule below is only paid for the few comments that pass this.
    """
    # one-character needles are a memchr; the longer test only runs when they hit
    return (
        "\u2206" in text
        or "\u0394" in text
        or ("#" in text and "#8710;" in text)  # `&#8710;` and `&amp;#8710;`
        or ("!" in text and _BANG_DELTA in text.lower())
    )


def _line_has_token(line: str) -> bool:
    if any(tok in line for tok in _TOKENS_EXACT):
        return True
    return _BANG_DELTA in line.lower()


def has_delta_token(text: str) -> bool:
    """True when a delta token occurs outside quoted lines and outside code.

    Quoted lines start with `>` or `&gt;` after optional spaces; code is a line
    indented by 4+ spaces (or a tab) and any backtick span.
    """
    if not might_contain_delta(text):
        return False
    for line in text.splitlines():
        if _QUOTE_LINE.match(line) or _CODE_LINE.match(line):
            continue
        if "`" in line:
            line = _CODE_SPAN.sub(" ", line)
        if _line_has_token(line):
            return True
    return False


# --- people ------------------------------------------------------------------------


def is_deltabot(author: str) -> bool:
    return author.lower() == DELTABOT


def is_deleted(comment: Mapping) -> bool:
    """Deleted or removed: by author or by body. Such comments stay in the tree only."""
    return comment["author"] in DELETED or comment["body"].strip() in DELETED


def op_known(op_author: str | None) -> bool:
    return bool(op_author) and op_author not in DELETED


def _eligible_person(comment: Mapping) -> bool:
    """Can this comment's author award or receive a delta at all?"""
    return not is_deleted(comment) and not is_deltabot(comment["author"])


# --- DeltaBot ---------------------------------------------------------------------


def confirmed_recipient(deltabot_text: str) -> str | None:
    """The user a DeltaBot reply confirms a delta for, or None (rejections, other text).

    Handles the 2013 wordings ("Confirmed - 1 delta awarded to /u/NAME", "Confirmed - 1 point
    awarded to /u/NAME"), the old format ("Confirmed: 1 delta awarded to /u/NAME. ^[[History]...")
    and DB3's ("... awarded to /u/NAME ([1∆](/r/changemyview/wiki/user/NAME))."
    with an optional hidden DB3PARAMS block). Markdown escapes in names
    (`some\\_name`) are undone.
    """
    if "DB3PARAMSSTART" in deltabot_text:  # hidden machine-readable block: ignored
        deltabot_text = _DB3_PARAMS.sub(" ", deltabot_text)
    m = _AWARDED.search(deltabot_text)
    if m is None or _NOT_CONFIRMED.search(deltabot_text):
        return None
    return m.group(1).replace("\\", "")


def _names_match(a: str, b: str) -> bool:
    strip = lambda s: s.lower().removeprefix("/").removeprefix("u/")  # noqa: E731
    return strip(a) == strip(b)


# --- deltas -----------------------------------------------------------------------


def find_deltas(
    comments: Sequence[Comment], op_author: str | None, candidates: Iterable[Comment] | None = None
) -> list[Delta]:
    """Every delta in one thread, in the order of `comments`.

    A delta is a comment with a token (outside quotes/code) that replies to a
    comment (not the submission) by someone else; neither side deleted or
    DeltaBot. It is from the OP when the awarder is the known OP (so an OP
    delta never rewards the OP's own comment). Confirmed when a direct DeltaBot
    reply says "delta awarded to" the recipient.

    `candidates`: the comments whose body passed `might_contain_delta`, in the
    order of `comments`, when the caller already looked (threads.build_thread
    does); candidates that are not in `comments` are ignored.
    """
    # Almost no comment has a token: filter first, index the thread only if needed.
    if candidates is None:
        candidates = [c for c in comments if might_contain_delta(c["body"])]
    candidates = list(candidates)
    if not candidates:
        return []
    by_id = {c["id"]: c for c in comments}
    awards: list[tuple[Comment, Comment]] = []
    for c in candidates:
        if by_id.get(c["id"]) is not c:  # not in this tree (e.g. an orphan)
            continue
        if not c["parent_id"].startswith("t1_") or not _eligible_person(c) or not has_delta_token(c["body"]):
            continue
        parent = by_id.get(c["parent_id"][3:])
        if parent is None or not _eligible_person(parent):
            continue
        if parent["author"] == c["author"]:  # nobody awards themselves
            continue
        # an OP answering DeltaBot never reaches here (parent is DeltaBot)
        awards.append((c, parent))
    if not awards:
        return []

    award_names = {"t1_" + c["id"] for c, _ in awards}
    deltabot_replies: dict[str, list[str]] = {}
    for c in comments:
        if c["parent_id"] in award_names and is_deltabot(c["author"]):
            deltabot_replies.setdefault(c["parent_id"][3:], []).append(c["body"])

    known_op = op_author if op_known(op_author) else None
    found: list[Delta] = []
    for c, parent in awards:
        replies = deltabot_replies.get(c["id"], [])
        names = [confirmed_recipient(t) for t in replies]
        confirmed = any(n is not None and _names_match(n, parent["author"]) for n in names)
        found.append(
            Delta(
                awarding_comment_id=c["id"],
                awarder=c["author"],
                rewarded_comment_id=parent["id"],
                recipient=parent["author"],
                from_op=known_op is not None and c["author"] == known_op,
                confirmed=confirmed,
                rejected_by_deltabot=bool(replies) and not confirmed,
            )
        )
    return found


# --- branches ---------------------------------------------------------------------


def path_to_root(comment_id: str, by_id: Mapping[str, Mapping]) -> list[str]:
    """Comment ids from the top-level reply down to `comment_id`, both included.

    Assumes the tree is rooted (the clean stage drops comments whose ancestors
    are missing); stops at the first id it cannot follow, and at a cycle.
    """
    path: list[str] = []
    seen: set[str] = set()
    cur: str | None = comment_id
    while cur is not None and cur in by_id and cur not in seen:
        seen.add(cur)
        path.append(cur)
        parent = by_id[cur]["parent_id"]
        cur = parent[3:] if parent.startswith("t1_") else None
    path.reverse()
    return path


def winning_branches(deltas: Iterable[Delta], comments: Sequence[Comment]) -> list[Branch]:
    """One branch per comment that won a confirmed OP delta, in delta order.

    Several deltas to the same comment give one branch; a branch may be a
    prefix of another when the OP rewarded two comments of one chain.
    """
    deltas = [d for d in deltas if d.from_op and d.confirmed]
    if not deltas:
        return []
    by_id = {c["id"]: c for c in comments}
    branches: list[Branch] = []
    seen: set[str] = set()
    for d in deltas:
        if d.rewarded_comment_id in seen:
            continue
        seen.add(d.rewarded_comment_id)
        branches.append({"recipient": d.recipient, "comment_ids": path_to_root(d.rewarded_comment_id, by_id)})
    return branches


def losing_branch_candidates(
    comments: Sequence[Comment], op_author: str | None, deltas: Iterable[Mapping]
) -> list[Branch]:
    """Rooted branches that could be matched against a winner (Tan et al.'s pair task).

    For each top-level comment by a challenger (not the OP, DeltaBot, a deleted
    user, nor anyone who received an OP delta in this thread) whose subtree
    holds no comment rewarded by the OP: the deepest chain of comments written
    only by that challenger and the OP, ending on the challenger, to which the
    OP replied at least once (a reply to the last comment counts). Earliest
    wins a tie. `deltas` are schema records (dicts), as in conversations rows.
    Returned in the order of the top-level comments; choosing the most similar
    one (see `jaccard`) is the format stage's job.
    """
    if not op_known(op_author):
        return []
    deltas = list(deltas)
    op_rewarded = {d["rewarded_comment_id"] for d in deltas if d["from_op"]}
    op_recipients = {d["recipient"] for d in deltas if d["from_op"]}
    children: dict[str, list[Comment]] = {}
    for c in comments:
        children.setdefault(c["parent_id"], []).append(c)

    def subtree(root: Comment) -> Iterable[Comment]:
        stack = [root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(children.get("t1_" + node["id"], []))

    out: list[Branch] = []
    for top in comments:
        if not top["parent_id"].startswith("t3_"):
            continue
        who = top["author"]
        if who == op_author or not _eligible_person(top) or who in op_recipients:
            continue
        if any(n["id"] in op_rewarded for n in subtree(top)):
            continue
        best: list[str] | None = None
        # depth-first over the two-party chain; `path` is root..node
        stack: list[tuple[Comment, list[str], bool]] = [(top, [top["id"]], False)]
        while stack:
            node, path, op_seen = stack.pop()
            kids = children.get("t1_" + node["id"], [])
            op_replied = op_seen or any(k["author"] == op_author for k in kids)
            if node["author"] == who and op_replied and (best is None or len(path) > len(best)):
                best = path
            for k in reversed(kids):
                if k["author"] in (who, op_author) and not is_deleted(k):
                    stack.append((k, path + [k["id"]], op_seen or k["author"] == op_author))
        if best is not None:
            out.append({"recipient": who, "comment_ids": best})
    return out


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> frozenset[str]:
    """Lower-cased word set, for Jaccard similarity between challengers' texts."""
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)
