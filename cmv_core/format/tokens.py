"""Lengths in tokens of the target model's tokenizer: of rendered conversations (its chat template),
the length filter on SFT examples, and the percentiles reported in stats.json."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cmv_core.format.config import SPLITS, FormatConfig

log = logging.getLogger(__name__)


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


def conversation_lengths(tokenizer, conversations: Sequence[list[dict]], batch_size: int) -> list[int]:
    """Tokens of each conversation rendered with the chat template (the message contents joined by a blank
    line when the tokenizer has no chat template); rendered and tokenized in batches, so that the fast
    tokenizer encodes each batch on every core."""
    lengths: list[int] = []
    has_template = bool(getattr(tokenizer, "chat_template", None))
    for start in range(0, len(conversations), batch_size):
        batch = list(conversations[start : start + batch_size])
        if has_template:
            texts = list(tokenizer.apply_chat_template(batch, tokenize=False))
        else:
            texts = ["\n\n".join(m["content"] for m in conv) for conv in batch]
        lengths.extend(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    return lengths


def text_lengths(tokenizer, texts: Sequence[str], batch_size: int = 256) -> list[int]:
    """Tokens of each text alone, without special tokens (tokenized in batches)."""
    lengths: list[int] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        lengths.extend(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
    return lengths


@dataclass
class LengthFiltered:
    """What the length filter kept, by split, and the token counts stats.json reports."""

    examples: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    lengths_all: list[int] = field(default_factory=list)  # every example, before the filter
    lengths_kept: dict[str, list[int]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    target_kept: list[int] = field(default_factory=list)


def filter_by_length(examples: list[dict], tokenizer, cfg: FormatConfig, dropped: Counter) -> LengthFiltered:
    """Drop (and count in ``dropped``) examples over ``max_tokens`` or with a target under
    ``min_target_tokens``; the kept ones get ``metadata.n_tokens`` and go to their split."""
    out = LengthFiltered()
    lengths = list(token_lengths(tokenizer, examples, cfg.token_batch_size))
    for example, (total, target) in zip(examples, lengths):
        out.lengths_all.append(total)
        if total > cfg.max_tokens:
            dropped["too_long"] += 1
            continue
        if target < cfg.min_target_tokens:
            dropped["target_too_short"] += 1
            continue
        split = example["metadata"]["split"]
        example["metadata"]["n_tokens"] = total
        out.examples[split].append(example)
        out.lengths_kept[split].append(total)
        out.target_kept.append(target)
    return out


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


def token_stats(filtered: LengthFiltered) -> dict:
    """The ``tokens`` block of stats.json: percentiles before the filter, kept, kept by split, kept targets."""
    return {
        "before_length_filter": percentiles(filtered.lengths_all),
        "kept": percentiles([n for s in SPLITS for n in filtered.lengths_kept[s]]),
        "kept_by_split": {s: percentiles(filtered.lengths_kept[s]) for s in SPLITS},
        "kept_target": percentiles(filtered.target_kept),
    }
