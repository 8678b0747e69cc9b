"""The format stage: conversations (clean output) -> SFT train/val/test + judge calibration pairs.

Input: a clean stage directory (``conversations.jsonl.gz``, schema in DESIGN.md).
Output: ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (TRL's conversational
format: ``messages`` = list of ``{role, content}``, no chat template baked in;
the tokenizer applies it in training), ``pairs.jsonl`` (and ``pairs_before.jsonl`` with
``split: time``), ``train_preferences.jsonl``, ``val_preferences.jsonl``, ``stats.json`` and
``_SUCCESS``.

One example per winning branch (a confirmed OP delta). Decisions, documented
here because they change what the model learns:

- **Prompt.** The instruction (``instruction``) goes in the user turn before the
  post (``instruction_role: user``, works with every chat template) or in a
  system turn (``instruction_role: system``). The post is ``post_template``
  filled with the OP's title and text.
- **Single-turn target** (``view: single``). ``single_target: rewarded`` (the
  default) is the rewarded comment alone: the text the OP credited with the
  delta. ``single_target: branch`` joins every comment of the recipient in the
  winning branch with a blank line (Tan et al.'s path-unit); closer to the
  whole argument, but the later comments answer OP turns the model never sees.
- **Multi-turn** (``view: multi``). The winning branch as a dialogue after the
  post: the OP's comments are user turns, the recipient's assistant turns.
  Other users' comments are dropped (``others: drop``, default) or treated as
  part of the user side (``others: merge``). Adjacent turns of the same role are
  merged with a blank line, so roles alternate and the last turn is always the
  rewarded comment.
- **Quotes.** Comment lines starting with ``>`` quote the other side; they are
  removed from comment turns unless ``keep_quotes: true`` (CMV_DATA.md). The
  OP's post keeps its quotes (they quote sources, not the other side).
- **OP edits.** ``strip_op_edits`` (default on) removes "EDIT:"/"Update 2:"
  paragraphs from the post: they were written after the discussion started and
  often announce the delta (a label leak). It is broader than the clean stage's
  ``clean.strip_delta_edits``, which removes only edits that mention a delta.
- **Delta leaks in comments** (``strip_comment_delta_edits``, default on). A
  challenger's "EDIT: thanks for the ∆" (and the OP's earlier awards inside a
  branch) were written after the outcome: edit blocks that announce a delta or
  a changed view are removed from every comment turn, pair reply and human
  reference, and so is any remaining line holding a delta token; DeltaBot's
  comments never join a turn. The clean stage keeps comment bodies as they
  were (delta detection reads them); this is where they stop.
- **Deleted content.** "[deleted]"/"[removed]" is never a target and never
  appears in a prompt: such examples are dropped and counted by reason.
- **Duplicates.** Exact duplicates after normalization (Unicode NFKC, case,
  whitespace) of the whole conversation (``dedupe: messages``) or of the target
  only (``dedupe: target``) are dropped; the first in input order is kept.
- **Splits.** By thread, never by example. ``split: hash`` puts a thread in
  test/val/train by a seeded hash of its id (stable when threads are added).
  ``split: time`` puts threads created on or after ``test_after`` in test (Tan
  et al.'s heldout period) and splits the rest into train/val by hash.
- **Length.** Counted in tokens of the rendered conversation: the target
  model's tokenizer with its chat template (``tokenizer.apply_chat_template``).
  Examples over ``max_tokens`` or with a target under ``min_target_tokens`` are
  dropped and counted.
- **Pairs** (``pairs.jsonl``, test threads): each winning branch with a matched losing
  branch (CMV_DATA.md): a rooted path started by another challenger, in a
  top-level subtree with no OP delta at all, ending at a comment of that
  challenger, in which the OP wrote a comment (or replied to its last comment),
  chosen by the highest Jaccard similarity between the word sets of the two
  challengers' texts (ties: the earliest path). Both replies are the
  challenger's comments in the path joined by a blank line (the unit that was
  matched), cleaned like training targets. Each pair carries its thread's
  ``created_utc``, the ``split`` its thread is in and, with ``split: time``,
  its ``period`` (``after`` for test threads).
- **Train-period pairs** (``pairs_before.jsonl``, ``split: time`` only): the
  same pairs, built the same way, from the train and val threads (created
  before ``test_after``; ``split`` train or val, ``period: before``). The judge
  scores them beside the test pairs to see whether it does better on threads it
  may have read in pretraining. Judging the judge on train-period threads is
  legitimate: the judge is not the fine-tuned model, and these pairs are never
  a generation prompt; the headline calibration stays on the test pairs.
- **Preference pairs** (train and val threads, for DPO; ``preference_pairs``):
  the same matching as the test pairs, written in TRL's conversational
  preference format (``prompt`` messages, ``chosen`` = the winning reply,
  ``rejected`` = the matched losing reply, each one assistant message; plus
  ``thread_id`` and ``metadata``) to ``train_preferences.jsonl`` and
  ``val_preferences.jsonl``. Pairs whose prompt + reply renders over
  ``max_tokens`` are dropped, and so are pairs where either reply carries a
  delta token (a label leak). DPO on pairs where the winner is usually the
  longer reply learns length: ``stats.json`` reports the reply length
  difference (chosen - rejected, tokens: median, share chosen longer), and
  ``preference_max_length_ratio`` (e.g. 1.5) keeps only pairs whose longer
  reply is at most that many times the shorter, counting what it removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from cmv_core import storage
from cmv_core.config import parse_utc
from cmv_core.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Below is a post from the Change My View subreddit. Write a response that you think will change the author's view."
)
CONVERSATIONS = "conversations.jsonl.gz"
BEFORE_PAIRS = "pairs_before.jsonl"  # split: time: calibration pairs of the train-period (train + val) threads
SPLITS = ("train", "val", "test")
DELETED = frozenset({"[deleted]", "[removed]"})
NOT_CHALLENGERS = frozenset({"[deleted]", "[removed]", "DeltaBot", ""})

# Drop reasons, in the order they are checked (stats.json lists them all, zeros included).
DROP_REASONS = (
    "duplicate_thread",  # the same thread_id seen before in the input (overlapping dumps)
    "duplicate_branch",  # the same rewarded comment twice in one thread
    "deleted_post",  # the OP's text is [deleted]/[removed]
    "deleted_target",  # an assistant turn is [deleted]/[removed]
    "deleted_context",  # an OP turn in the branch is [deleted]/[removed]
    "empty_target",  # nothing left of the target after cleaning (e.g. only quotes)
    "duplicate",  # exact duplicate after normalization
    "too_long",  # rendered conversation over max_tokens
    "target_too_short",  # target under min_target_tokens
)


class FormatInputError(InputError):
    """The clean output is not what the format stage expects (names file, line and reason)."""


@dataclass
class FormatConfig:
    view: str = "single"  # single | multi
    instruction: str = DEFAULT_INSTRUCTION
    instruction_role: str = "user"  # user (prepended to the post) | system
    post_template: str = "{title}\n\n{text}"
    single_target: str = "rewarded"  # rewarded | branch
    others: str = "drop"  # multi-turn: drop | merge (other users' comments join the user side)
    keep_quotes: bool = False
    strip_op_edits: bool = True
    strip_comment_delta_edits: bool = True  # delta-announcing edits and ∆ lines out of every comment turn
    dedupe: str = "messages"  # messages | target | off
    split: str = "hash"  # hash | time
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1  # split: hash only
    test_after: str | None = None  # split: time; "YYYY-MM-DD" (UTC) or ISO datetime
    max_tokens: int = 2048
    min_target_tokens: int = 0
    token_batch_size: int = 256
    preference_pairs: bool = True  # train/val preference pairs for DPO (train_preferences.jsonl, val_preferences.jsonl)
    preference_max_length_ratio: float | None = None  # keep pairs with longer/shorter reply tokens <= this (None: all)

    def __post_init__(self) -> None:
        from cmv_core.config import ConfigError

        choices = {
            "view": ("single", "multi"),
            "instruction_role": ("user", "system"),
            "single_target": ("rewarded", "branch"),
            "others": ("drop", "merge"),
            "dedupe": ("messages", "target", "off"),
            "split": ("hash", "time"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"format.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.test_after, (dt.date, dt.datetime)):  # YAML reads 2015-05-08 as a date
            self.test_after = self.test_after.isoformat()
        if self.split == "time":
            if not self.test_after:
                raise ConfigError("format.split: time needs format.test_after (e.g. 2015-05-08)")
            parse_utc(self.test_after)
        if not (
            0 <= self.val_fraction <= 1 and 0 <= self.test_fraction <= 1 and self.val_fraction + self.test_fraction <= 1
        ):
            raise ConfigError("format.val_fraction and format.test_fraction must be in [0, 1] and sum to at most 1")
        if self.max_tokens <= 0 or self.token_batch_size <= 0:
            raise ConfigError("format.max_tokens and format.token_batch_size must be positive")
        if self.preference_max_length_ratio is not None and float(self.preference_max_length_ratio) < 1:
            raise ConfigError("format.preference_max_length_ratio must be at least 1 (or null: no balancing)")


# ---------------------------------------------------------------- text


_QUOTE_LINE = re.compile(r"^[ \t]*>")
# "EDIT:", "**Edit 2**:", "Update (later) -", a bare "**Edit**" line, or an all-caps "EDIT ..."; not a
# paragraph that merely starts with the word ("Update cycles are too short.", "Edit history matters.").
_EDIT_START = re.compile(
    r"^[\W_]*(?:(?i:edit|update)\b[\s\d#.*_~]*(?:\([^)\n]*\)[\s*_~]*)?(?:[:\-–—]|$)|(?:EDIT|UPDATE)\b)",
    re.M,
)
_BLANK_RUNS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_WORD = re.compile(r"[a-z0-9']+")


def is_deleted(text: str | None) -> bool:
    return (text or "").strip() in DELETED


def tidy(text: str) -> str:
    """Collapse runs of blank lines left by removals and strip the ends."""
    return _BLANK_RUNS.sub("\n\n", text).strip()


def strip_quotes(text: str) -> str:
    return tidy("\n".join(line for line in text.split("\n") if not _QUOTE_LINE.match(line)))


def strip_edits(text: str) -> str:
    """Drop edit paragraphs; an edit after the first paragraph runs to the end of the post."""
    paragraphs = re.split(r"\n[ \t]*\n", text)
    kept: list[str] = []
    for i, para in enumerate(paragraphs):
        if _EDIT_START.match(para.strip()):
            if i == 0:
                continue  # an edit on top of the post: drop that paragraph only
            break  # edits are appended: everything after the first one is edit text
        kept.append(para)
    return tidy("\n\n".join(kept))


def strip_delta_leaks(text: str) -> str:
    """Remove what announces a delta from a comment: edit blocks that mention a delta or a changed
    view, then every line that still holds a delta token (outside quotes and code, CMV_DATA.md)."""
    from cmv_core.cmv.deltas import has_delta_token, might_contain_delta
    from cmv_core.cmv.reddit import remove_delta_edits

    text = remove_delta_edits(text)
    if not might_contain_delta(text):
        return text
    return tidy("\n".join(line for line in text.split("\n") if not has_delta_token(line)))


def comment_text(body: str, cfg: FormatConfig) -> str:
    if cfg.strip_comment_delta_edits:
        body = strip_delta_leaks(body)
    return tidy(body) if cfg.keep_quotes else strip_quotes(body)


def normalize(text: str) -> str:
    """Key for exact-duplicate detection: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


# ---------------------------------------------------------------- splits


def hash_unit(seed: int, thread_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, thread_id): adding threads never moves others."""
    digest = hashlib.sha256(f"{seed}:{thread_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(thread_id: str, created_utc: float, cfg: FormatConfig) -> str:
    u = hash_unit(cfg.seed, thread_id)
    if cfg.split == "time":
        if created_utc >= parse_utc(cfg.test_after):
            return "test"
        return "val" if u < cfg.val_fraction else "train"
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


# ---------------------------------------------------------------- examples


def prompt_messages(thread: dict, cfg: FormatConfig) -> list[dict] | None:
    """System/user turns for a thread, or None when the post was deleted."""
    text = thread.get("op_text") or ""
    if is_deleted(text):
        return None
    if cfg.strip_op_edits:
        text = strip_edits(text)
    post = tidy(cfg.post_template.format(title=(thread.get("title") or "").strip(), text=text.strip()))
    if cfg.instruction_role == "system":
        return [{"role": "system", "content": cfg.instruction}, {"role": "user", "content": post}]
    return [{"role": "user", "content": tidy(f"{cfg.instruction}\n\n{post}")}]


def _merge_turns(turns: list[tuple[str, str]]) -> list[dict]:
    messages: list[dict] = []
    for role, content in turns:
        if not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


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


def build_example(thread: dict, branch: dict, by_id: dict, cfg: FormatConfig) -> tuple[dict | None, str | None]:
    """One SFT example for a winning branch: (example, None) or (None, drop reason)."""
    prompt = prompt_messages(thread, cfg)
    if prompt is None:
        return None, "deleted_post"
    comments = [by_id[cid] for cid in branch["comment_ids"]]
    recipient = branch["recipient"]
    if cfg.view == "multi":
        turns, reason = branch_turns(thread, comments, recipient, cfg)
        if reason:
            return None, reason
        messages = _merge_turns([(m["role"], m["content"]) for m in prompt] + turns)
    else:
        mine = [c for c in comments if c["author"] == recipient]
        targets = mine if cfg.single_target == "branch" else mine[-1:]
        if any(is_deleted(c["body"]) for c in targets):
            return None, "deleted_target"
        target = tidy("\n\n".join(comment_text(c["body"], cfg) for c in targets))
        if not target:
            return None, "empty_target"
        messages = prompt + [{"role": "assistant", "content": target}]
    example = {
        "id": f"{thread['thread_id']}:{branch['comment_ids'][-1]}",
        "thread_id": thread["thread_id"],
        "messages": messages,
        "metadata": {
            "view": cfg.view,
            "recipient": recipient,
            # user/assistant turns (the system turn, if any, is not a turn of the dialogue)
            "n_turns": sum(m["role"] != "system" for m in messages),
            "created_utc": thread.get("created_utc"),
            "split": None,  # set by the caller
            "comment_ids": list(branch["comment_ids"]),
        },
    }
    return example, None


def dedupe_key(example: dict, mode: str) -> str:
    if mode == "target":
        return normalize(example["messages"][-1]["content"])
    return "\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in example["messages"])


# ---------------------------------------------------------------- pairs


def _children(comments: list[dict]) -> dict[str, list[dict]]:
    kids: dict[str, list[dict]] = {}
    for c in comments:
        kids.setdefault(c["parent_id"], []).append(c)
    return kids


def _parent_key(comment_id: str) -> str:
    return f"t1_{comment_id}"


def losing_candidates(thread: dict, cfg: FormatConfig) -> list[dict]:
    """Every rooted path that could be a matched losing branch (CMV_DATA.md), in tree order.

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
        # Depth-first walk keeping the path; the subtree is skipped if any delta was won in it.
        paths: list[list[dict]] = []
        stack = [[root]]
        won = False
        while stack:
            path = stack.pop()
            node = path[-1]
            won = won or node["id"] in rewarded
            paths.append(path)
            for child in reversed(kids.get(_parent_key(node["id"]), [])):
                stack.append(path + [child])
        if won:
            continue
        for path in paths:
            last = path[-1]
            if last["author"] != challenger:
                continue
            op_engaged = any(c["author"] == op for c in path) or any(
                k["author"] == op for k in kids.get(_parent_key(last["id"]), [])
            )
            mine = [c for c in path if c["author"] == challenger]
            if not op_engaged or any(is_deleted(c["body"]) for c in mine):
                continue
            text = tidy("\n\n".join(comment_text(c["body"], cfg) for c in mine))
            if text:
                out.append({"author": challenger, "comment_ids": [c["id"] for c in path], "text": text})
    return out


def build_pairs(thread: dict, branches: list[dict], by_id: dict, cfg: FormatConfig) -> list[dict]:
    """One pair per winning branch that has a matched losing branch."""
    prompt = prompt_messages(thread, cfg)
    if prompt is None:
        return []
    candidates = losing_candidates(thread, cfg)
    pairs = []
    for branch in branches:
        comments = [by_id[cid] for cid in branch["comment_ids"]]
        winner = branch["recipient"]
        mine = [c for c in comments if c["author"] == winner]
        if any(is_deleted(c["body"]) for c in mine):
            continue
        text = tidy("\n\n".join(comment_text(c["body"], cfg) for c in mine))
        excluded = {winner, comments[0]["author"]}
        options = [c for c in candidates if c["author"] not in excluded]
        if not text or not options:
            continue
        win_words = words(text)
        scored = [(jaccard(win_words, words(c["text"])), -i, c) for i, c in enumerate(options)]
        score, _, loser = max(scored, key=lambda s: (s[0], s[1]))
        pairs.append(
            {
                "pair_id": f"{thread['thread_id']}:{branch['comment_ids'][-1]}",
                "thread_id": thread["thread_id"],
                "prompt": prompt,
                "winner": text,
                "loser": loser["text"],
                "winner_author": winner,
                "loser_author": loser["author"],
                "winner_comment_ids": list(branch["comment_ids"]),
                "loser_comment_ids": loser["comment_ids"],
                "jaccard": round(score, 6),
                "created_utc": thread.get("created_utc"),
            }
        )
    return pairs


def tag_pairs(pairs: list[dict], split: str, cfg: FormatConfig) -> list[dict]:
    """Mark each pair with the split of its thread and, under a time split, its period relative to
    ``test_after`` (``before``: train/val threads, ``after``: test threads); in place, returned."""
    period = ("after" if split == "test" else "before") if cfg.split == "time" else None
    for p in pairs:
        p["split"], p["period"] = split, period
    return pairs


def preference_rows(pairs: list[dict], tokenizer, cfg: FormatConfig) -> tuple[list[dict], dict]:
    """Pairs (build_pairs) -> TRL conversational preference rows, filtered by length; and their stats.

    Drops, counted: a reply with a delta token, prompt + reply rendered over ``max_tokens``, then (with
    ``preference_max_length_ratio``) a longer/shorter reply token ratio over the limit. The length difference
    chosen - rejected (reply tokens) is reported before and after balancing.
    """
    from statistics import median

    from cmv_core.cmv.deltas import has_delta_token

    has_template = bool(getattr(tokenizer, "chat_template", None))
    rows, dropped = [], {"delta_token": 0, "too_long": 0, "length_ratio": 0}
    diffs_before: list[int] = []
    for p in pairs:
        if has_delta_token(p["winner"]) or has_delta_token(p["loser"]):
            dropped["delta_token"] += 1
            continue
        chosen, rejected = (
            [{"role": "assistant", "content": p["winner"]}],
            [{"role": "assistant", "content": p["loser"]}],
        )
        if has_template:
            texts = [tokenizer.apply_chat_template(p["prompt"] + reply, tokenize=False) for reply in (chosen, rejected)]
            totals = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        else:
            totals = [
                len(
                    tokenizer("\n\n".join(m["content"] for m in p["prompt"] + reply), add_special_tokens=False)[
                        "input_ids"
                    ]
                )
                for reply in (chosen, rejected)
            ]
        n_chosen, n_rejected = (
            len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (p["winner"], p["loser"])
        )
        if max(totals) > cfg.max_tokens:
            dropped["too_long"] += 1
            continue
        diffs_before.append(n_chosen - n_rejected)
        ratio = max(n_chosen, n_rejected) / max(1, min(n_chosen, n_rejected))
        if cfg.preference_max_length_ratio is not None and ratio > float(cfg.preference_max_length_ratio):
            dropped["length_ratio"] += 1
            continue
        rows.append(
            {
                "prompt": p["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "thread_id": p["thread_id"],
                "metadata": {
                    "pair_id": p["pair_id"],
                    "jaccard": p["jaccard"],
                    "chosen_author": p["winner_author"],
                    "rejected_author": p["loser_author"],
                    "chosen_comment_ids": p["winner_comment_ids"],
                    "rejected_comment_ids": p["loser_comment_ids"],
                    "chosen_tokens": n_chosen,
                    "rejected_tokens": n_rejected,
                    "n_tokens": totals,
                },
            }
        )

    def difference(diffs: list[int]) -> dict:
        return {
            "n": len(diffs),
            "median": median(diffs) if diffs else None,
            "share_chosen_longer": round(sum(d > 0 for d in diffs) / len(diffs), 4) if diffs else None,
        }

    kept = [r["metadata"]["chosen_tokens"] - r["metadata"]["rejected_tokens"] for r in rows]
    return rows, {
        "pairs_built": len(pairs),
        "kept": len(rows),
        "dropped": dropped,
        "length_difference_before_balancing": difference(diffs_before),
        "length_difference": difference(kept),
    }


# ---------------------------------------------------------------- tokens


def token_lengths(tokenizer, examples: list[dict], batch_size: int) -> Iterator[tuple[int, int]]:
    """(rendered conversation tokens, target tokens) per example, in order."""
    from tqdm import tqdm

    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        log.warning("the tokenizer has no chat template: lengths count the message contents only")
    with tqdm(total=len(examples), desc="format: tokens", unit="ex") as bar:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            conversations = [e["messages"] for e in batch]
            if has_template:
                # The exact string training will tokenize (special tokens are in it already).
                texts = tokenizer.apply_chat_template(conversations, tokenize=False)
            else:
                texts = ["\n\n".join(m["content"] for m in conv) for conv in conversations]
            totals = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            targets = tokenizer([c[-1]["content"] for c in conversations], add_special_tokens=False)["input_ids"]
            yield from zip(map(len, totals), map(len, targets))
            bar.update(len(batch))


def percentiles(values: list[int]) -> dict:
    """p50/p90/p99/max (nearest rank) and the mean."""
    if not values:
        return {"n": 0, "mean": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    s = sorted(values)

    def rank(p: float) -> int:
        return s[min(len(s) - 1, max(0, -(-len(s) * p // 100) - 1))]

    return {
        "n": len(s),
        "mean": round(sum(s) / len(s), 2),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": s[-1],
    }


# ---------------------------------------------------------------- reading


REQUIRED_THREAD_KEYS = ("thread_id", "title", "op_author", "op_text", "created_utc", "comments", "winning_branches")


def read_threads(uri: str) -> Iterator[tuple[int, dict]]:
    """(line number, thread) from conversations.jsonl.gz, with errors naming file, line and reason."""
    with storage.open_read(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                thread = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatInputError(f"{uri}:{lineno}: not valid JSON ({exc.msg})") from None
            missing = [k for k in REQUIRED_THREAD_KEYS if k not in thread] if isinstance(thread, dict) else ["*"]
            if missing:
                raise FormatInputError(f"{uri}:{lineno}: not a clean-stage thread (missing {', '.join(missing)})")
            yield lineno, thread


def check_branches(uri: str, lineno: int, thread: dict, by_id: dict) -> None:
    for branch in thread["winning_branches"]:
        ids = branch.get("comment_ids") or []
        unknown = [cid for cid in ids if cid not in by_id]
        if not ids or unknown:
            raise FormatInputError(
                f"{uri}:{lineno}: thread {thread['thread_id']}: winning branch {ids} names unknown comments {unknown}"
            )
        if by_id[ids[-1]]["author"] != branch.get("recipient"):
            raise FormatInputError(
                f"{uri}:{lineno}: thread {thread['thread_id']}: winning branch ends at {ids[-1]} by "
                f"{by_id[ids[-1]]['author']!r}, not by its recipient {branch.get('recipient')!r}"
            )


# ---------------------------------------------------------------- stage


def run_format(
    input: str,
    output: str,
    config: FormatConfig,
    model: str,
    run_id: str | None = None,
    force: bool = False,
) -> dict:
    """Run the format stage; returns the ``_SUCCESS`` manifest (the existing one when skipped)."""
    from tqdm import tqdm

    cfg = config
    stage_config = {"format": dataclasses.asdict(cfg), "model": model}
    run = storage.begin_stage("format", output, inputs=[input], config=stage_config, run_id=run_id, force=force)
    if run is None:
        return storage.require_success(output)

    # Load: stream threads; keep only the examples and the pairs (test, and train-period under a time split).
    source = storage.join(input, CONVERSATIONS)
    dropped: Counter = Counter({r: 0 for r in DROP_REASONS})
    candidates: list[dict] = []
    pairs: list[dict] = []
    before_pairs: list[dict] = []  # split: time only (pairs_before.jsonl)
    preference_pairs: dict[str, list[dict]] = {"train": [], "val": []}
    threads_without_loser: Counter = Counter({"train": 0, "val": 0})
    seen_threads: set[str] = set()
    threads = threads_with_winner = branches_total = 0
    thread_splits: Counter = Counter()
    for lineno, thread in tqdm(read_threads(source), desc="format: threads", unit="thread"):
        threads += 1
        tid = str(thread["thread_id"])
        if tid in seen_threads:
            dropped["duplicate_thread"] += len(thread["winning_branches"])
            continue
        seen_threads.add(tid)
        split = assign_split(tid, float(thread["created_utc"] or 0), cfg)
        thread_splits[split] += 1
        by_id = {c["id"]: c for c in thread["comments"]}
        check_branches(source, lineno, thread, by_id)
        branches, seen_rewarded = [], set()
        for branch in thread["winning_branches"]:
            branches_total += 1
            if branch["comment_ids"][-1] in seen_rewarded:
                dropped["duplicate_branch"] += 1
                continue
            seen_rewarded.add(branch["comment_ids"][-1])
            branches.append(branch)
        threads_with_winner += bool(branches)
        for branch in branches:
            example, reason = build_example(thread, branch, by_id, cfg)
            if reason:
                dropped[reason] += 1
                continue
            example["metadata"]["split"] = split
            candidates.append(example)
        if branches and split == "test":
            pairs.extend(tag_pairs(build_pairs(thread, branches, by_id, cfg), split, cfg))
        elif branches and (cfg.preference_pairs or cfg.split == "time"):
            # train/val: one matching serves both the DPO preference pairs and, under a time split, the
            # judge's train-period calibration pairs. Validating the judge on delta pairs the fine-tuned
            # model trained on is legitimate: the judge is another model, and none of these is a prompt.
            built = tag_pairs(build_pairs(thread, branches, by_id, cfg), split, cfg)
            if cfg.preference_pairs:
                preference_pairs[split].extend(built)
                threads_without_loser[split] += not built
            if cfg.split == "time":
                before_pairs.extend(built)

    # Filter: exact duplicates (first in input order wins), then length in tokens.
    unique: list[dict] = []
    if cfg.dedupe == "off":
        unique = candidates
    else:
        seen_keys: set[str] = set()
        for example in candidates:
            key = hashlib.sha256(dedupe_key(example, cfg.dedupe).encode()).hexdigest()
            if key in seen_keys:
                dropped["duplicate"] += 1
                continue
            seen_keys.add(key)
            unique.append(example)

    from cmv_core import models

    tokenizer = models.load_tokenizer(model)
    kept: dict[str, list[dict]] = {s: [] for s in SPLITS}
    lengths_all: list[int] = []
    lengths_kept: dict[str, list[int]] = {s: [] for s in SPLITS}
    target_kept: list[int] = []
    lengths = list(token_lengths(tokenizer, unique, cfg.token_batch_size))
    for example, (total, target) in zip(unique, lengths):
        lengths_all.append(total)
        if total > cfg.max_tokens:
            dropped["too_long"] += 1
            continue
        if target < cfg.min_target_tokens:
            dropped["target_too_short"] += 1
            continue
        split = example["metadata"]["split"]
        example["metadata"]["n_tokens"] = total
        kept[split].append(example)
        lengths_kept[split].append(total)
        target_kept.append(target)

    # Write: splits, pairs, stats; _SUCCESS last (finish_stage).
    counts = {s: storage.write_jsonl(storage.join(output, f"{s}.jsonl"), kept[s]) for s in SPLITS}
    n_pairs = storage.write_jsonl(storage.join(output, "pairs.jsonl"), pairs)
    if cfg.split == "time":
        storage.write_jsonl(storage.join(output, BEFORE_PAIRS), before_pairs)
    preferences: dict[str, dict] = {}
    if cfg.preference_pairs:
        for name in ("train", "val"):
            rows, preferences[name] = preference_rows(preference_pairs[name], tokenizer, cfg)
            preferences[name]["threads_without_usable_loser"] = threads_without_loser[name]
            storage.write_jsonl(storage.join(output, f"{name}_preferences.jsonl"), rows)
    summary = {
        "threads_read": threads,
        "threads_by_split": {s: thread_splits[s] for s in SPLITS},
        "threads_with_winning_branch": threads_with_winner,
        "winning_branches": branches_total,
        "examples": counts,
        "examples_total": sum(counts.values()),
        "dropped": dict(dropped),
        "pairs": n_pairs,
        **({"pairs_before": len(before_pairs)} if cfg.split == "time" else {}),
        "preference_pairs": {name: p["kept"] for name, p in preferences.items()},
        "view": cfg.view,
        "split": cfg.split,
    }
    stats = {
        **summary,
        "model": model,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "max_tokens": cfg.max_tokens,
        "tokens": {
            "before_length_filter": percentiles(lengths_all),
            "kept": percentiles([n for s in SPLITS for n in lengths_kept[s]]),
            "kept_by_split": {s: percentiles(lengths_kept[s]) for s in SPLITS},
            "kept_target": percentiles(target_kept),
        },
        "preferences": preferences,
    }
    storage.write_json(storage.join(output, "stats.json"), stats)
    manifest = storage.finish_stage(run, summary, declared=True)
    print_summary(stats)
    return manifest


def print_summary(stats: dict) -> None:
    tok = stats["tokens"]["kept"]
    dropped = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items() if v) or "none"
    ex = stats["examples"]
    lines = [
        f"format ({stats['view']}-turn, {stats['split']} split): {stats['threads_read']} threads read, "
        f"{stats['threads_with_winning_branch']} with a winning branch, {stats['winning_branches']} branches",
        f"  examples: train {ex['train']}, val {ex['val']}, test {ex['test']} (total {stats['examples_total']})",
        f"  dropped: {dropped}",
        f"  tokens (kept, {stats['tokenizer']}): p50 {tok['p50']}, p90 {tok['p90']}, p99 {tok['p99']}, "
        f"max {tok['max']} (limit {stats['max_tokens']})",
        f"  pairs (test threads): {stats['pairs']}",
    ]
    if "pairs_before" in stats:
        lines.append(f"  pairs (train-period threads, {BEFORE_PAIRS}): {stats['pairs_before']}")
    for split, p in stats.get("preferences", {}).items():
        diff = p["length_difference"]
        lines.append(
            f"  preference pairs ({split}): {p['kept']} of {p['pairs_built']} (dropped {p['dropped']}; "
            f"{p['threads_without_usable_loser']} threads without a usable loser); chosen - rejected "
            f"tokens: median {diff['median']}, chosen longer in {diff['share_chosen_longer']}"
        )
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="clean stage output (directory or URI)")
    parser.add_argument("--output", required=True, help="format stage output (directory or URI)")


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core import config as recipes

    recipe = recipes.load_recipe(args.config, args.set)
    cfg = recipes.section(recipe, "format", FormatConfig)
    run_format(args.input, args.output, cfg, recipes.model_spec(recipe), run_id=args.run_id, force=args.force)
    return 0
