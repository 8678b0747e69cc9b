"""Format stage, DPO preference pairs: TRL's format, matching as the calibration pairs, splits, length stats."""

from __future__ import annotations

from statistics import median

import pytest
from test_format import OP, PROMPT, c, cats_thread, delta, fmt, read, simple_thread, split_of, thread

from cmv_core import storage
from cmv_core.cmv.deltas import has_delta_token


def reply_tokens(model_dir: str, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"])


def leaky_thread() -> dict:
    """bob wins; the only matched loser (dave) wrote a delta token in his own reply: the pair must go."""
    comments = [
        c("x1", "", "bob", "Trains are efficient."),
        c("x2", "x1", OP, "∆ true"),
        c("y1", "", "dave", "Trains are loud. I would give a !delta to anyone who disagrees."),
        c("y2", "y1", OP, "Not really."),
    ]
    return thread("t9", comments, [("bob", ["x1"])], [delta("x2", "x1", "bob")])


def test_preference_pairs_exact_with_length_stats(tmp_path, tiny_model_dir):
    threads = [cats_thread(), simple_thread("t2", "Dogs are fine."), leaky_thread()]
    out = fmt(tmp_path, threads, tiny_model_dir, test_fraction=0.0, val_fraction=0.0)
    rows = read(out, "train_preferences.jsonl")
    assert read(out, "val_preferences.jsonl") == []
    # the calibration-pair matching: bob's loser is dave's b1, gina's is erin's c1 (see test_format)
    assert [r["metadata"]["pair_id"] for r in rows] == ["t1:a5", "t1:e1"]
    bob, gina = rows
    assert bob["prompt"] == [{"role": "user", "content": PROMPT}] and bob["thread_id"] == "t1"
    winner = "Dogs are loyal.\n\nDogs can be trained to be clean too.\n\nWalks make you healthier and dogs love you."
    assert bob["chosen"] == [{"role": "assistant", "content": winner}]
    assert bob["rejected"] == [{"role": "assistant", "content": "Dogs are loyal friends and protect the house."}]
    assert gina["rejected"] == [{"role": "assistant", "content": "Fish are the best pets, quiet and clean."}]
    assert bob["metadata"]["rejected_comment_ids"] == ["b1"] and bob["metadata"]["chosen_author"] == "bob"

    stats = storage.read_json(storage.join(out, "stats.json"))["preferences"]["train"]
    # format.strip_comment_delta_edits (default on) removes dave's only line, the one with "!delta": his
    # reply is empty, so t9 has no usable loser and the pair is never built
    assert stats["pairs_built"] == 2 and stats["kept"] == 2
    assert stats["dropped"] == {"delta_token": 0, "too_long": 0, "length_ratio": 0}
    assert stats["threads_without_usable_loser"] == 2  # t2: nobody else the OP talked to; t9: dave's reply is empty
    # with the stripping off, the pair is built and the last guard drops it for dave's "!delta"
    unstripped = fmt(
        tmp_path,
        threads,
        tiny_model_dir,
        "unstripped",
        test_fraction=0.0,
        val_fraction=0.0,
        strip_comment_delta_edits=False,
    )
    raw_stats = storage.read_json(storage.join(unstripped, "stats.json"))["preferences"]["train"]
    assert raw_stats["pairs_built"] == 3 and raw_stats["kept"] == 2
    assert raw_stats["dropped"] == {"delta_token": 1, "too_long": 0, "length_ratio": 0}
    assert raw_stats["threads_without_usable_loser"] == 1
    diffs = [
        reply_tokens(tiny_model_dir, r["chosen"][0]["content"])
        - reply_tokens(tiny_model_dir, r["rejected"][0]["content"])
        for r in rows
    ]
    assert [r["metadata"]["chosen_tokens"] - r["metadata"]["rejected_tokens"] for r in rows] == diffs
    assert stats["length_difference"] == {
        "n": 2,
        "median": median(diffs),
        "share_chosen_longer": sum(d > 0 for d in diffs) / 2,
    }

    # Balancing by length ratio: bob's reply is over 1.5x dave's, gina's and erin's are close; removal counted
    ratios = {
        r["metadata"]["pair_id"]: max(r["metadata"]["chosen_tokens"], r["metadata"]["rejected_tokens"])
        / min(r["metadata"]["chosen_tokens"], r["metadata"]["rejected_tokens"])
        for r in rows
    }
    assert ratios["t1:a5"] > 1.5 >= ratios["t1:e1"]
    balanced = fmt(
        tmp_path,
        threads,
        tiny_model_dir,
        name="balanced",
        test_fraction=0.0,
        val_fraction=0.0,
        preference_max_length_ratio=1.5,
    )
    assert [r["metadata"]["pair_id"] for r in read(balanced, "train_preferences.jsonl")] == ["t1:e1"]
    bstats = storage.read_json(storage.join(balanced, "stats.json"))["preferences"]["train"]
    assert bstats["dropped"]["length_ratio"] == 1 and bstats["kept"] == 1
    assert bstats["length_difference_before_balancing"] == stats["length_difference"]
    assert bstats["length_difference"]["median"] == diffs[1]

    # A pair over max_tokens (prompt + longer reply, rendered) is dropped and counted
    short = fmt(tmp_path, threads, tiny_model_dir, name="short", test_fraction=0.0, val_fraction=0.0, max_tokens=60)
    sstats = storage.read_json(storage.join(short, "stats.json"))["preferences"]["train"]
    assert sstats["dropped"]["too_long"] == 2 - sstats["kept"] and sstats["dropped"]["too_long"] >= 1


def test_preference_pairs_on_the_sample_never_cross_splits_nor_leak(format_output, clean_output):
    from test_format import REPO

    from cmv_core import config
    from cmv_core.format.config import FormatConfig
    from cmv_core.format.split import assign_split

    recipe = config.section(config.load_recipe(str(REPO / "configs" / "tiny.yaml")), "format", FormatConfig)
    split = split_of(format_output)  # thread -> split of the SFT examples
    threads = {t["thread_id"]: t for t in storage.read_jsonl(storage.join(clean_output, "conversations.jsonl.gz"))}
    test_threads = {p["thread_id"] for p in read(format_output, "pairs.jsonl")}
    seen = {}
    for name in ("train", "val"):
        for r in read(format_output, f"{name}_preferences.jsonl"):
            seen[r["thread_id"]] = name
            assert assign_split(r["thread_id"], threads[r["thread_id"]]["created_utc"], recipe) == name
            assert split.get(r["thread_id"], name) == name and r["thread_id"] not in test_threads
            thread_comments = {cm["id"]: cm for cm in threads[r["thread_id"]]["comments"]}
            for key in ("chosen", "rejected"):
                text = r[key][0]["content"]
                assert not has_delta_token(text) and "[deleted]" not in text and "[removed]" not in text
                ids = r["metadata"][f"{key}_comment_ids"]
                assert all(thread_comments[i]["author"] != "DeltaBot" for i in ids)
            assert r["metadata"]["rejected_author"] != r["metadata"]["chosen_author"]
    assert "train" in seen.values(), "the sample should give train preference pairs"


def test_preference_balancing_ratio_is_validated():
    from cmv_core.config import ConfigError
    from cmv_core.format.config import FormatConfig

    with pytest.raises(ConfigError, match="preference_max_length_ratio"):
        FormatConfig(preference_max_length_ratio=0.5)
