"""The format stage: conversations (clean output) -> SFT train/val/test + judge calibration pairs.

Input: a clean stage directory (``conversations.jsonl.gz``, schema in docs/ARCHITECTURE.md).
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
  removed from comment turns unless ``keep_quotes: true`` (docs/DATA.md). The
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
  branch (docs/DATA.md): a rooted path started by another challenger, in a
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

from cmv_core import config as recipes
from cmv_core import models, storage
from cmv_core.format.config import SPLITS, FormatConfig
from cmv_core.format.examples import dedupe, preference_rows
from cmv_core.format.load import Loaded, load_threads
from cmv_core.format.tokens import filter_by_length, token_stats

CONVERSATIONS = "conversations.jsonl.gz"
BEFORE_PAIRS = "pairs_before.jsonl"  # split: time: calibration pairs of the train-period (train + val) threads


def run_format(
    input: str,
    output: str,
    config: FormatConfig,
    model: str,
    run_id: str | None = None,
    force: bool = False,
) -> dict:
    """Run the format stage; returns the ``_SUCCESS`` manifest (the existing one when skipped)."""
    cfg = config
    stage_config = {"format": dataclasses.asdict(cfg), "model": model}
    run = storage.begin_stage("format", output, inputs=[input], config=stage_config, run_id=run_id, force=force)
    if run is None:
        return storage.require_success(output)

    # Load: stream threads, split them by thread and build each one's examples and pairs as it is read;
    # keep only those (test pairs, train/val pairs for DPO and, under a time split, train-period pairs).
    loaded = load_threads(storage.join(input, CONVERSATIONS), cfg)

    # Filter: exact duplicates (first in input order wins), then length in tokens.
    unique = dedupe(loaded.candidates, cfg.dedupe, loaded.dropped)
    tokenizer = models.load_tokenizer(model)
    kept = filter_by_length(unique, tokenizer, cfg, loaded.dropped)

    # Write: splits, pairs, preference rows (built here, filtered by length), stats; _SUCCESS last (finish_stage).
    counts = {s: storage.write_jsonl(storage.join(output, f"{s}.jsonl"), kept.examples[s]) for s in SPLITS}
    n_pairs = storage.write_jsonl(storage.join(output, "pairs.jsonl"), loaded.pairs)
    if cfg.split == "time":
        storage.write_jsonl(storage.join(output, BEFORE_PAIRS), loaded.before_pairs)
    preferences = write_preferences(output, loaded, tokenizer, cfg) if cfg.preference_pairs else {}
    summary = stage_summary(loaded, counts, n_pairs, preferences, cfg)
    stats = {
        **summary,
        "model": model,
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "max_tokens": cfg.max_tokens,
        "tokens": token_stats(kept),
        "preferences": preferences,
    }
    storage.write_json(storage.join(output, "stats.json"), stats)
    manifest = storage.finish_stage(run, summary, declared=True)
    print_summary(stats)
    return manifest


def write_preferences(output: str, loaded: Loaded, tokenizer, cfg: FormatConfig) -> dict[str, dict]:
    """Write ``train_preferences.jsonl`` and ``val_preferences.jsonl``; their stats by split."""
    preferences: dict[str, dict] = {}
    for name in ("train", "val"):
        rows, preferences[name] = preference_rows(loaded.preference_pairs[name], tokenizer, cfg)
        preferences[name]["threads_without_usable_loser"] = loaded.threads_without_loser[name]
        storage.write_jsonl(storage.join(output, f"{name}_preferences.jsonl"), rows)
    return preferences


def stage_summary(
    loaded: Loaded, counts: dict[str, int], n_pairs: int, preferences: dict[str, dict], cfg: FormatConfig
) -> dict:
    """The counts in ``_SUCCESS`` (and at the top of stats.json)."""
    return {
        "threads_read": loaded.threads,
        "threads_by_split": {s: loaded.thread_splits[s] for s in SPLITS},
        "threads_with_winning_branch": loaded.threads_with_winner,
        "winning_branches": loaded.branches_total,
        "examples": counts,
        "examples_total": sum(counts.values()),
        "dropped": dict(loaded.dropped),
        "pairs": n_pairs,
        **({"pairs_before": len(loaded.before_pairs)} if cfg.split == "time" else {}),
        "preference_pairs": {name: p["kept"] for name, p in preferences.items()},
        "view": cfg.view,
        "split": cfg.split,
    }


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
    recipe = recipes.load_recipe(args.config, args.set)
    cfg = recipes.section(recipe, "format", FormatConfig)
    run_format(args.input, args.output, cfg, recipes.model_spec(recipe), run_id=args.run_id, force=args.force)
    return 0
