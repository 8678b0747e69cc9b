"""Published CMV pair sets as delta pairs the judge can score: Tan et al. (2016)'s pair task
(``*_pair_data.jsonlist[.bz2]``, one JSON object per original post) and ConvoKit's winning-args
corpus (a directory with ``utterances.jsonl`` and ``conversations.json``), told apart by content.

Each pair is the root reply of the side that won a delta and the root reply of the side that did
not, under the same post (docs/DATA.md). Nothing that shows the label reaches a judge: only the
post's title and text and each side's root-reply body are kept (``author_flair_text``, a user's
delta count, and every other field are dropped), and those texts pass the clean stage's rules
(docs/DATA.md "Text cleaning"): HTML unescaped, the moderators' footnote cut, "EDIT: ... delta"
blocks and lines with a delta token removed, and any token left inside quotes or code deleted.
Pure functions over parsed records; reading files is the caller's.
"""

from __future__ import annotations

import bz2
import gzip
import re
from collections.abc import Iterable, Mapping

from cmv_core.cmv.deltas import DELETED, has_delta_token, might_contain_delta
from cmv_core.cmv.text import clean_op_text, remove_delta_edits, unescape

TAN = "tan_jsonlist"
CONVOKIT = "convokit_winning_args"
SPLIT = "external"  # the split tag of these pairs' judgment rows: never the headline's test pairs

_TAN_KEYS = frozenset({"op_name", "op_text", "positive", "negative"})
_UTTERANCE_KEYS = frozenset({"id", "conversation_id", "reply_to", "text", "meta"})
# What is left of a delta token after the line rule (inside a quote or code): deleted outright.
_TOKEN = re.compile(r"\u2206|\u0394|&(?:amp;)?#8710;|!delta", re.I)
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def decompress(data: bytes) -> bytes:
    """The bytes of a file as read, inflated when they start with the bz2 or gzip magic (the
    content decides, not the name: Tan et al. ship .jsonlist.bz2)."""
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def detect_format(record: Mapping) -> str:
    """TAN for a line of Tan et al.'s pair data, CONVOKIT for an utterance of the winning-args
    corpus; ValueError naming the keys otherwise."""
    keys = set(record)
    if _TAN_KEYS <= keys:
        return TAN
    if _UTTERANCE_KEYS <= keys:
        return CONVOKIT
    raise ValueError(
        f"not a known pair format (keys {sorted(keys)[:12]}): expected Tan et al.'s {sorted(_TAN_KEYS)} "
        f"or a ConvoKit utterance {sorted(_UTTERANCE_KEYS)}"
    )


def strip_leaks(text: str) -> str:
    """A reply or post body with every delta announcement removed: edit blocks that announce a
    delta or a changed view, lines holding a delta token, then any token left in quotes or code."""
    text = remove_delta_edits(unescape(text))
    if might_contain_delta(text):
        text = "\n".join(line for line in text.split("\n") if not has_delta_token(line))
        text = _TOKEN.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def post_prompt(title: str | None, text: str | None) -> list[dict]:
    """The post as the format stage's default template shows it ("{title}\\n\\n{text}")."""
    body = strip_leaks(clean_op_text(text or "", strip_delta_edits=True))
    post = "\n\n".join(p for p in (strip_leaks(title or ""), body) if p)
    return [{"role": "user", "content": post}]


def _bare(reddit_id: object) -> str:
    """An id without its reddit type prefix (t1_, t3_): the two releases spell them differently."""
    s = str(reddit_id or "")
    return s[3:] if re.match(r"t\d_", s) else s


def _reply(body: object) -> str | None:
    """A root reply's cleaned text; None when deleted or empty once the leaks are gone."""
    if not isinstance(body, str) or body.strip() in DELETED:
        return None
    return strip_leaks(body) or None


def make_pair(
    source: str, thread: str, prompt: list[dict], win: tuple[str, object], lose: tuple[str, object]
) -> dict | str:
    """A delta pair in the judge's form (that of the format stage's pairs.jsonl), or why it is skipped."""
    if not prompt[0]["content"]:
        return "empty_post"
    winner, loser = _reply(win[1]), _reply(lose[1])
    if winner is None or loser is None:
        return "deleted_or_empty_reply"
    return {
        "pair_id": f"{thread}:{win[0]}:{lose[0]}",
        "thread_id": thread,
        "prompt": prompt,
        "winner": winner,
        "loser": loser,
        "loser_comment_ids": [lose[0]],
        "created_utc": None,
        "split": SPLIT,
        "period": None,
        "source": source,
    }


def _collect(out: list[dict], skipped: dict[str, int], result: dict | str, seen: set[str]) -> None:
    if isinstance(result, str):
        skipped[result] = skipped.get(result, 0) + 1
    elif result["pair_id"] in seen:
        skipped["duplicate"] = skipped.get("duplicate", 0) + 1
    else:
        seen.add(result["pair_id"])
        out.append(result)


def tan_pairs(records: Iterable[Mapping], source: str) -> tuple[list[dict], dict[str, int]]:
    """Pairs from Tan et al.'s lines (positive = the side that won a delta); skipped pairs counted by reason."""
    out: list[dict] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for rec in records:
        sides = [rec[k].get("comments") if isinstance(rec.get(k), Mapping) else None for k in ("positive", "negative")]
        if not all(isinstance(s, list) and s and isinstance(s[0], Mapping) for s in sides):
            _collect(out, skipped, "side_without_comments", seen)
            continue
        (pos, *_), (neg, *_) = sides
        prompt = post_prompt(rec.get("op_title"), rec.get("op_text"))
        win, lose = (_bare(pos.get("id")), pos.get("body")), (_bare(neg.get("id")), neg.get("body"))
        _collect(out, skipped, make_pair(source, _bare(rec.get("op_name")), prompt, win, lose), seen)
    return out, skipped


def _root(utterances: list[Mapping]) -> Mapping:
    """The comment of a side that replies to none of the side's others (its first, in file order)."""
    ids = {u["id"] for u in utterances}
    return next((u for u in utterances if u.get("reply_to") not in ids), utterances[0])


def convokit_pairs(
    utterances: Iterable[Mapping], conversations: Mapping[str, Mapping], source: str
) -> tuple[list[dict], dict[str, int]]:
    """Pairs from the winning-args corpus: the utterances sharing a pair id, split by meta.success
    (1 = won a delta); the post from conversations.json. Skipped pairs counted by reason."""
    sides: dict[tuple[str, str], dict[int, list[Mapping]]] = {}
    for u in utterances:
        meta = u.get("meta") or {}
        if meta.get("success") not in (0, 1):
            continue  # the posts themselves, and comments outside any pair
        for pid in meta.get("pair_ids") or []:
            sides.setdefault((str(u.get("conversation_id")), str(pid)), {}).setdefault(int(meta["success"]), []).append(
                u
            )
    out: list[dict] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for (conv_id, _), by_success in sides.items():
        conv = conversations.get(conv_id)
        if conv is None:
            _collect(out, skipped, "post_not_in_conversations", seen)
            continue
        if 0 not in by_success or 1 not in by_success:
            _collect(out, skipped, "side_without_comments", seen)
            continue
        pos, neg = _root(by_success[1]), _root(by_success[0])
        prompt = post_prompt(conv.get("op-title"), conv.get("op-text-body"))
        win, lose = (_bare(pos["id"]), pos.get("text")), (_bare(neg["id"]), neg.get("text"))
        _collect(out, skipped, make_pair(source, _bare(conv_id), prompt, win, lose), seen)
    return out, skipped
