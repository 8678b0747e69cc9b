"""Winning branches as dialogue turns, and the matched losing branches (docs/DATA.md) they are paired with."""

from __future__ import annotations

from cmv_core.format.config import FormatConfig
from cmv_core.format.text import comment_text, comments_text, is_deleted, jaccard, words

NOT_CHALLENGERS = frozenset({"[deleted]", "[removed]", "DeltaBot", ""})


def branch_turns(thread: dict, comments: list[dict], recipient: str, cfg: FormatConfig) -> tuple[list, str | None]:
    """(role, text) turns of a winning branch for the multi-turn view, or a drop reason."""
    op = thread.get("op_author")
    turns: list[tuple[str, str]] = []
    for c in comments:
        if c["author"] == recipient:
            if is_deleted(c["body"]):
                return [], "deleted_target"
            turns.append(("assistant", comment_text(c["body"], cfg)))
        elif c["author"] == op:
            if is_deleted(c["body"]):
                return [], "deleted_context"
            turns.append(("user", comment_text(c["body"], cfg)))
        elif cfg.others == "merge" and not is_deleted(c["body"]) and c["author"].lower() != "deltabot":
            turns.append(("user", comment_text(c["body"], cfg)))
    if not turns[-1][1]:
        return [], "empty_target"
    return turns, None


def _children(comments: list[dict]) -> dict[str, list[dict]]:
    kids: dict[str, list[dict]] = {}
    for c in comments:
        kids.setdefault(c["parent_id"], []).append(c)
    return kids


def _parent_key(comment_id: str) -> str:
    return f"t1_{comment_id}"


def _rooted_paths(root: dict, kids: dict[str, list[dict]]) -> list[list[dict]]:
    """Every path from ``root`` down into its subtree, depth-first in tree order."""
    paths: list[list[dict]] = []
    stack = [[root]]
    while stack:
        path = stack.pop()
        paths.append(path)
        for child in reversed(kids.get(_parent_key(path[-1]["id"]), [])):
            stack.append(path + [child])
    return paths


def losing_candidates(thread: dict, cfg: FormatConfig) -> list[dict]:
    """Every rooted path that could be a matched losing branch (docs/DATA.md), in tree order.

    A candidate starts at a top-level comment by a challenger (not the OP,
    DeltaBot or deleted), lies in a top-level subtree holding no rewarded
    comment of any OP delta, ends at a comment by the same challenger, and
    the OP wrote a comment in it or replied to its last comment.
    """
    op = thread.get("op_author")
    comments = thread["comments"]
    kids = _children(comments)
    rewarded = {d["rewarded_comment_id"] for d in thread.get("deltas", []) if d.get("from_op")}
    out: list[dict] = []
    for root in comments:
        if not root["parent_id"].startswith("t3_"):
            continue
        challenger = root["author"]
        if challenger in NOT_CHALLENGERS or challenger == op:
            continue
        paths = _rooted_paths(root, kids)
        if any(path[-1]["id"] in rewarded for path in paths):
            continue  # a delta was won in this subtree
        for path in paths:
            last = path[-1]
            if last["author"] != challenger:
                continue
            op_engaged = any(c["author"] == op for c in path) or any(
                k["author"] == op for k in kids.get(_parent_key(last["id"]), [])
            )
            if not op_engaged:
                continue
            text = comments_text([c for c in path if c["author"] == challenger], cfg)
            if text:
                out.append({"author": challenger, "comment_ids": [c["id"] for c in path], "text": text})
    return out


def match_loser(winner_text: str, excluded: set[str], candidates: list[dict]) -> tuple[float, dict] | None:
    """(Jaccard score, candidate) of the losing candidate whose words are most like the winner's, among
    those not written by an ``excluded`` author (ties: the earliest); None when there is none."""
    options = [c for c in candidates if c["author"] not in excluded]
    if not options:
        return None
    win_words = words(winner_text)
    scored = [(jaccard(win_words, words(c["text"])), -i, c) for i, c in enumerate(options)]
    score, _, loser = max(scored, key=lambda s: (s[0], s[1]))
    return score, loser
