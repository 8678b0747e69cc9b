"""The rows the format stage writes: SFT examples (TRL's conversational format), calibration pairs
(a winning and a matched losing reply) and DPO preference rows (TRL's conversational preference format)."""

from __future__ import annotations

import hashlib
from collections import Counter
from statistics import median

from cmv_core.cmv.deltas import has_delta_token
from cmv_core.format.branches import branch_turns, losing_candidates, match_loser
from cmv_core.format.config import FormatConfig
from cmv_core.format.text import comments_text, is_deleted, normalize, strip_edits, tidy
from cmv_core.format.tokens import conversation_lengths, text_lengths

# ---------------------------------------------------------------- SFT examples


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
        target = comments_text(mine if cfg.single_target == "branch" else mine[-1:], cfg)
        if target is None:
            return None, "deleted_target"
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


def dedupe(examples: list[dict], mode: str, dropped: Counter) -> list[dict]:
    """Exact duplicates out (the first in input order is kept), counted in ``dropped``; ``mode`` off: all."""
    if mode == "off":
        return examples
    unique: list[dict] = []
    seen_keys: set[str] = set()
    for example in examples:
        key = hashlib.sha256(dedupe_key(example, mode).encode()).hexdigest()
        if key in seen_keys:
            dropped["duplicate"] += 1
            continue
        seen_keys.add(key)
        unique.append(example)
    return unique


# ---------------------------------------------------------------- pairs


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
        text = comments_text([c for c in comments if c["author"] == winner], cfg)
        if not text:
            continue
        match = match_loser(text, {winner, comments[0]["author"]}, candidates)
        if match is None:
            continue
        score, loser = match
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


# ---------------------------------------------------------------- preference rows


def preference_rows(pairs: list[dict], tokenizer, cfg: FormatConfig) -> tuple[list[dict], dict]:
    """Pairs (build_pairs) -> TRL conversational preference rows, filtered by length; and their stats.

    Drops, counted: a reply with a delta token, prompt + reply rendered over ``max_tokens``, then (with
    ``preference_max_length_ratio``) a longer/shorter reply token ratio over the limit. The length difference
    chosen - rejected (reply tokens) is reported before and after balancing.
    """
    rows, dropped = [], {"delta_token": 0, "too_long": 0, "length_ratio": 0}
    diffs_before: list[int] = []
    clean = [p for p in pairs if not (has_delta_token(p["winner"]) or has_delta_token(p["loser"]))]
    dropped["delta_token"] = len(pairs) - len(clean)
    replies = [
        ([{"role": "assistant", "content": p["winner"]}], [{"role": "assistant", "content": p["loser"]}]) for p in clean
    ]
    # every length in a few large batches (one tokenizer call per batch, on every core), not two calls per pair
    rendered = conversation_lengths(
        tokenizer, [p["prompt"] + reply for p, both in zip(clean, replies) for reply in both], cfg.token_batch_size
    )
    alone = text_lengths(tokenizer, [t for p in clean for t in (p["winner"], p["loser"])], cfg.token_batch_size)
    for i, (p, (chosen, rejected)) in enumerate(zip(clean, replies)):
        totals = rendered[2 * i : 2 * i + 2]
        n_chosen, n_rejected = alone[2 * i : 2 * i + 2]
        if max(totals) > cfg.max_tokens:
            dropped["too_long"] += 1
            continue
        diffs_before.append(n_chosen - n_rejected)
        ratio = max(n_chosen, n_rejected) / max(1, min(n_chosen, n_rejected))
        if cfg.preference_max_length_ratio is not None and ratio > float(cfg.preference_max_length_ratio):
            dropped["length_ratio"] += 1
            continue
        rows.append(_preference_row(p, chosen, rejected, n_chosen, n_rejected, totals))
    kept = [r["metadata"]["chosen_tokens"] - r["metadata"]["rejected_tokens"] for r in rows]
    return rows, {
        "pairs_built": len(pairs),
        "kept": len(rows),
        "dropped": dropped,
        "length_difference_before_balancing": length_difference(diffs_before),
        "length_difference": length_difference(kept),
    }


def _preference_row(
    pair: dict, chosen: list[dict], rejected: list[dict], n_chosen: int, n_rejected: int, totals: list[int]
) -> dict:
    return {
        "prompt": pair["prompt"],
        "chosen": chosen,
        "rejected": rejected,
        "thread_id": pair["thread_id"],
        "metadata": {
            "pair_id": pair["pair_id"],
            "jaccard": pair["jaccard"],
            "chosen_author": pair["winner_author"],
            "rejected_author": pair["loser_author"],
            "chosen_comment_ids": pair["winner_comment_ids"],
            "rejected_comment_ids": pair["loser_comment_ids"],
            "chosen_tokens": n_chosen,
            "rejected_tokens": n_rejected,
            "n_tokens": totals,
        },
    }


def length_difference(diffs: list[int]) -> dict:
    """Chosen - rejected reply tokens over pairs: how many, the median, the share where chosen is longer."""
    return {
        "n": len(diffs),
        "median": median(diffs) if diffs else None,
        "share_chosen_longer": round(sum(d > 0 for d in diffs) / len(diffs), 4) if diffs else None,
    }
