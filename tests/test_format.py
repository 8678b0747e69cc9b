"""The format stage on hand-written clean-stage threads (exact messages, splits, filters, pairs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmv_core import storage
from cmv_core.config import ConfigError, parse_utc
from cmv_core.format.config import DEFAULT_INSTRUCTION, FormatConfig, FormatInputError
from cmv_core.format.split import assign_split
from cmv_core.format.stage import run_format
from cmv_core.format.text import strip_edits

OP = "alice"
TITLE = "CMV: Cats are better pets than dogs"
POST = "Cats are clean and independent."
POST_WITH_EDIT = POST + "\n\n**EDIT:** Changed my view, thanks u/bob! ∆ awarded.\n\nMore edit text."
REPO = Path(__file__).resolve().parents[1]
PROMPT = f"{DEFAULT_INSTRUCTION}\n\n{TITLE}\n\n{POST}"


def c(cid: str, parent: str, author: str, body: str, t: float = 1.4e9) -> dict:
    """A comment in the clean schema; ``parent`` is a comment id or "" for a top-level reply."""
    return {
        "id": cid,
        "parent_id": f"t1_{parent}" if parent else "t3_x",
        "author": author,
        "body": body,
        "created_utc": t,
    }


def delta(awarding: str, rewarded: str, recipient: str, confirmed: bool = True) -> dict:
    return {
        "awarding_comment_id": awarding,
        "awarder": OP,
        "rewarded_comment_id": rewarded,
        "recipient": recipient,
        "from_op": True,
        "confirmed": confirmed,
    }


def thread(
    tid: str,
    comments: list[dict],
    branches: list[tuple[str, list[str]]],
    deltas=(),
    *,
    title: str = TITLE,
    text: str = POST,
    created: float = 1.4e9,
) -> dict:
    for com in comments:
        if com["parent_id"] == "t3_x":
            com["parent_id"] = f"t3_{tid}"
    return {
        "thread_id": tid,
        "title": title,
        "op_author": OP,
        "op_text": text,
        "created_utc": created,
        "comments": comments,
        "deltas": list(deltas),
        "winning_branches": [{"recipient": r, "comment_ids": ids} for r, ids in branches],
    }


def cats_thread() -> dict:
    """Bob wins through a branch with a third user (carol); gina wins at top level; several non-winners."""
    comments = [
        c("a1", "", "bob", "Dogs are loyal.\n\n> Cats are clean\n\nDogs can be trained to be clean too."),
        c("a2", "a1", OP, "But dogs need walks."),
        c("a3", "a2", "carol", "Walks are healthy."),
        c("a4", "a3", OP, "Fair point, carol."),
        c("a5", "a4", "bob", "Walks make you healthier and dogs love you."),
        c("a6", "a5", OP, "∆ you convinced me"),
        c("a7", "a6", "DeltaBot", "Confirmed: 1 delta awarded to /u/bob"),
        # dave: OP replied to b1, so [b1] and [b1, b2, b3] are both candidates
        c("b1", "", "dave", "Dogs are loyal friends and protect the house."),
        c("b2", "b1", OP, "Cats protect from mice."),
        c("b3", "b2", "dave", "Dogs are loyal and protect from burglars."),
        c("c1", "", "erin", "Fish are the best pets, quiet and clean."),
        c("c2", "c1", OP, "Fish are boring."),
        # nearly the winner's text, but the OP never replied: not a candidate
        c(
            "d1",
            "",
            "frank",
            "Dogs are loyal. Dogs can be trained to be clean too. Walks make you healthier and dogs love you.",
        ),
        c("e1", "", "gina", "Fish tanks are quiet and clean pets"),
        c("e2", "e1", OP, "Δ good point"),
        c("e3", "e2", "DeltaBot", "Confirmed: 1 delta awarded to /u/gina"),
        # nearly the winner's text and the OP replied, but with an (unconfirmed) delta: never a loser
        c(
            "h1",
            "",
            "hank",
            "Dogs are loyal. Dogs can be trained to be clean too. Walks make you healthier and dogs love you.",
        ),
        c("h2", "h1", OP, "!delta"),
        # a deleted challenger comment is never a loser
        c("i1", "", "ivan", "[removed]"),
        c("i2", "i1", OP, "Why was this removed?"),
    ]
    return thread(
        "t1",
        comments,
        [("bob", ["a1", "a2", "a3", "a4", "a5"]), ("gina", ["e1"])],
        [delta("a6", "a5", "bob"), delta("e2", "e1", "gina"), delta("h2", "h1", "hank", confirmed=False)],
        text=POST_WITH_EDIT,
    )


def simple_thread(tid: str, reply: str, created: float = 1.4e9, *, text: str = POST, title: str = TITLE) -> dict:
    comments = [c(f"{tid}a", "", "bob", reply), c(f"{tid}b", f"{tid}a", OP, "∆ yes")]
    return thread(
        tid,
        comments,
        [("bob", [f"{tid}a"])],
        [delta(f"{tid}b", f"{tid}a", "bob")],
        created=created,
        text=text,
        title=title,
    )


def write_clean(directory: Path, threads: list[dict]) -> str:
    """A clean-stage output with a valid _SUCCESS, as the clean stage writes it."""
    out = str(directory)
    run = storage.begin_stage("clean", out, inputs=[], config={}, raw_inputs=True)
    storage.write_jsonl(storage.join(out, "conversations.jsonl.gz"), threads)
    storage.finish_stage(run, {"threads": len(threads)})
    return out


def read(out: str, name: str) -> list[dict]:
    return list(storage.read_jsonl(storage.join(out, name)))


def all_examples(out: str) -> list[dict]:
    return [e for s in ("train", "val", "test") for e in read(out, f"{s}.jsonl")]


def fmt(tmp_path: Path, threads: list[dict], model: str, name: str = "format", **cfg) -> str:
    src = tmp_path / "clean"
    if not (src / "_SUCCESS").exists():
        write_clean(src, threads)
    out = str(tmp_path / name)
    run_format(str(src), out, FormatConfig(**cfg), model, run_id="t")
    return out


# ---------------------------------------------------------------- messages


def test_single_turn_messages_are_exact(tmp_path, tiny_model_dir):
    out = fmt(tmp_path, [cats_thread()], tiny_model_dir, test_fraction=0.0, val_fraction=0.0)
    train = read(out, "train.jsonl")
    assert [e["id"] for e in train] == ["t1:a5", "t1:e1"]
    bob = train[0]
    assert bob["messages"] == [
        {"role": "user", "content": PROMPT},  # the OP's edit paragraphs are gone
        {"role": "assistant", "content": "Walks make you healthier and dogs love you."},
    ]
    assert bob["thread_id"] == "t1"
    meta = bob["metadata"]
    assert (meta["view"], meta["recipient"], meta["n_turns"], meta["created_utc"], meta["split"]) == (
        "single",
        "bob",
        2,
        1.4e9,
        "train",
    )
    assert meta["comment_ids"] == ["a1", "a2", "a3", "a4", "a5"]
    assert train[1]["messages"][-1] == {"role": "assistant", "content": "Fish tanks are quiet and clean pets"}


def test_single_turn_branch_target_and_system_instruction(tmp_path, tiny_model_dir):
    out = fmt(
        tmp_path,
        [cats_thread()],
        tiny_model_dir,
        test_fraction=0.0,
        val_fraction=0.0,
        single_target="branch",
        instruction_role="system",
        instruction="Persuade.",
    )
    bob = read(out, "train.jsonl")[0]
    assert bob["messages"] == [
        {"role": "system", "content": "Persuade."},
        {"role": "user", "content": f"{TITLE}\n\n{POST}"},
        # the recipient's comments in the branch, quotes of the OP removed
        {
            "role": "assistant",
            "content": "Dogs are loyal.\n\nDogs can be trained to be clean too.\n\n"
            "Walks make you healthier and dogs love you.",
        },
    ]
    assert bob["metadata"]["n_turns"] == 2


def test_multi_turn_drops_or_merges_other_users(tmp_path, tiny_model_dir):
    threads = [cats_thread()]
    drop = read(
        fmt(tmp_path, threads, tiny_model_dir, "drop", view="multi", test_fraction=0.0, val_fraction=0.0), "train.jsonl"
    )[0]
    assert drop["messages"] == [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": "Dogs are loyal.\n\nDogs can be trained to be clean too."},
        {"role": "user", "content": "But dogs need walks.\n\nFair point, carol."},  # carol dropped, OP turns merged
        {"role": "assistant", "content": "Walks make you healthier and dogs love you."},
    ]
    assert drop["metadata"]["n_turns"] == 4 and drop["metadata"]["view"] == "multi"
    merge = read(
        fmt(
            tmp_path,
            threads,
            tiny_model_dir,
            "merge",
            view="multi",
            others="merge",
            keep_quotes=True,
            test_fraction=0.0,
            val_fraction=0.0,
        ),
        "train.jsonl",
    )[0]
    assert [m["content"] for m in merge["messages"][1:]] == [
        "Dogs are loyal.\n\n> Cats are clean\n\nDogs can be trained to be clean too.",
        "But dogs need walks.\n\nWalks are healthy.\n\nFair point, carol.",
        "Walks make you healthier and dogs love you.",
    ]


def test_no_chat_template_in_strings(tmp_path, tiny_model_dir):
    out = fmt(tmp_path, [cats_thread()], tiny_model_dir, view="multi")
    for example in all_examples(out):
        for m in example["messages"]:
            assert "<|im_start|>" not in m["content"] and "<|im_end|>" not in m["content"]


def test_strip_edits():
    assert strip_edits("View.\n\nEDIT: changed.\n\nmore") == "View."
    assert strip_edits("Edit 2 - thanks\n\nView.\n\nKeep this.") == "View.\n\nKeep this."
    assert strip_edits("I edited nothing.\n\nEditors are fine.") == "I edited nothing.\n\nEditors are fine."
    # a paragraph that only starts with the word is post text, not an edit (nothing after it is cut)
    post = "View.\n\nUpdate cycles for phones are too short.\n\nEdit history matters.\n\nEnd."
    assert strip_edits(post) == post
    assert strip_edits(post + "\n\n**Edit 2**: thanks all") == post
    assert strip_edits(post + "\n\n~~Edit~~ (a day later) - \u2206 to bob\n\nmore") == post
    assert strip_edits(post + "\n\n**Edit**\nthanks") == post
    assert strip_edits(post + "\n\nUPDATE thanks everyone") == post


# ---------------------------------------------------------------- filters


def test_deleted_duplicate_and_empty_targets_are_dropped_and_counted(tmp_path, tiny_model_dir):
    removed = simple_thread("t2", "[removed]")
    threads = [
        simple_thread("t0", "Dogs are great."),
        removed,
        simple_thread("t3", "A reply.", text="[deleted]"),
        simple_thread("t4", "  DOGS are\n great. "),  # same as t0 after normalization
        json.loads(json.dumps(removed)),  # the same thread twice (overlapping dumps)
        simple_thread("t6", "> only a quote of the OP"),
        simple_thread("t7", "Dogs are great.", title="CMV: something else"),  # same target, other prompt
    ]
    out = fmt(tmp_path, threads, tiny_model_dir, test_fraction=0.0, val_fraction=0.0)
    assert [e["thread_id"] for e in read(out, "train.jsonl")] == ["t0", "t7"]
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert {k: v for k, v in stats["dropped"].items() if v} == {
        "deleted_target": 1,
        "deleted_post": 1,
        "duplicate": 1,
        "duplicate_thread": 1,
        "empty_target": 1,
    }
    target = fmt(tmp_path, threads, tiny_model_dir, "by-target", dedupe="target", test_fraction=0.0, val_fraction=0.0)
    assert [e["thread_id"] for e in read(target, "train.jsonl")] == ["t0"]
    off = fmt(tmp_path, threads, tiny_model_dir, "off", dedupe="off", test_fraction=0.0, val_fraction=0.0)
    assert [e["thread_id"] for e in read(off, "train.jsonl")] == ["t0", "t4", "t7"]


def test_multi_turn_deleted_turns(tmp_path, tiny_model_dir):
    comments = [c("x1", "", "bob", "First."), c("x2", "x1", OP, "[deleted]"), c("x3", "x2", "bob", "Second.")]
    bad_op = thread("t8", comments, [("bob", ["x1", "x2", "x3"])])
    comments = [c("y1", "", "bob", "[removed]"), c("y2", "y1", OP, "Hm."), c("y3", "y2", "bob", "Second.")]
    bad_recipient = thread("t9", comments, [("bob", ["y1", "y2", "y3"])])
    out = fmt(tmp_path, [bad_op, bad_recipient], tiny_model_dir, view="multi")
    assert all_examples(out) == []
    dropped = storage.read_json(storage.join(out, "stats.json"))["dropped"]
    assert (dropped["deleted_context"], dropped["deleted_target"]) == (1, 1)


@pytest.mark.parametrize("others", ["drop", "merge"])
def test_branch_through_a_deleted_comment_keeps_it_out_of_every_turn(tmp_path, tiny_model_dir, others):
    # docs/DATA.md: a deleted comment stays in the tree (the branch runs through it) but its
    # "[deleted]"/"[removed]" text never reaches a prompt or a target.
    comments = [
        c("z1", "", "[deleted]", "[deleted]"),
        c("z2", "z1", OP, "I still think so."),
        c("z3", "z2", "bob", "Here is why not."),
        c("z4", "z3", "carol", "[removed]"),
        c("z5", "z4", OP, "Hm, go on."),
        c("z6", "z5", "bob", "Because of this."),
        c("z7", "z6", OP, "∆"),
    ]
    t = thread("td", comments, [("bob", ["z1", "z2", "z3", "z4", "z5", "z6"])], [delta("z7", "z6", "bob")])
    out = fmt(tmp_path, [t], tiny_model_dir, view="multi", others=others, test_fraction=0.0, val_fraction=0.0)
    [example] = read(out, "train.jsonl")
    assert example["metadata"]["comment_ids"] == ["z1", "z2", "z3", "z4", "z5", "z6"]
    assert example["messages"] == [
        {"role": "user", "content": f"{PROMPT}\n\nI still think so."},
        {"role": "assistant", "content": "Here is why not."},
        {"role": "user", "content": "Hm, go on."},
        {"role": "assistant", "content": "Because of this."},
    ]


def test_token_length_filter_counts_rendered_chat(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_reply = " ".join(["persuasion"] * 300)
    threads = [
        simple_thread("s1", "Short but sweet reply here."),
        simple_thread("s2", long_reply),
        simple_thread("s3", "Ok."),
    ]
    out = fmt(
        tmp_path, threads, tiny_model_dir, max_tokens=200, min_target_tokens=3, test_fraction=0.0, val_fraction=0.0
    )
    train = read(out, "train.jsonl")
    assert [e["thread_id"] for e in train] == ["s1"]
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert (stats["dropped"]["too_long"], stats["dropped"]["target_too_short"]) == (1, 1)
    rendered = tok.apply_chat_template(train[0]["messages"], tokenize=False)
    expected = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert train[0]["metadata"]["n_tokens"] == expected
    assert stats["tokens"]["kept"]["max"] == expected and stats["tokens"]["kept"]["n"] == 1
    assert stats["tokens"]["before_length_filter"]["max"] > 300  # the long one, measured before it was dropped
    assert stats["examples"] == {"train": 1, "val": 0, "test": 0}


# ---------------------------------------------------------------- splits


def many_threads(n: int, start: int = 0) -> list[dict]:
    return [simple_thread(f"m{i}", f"Reply number {i}.", created=1.4e9 + i) for i in range(start, start + n)]


def split_of(out: str) -> dict[str, str]:
    ids: dict[str, str] = {}
    for s in ("train", "val", "test"):
        for e in read(out, f"{s}.jsonl"):
            assert e["metadata"]["split"] == s
            assert ids.setdefault(e["thread_id"], s) == s  # no thread in two splits
    return ids


def test_hash_split_is_disjoint_deterministic_and_stable(tmp_path, tiny_model_dir):
    threads = many_threads(120)
    cfg = dict(test_fraction=0.2, val_fraction=0.1, seed=7)
    first = split_of(fmt(tmp_path / "a", threads, tiny_model_dir, **cfg))
    again = split_of(fmt(tmp_path / "b", threads, tiny_model_dir, **cfg))
    grown = split_of(fmt(tmp_path / "c", threads + many_threads(60, start=120), tiny_model_dir, **cfg))
    other_seed = split_of(fmt(tmp_path / "d", threads, tiny_model_dir, **{**cfg, "seed": 8}))
    assert len(first) == 120 and first == again
    assert {t: grown[t] for t in first} == first  # adding threads moves none of the old ones
    assert other_seed != first
    counts = {s: list(first.values()).count(s) for s in ("train", "val", "test")}
    assert all(n > 0 for n in counts.values()), counts
    assert first == {
        t["thread_id"]: assign_split(t["thread_id"], t["created_utc"], FormatConfig(**cfg)) for t in threads
    }
    assert (
        Path(tmp_path / "a" / "format" / "train.jsonl").read_bytes()
        == Path(tmp_path / "b" / "format" / "train.jsonl").read_bytes()
    )


def test_time_split_puts_later_threads_in_test(tmp_path, tiny_model_dir):
    cut = parse_utc("2015-05-08")
    threads = [simple_thread(f"p{i}", f"Early reply {i}.", created=cut - 86400 * (i + 1)) for i in range(40)]
    threads += [simple_thread(f"q{i}", f"Late reply {i}.", created=cut + 3600 * i) for i in range(10)]
    import datetime as dt

    cfg = FormatConfig(split="time", test_after=dt.date(2015, 5, 8), val_fraction=0.2)  # as YAML parses a date
    assert cfg.test_after == "2015-05-08"
    write_clean(tmp_path / "clean", threads)
    run_format(str(tmp_path / "clean"), str(tmp_path / "out"), cfg, tiny_model_dir)
    splits = split_of(str(tmp_path / "out"))
    assert {t for t, s in splits.items() if s == "test"} == {f"q{i}" for i in range(10)}
    assert {s for t, s in splits.items() if t.startswith("p")} == {"train", "val"}


def duel_thread(tid: str, created: float, *, winner: str | None = None, loser: str | None = "") -> dict:
    """bob wins a delta at top level; dave (if ``loser`` is not None) argues in another subtree that
    the OP answered without a delta: exactly one matched pair. The title names the thread."""
    comments = [
        c(f"{tid}w", "", "bob", winner or f"WIN point {tid}: dogs are loyal and protect you."),
        c(f"{tid}d", f"{tid}w", OP, "∆ you changed my view"),
    ]
    if loser is not None:
        comments += [
            c(f"{tid}l", "", "dave", loser or f"LOSE point {tid}: dogs are loud and smelly."),
            c(f"{tid}r", f"{tid}l", OP, "I still disagree."),
        ]
    return thread(
        tid,
        comments,
        [("bob", [f"{tid}w"])],
        [delta(f"{tid}d", f"{tid}w", "bob")],
        created=created,
        title=f"CMV: topic {tid}",
    )


def time_split_threads(n_before: int, n_after: int, cut: float) -> list[dict]:
    """Threads b0.. a day apart before ``cut`` and a0.. an hour apart from ``cut`` on (a0 exactly at it),
    plus one thread on each side with no matched loser (no pair)."""
    threads = [duel_thread(f"b{i}", cut - 86400 * (i + 1)) for i in range(n_before)]
    threads += [duel_thread(f"a{i}", cut + 3600 * i) for i in range(n_after)]
    return threads + [duel_thread("bnone", cut - 1, loser=None), duel_thread("anone", cut + 1, loser=None)]


def test_time_split_writes_train_period_pairs_tagged_by_split_and_period(tmp_path, tiny_model_dir):
    cut = parse_utc("2015-05-08")
    threads = time_split_threads(12, 5, cut)
    created = {t["thread_id"]: t["created_utc"] for t in threads}
    cfg = dict(split="time", test_after="2015-05-08", val_fraction=0.3)
    out = fmt(tmp_path, threads, tiny_model_dir, **cfg)

    after = read(out, "pairs.jsonl")
    assert [p["thread_id"] for p in after] == [f"a{i}" for i in range(5)]  # a0 was created at the cut itself
    assert all(p["split"] == "test" and p["period"] == "after" for p in after)
    before = read(out, "pairs_before.jsonl")
    assert [p["thread_id"] for p in before] == [f"b{i}" for i in range(12)]  # bnone has no matched loser
    splits = {p["thread_id"]: p["split"] for p in before}
    assert splits == {t: assign_split(t, created[t], FormatConfig(**cfg)) for t in splits}
    assert set(splits.values()) == {"train", "val"}  # both train-period splits give pairs
    for p in after + before:
        assert p["created_utc"] == created[p["thread_id"]]
        assert (p["created_utc"] >= cut) == (p["period"] == "after")
        tid = p["thread_id"]
        assert p["winner"] == f"WIN point {tid}: dogs are loyal and protect you." and p["loser_comment_ids"] == [
            f"{tid}l"
        ]
    assert all(p["period"] == "before" for p in before)
    # one matcher: the train-period pairs are the DPO preference pairs before their length filters
    prefs = {r["metadata"]["pair_id"]: r for s in ("train", "val") for r in read(out, f"{s}_preferences.jsonl")}
    assert set(prefs) == {p["pair_id"] for p in before}
    for p in before:
        assert prefs[p["pair_id"]]["chosen"][0]["content"] == p["winner"]
        assert prefs[p["pair_id"]]["rejected"][0]["content"] == p["loser"]
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert stats["pairs"] == 5 and stats["pairs_before"] == 12
    # without DPO pairs the judge still gets its train-period pairs, the same ones
    no_dpo = fmt(tmp_path, threads, tiny_model_dir, name="no_dpo", preference_pairs=False, **cfg)
    assert read(no_dpo, "pairs_before.jsonl") == before


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="format.view"):
        FormatConfig(view="dialogue")
    with pytest.raises(ConfigError, match="test_after"):
        FormatConfig(split="time")
    with pytest.raises(ConfigError, match="not a date"):
        FormatConfig(split="time", test_after="May 8")


# ---------------------------------------------------------------- pairs


def test_pairs_pick_the_most_similar_losing_branch(tmp_path, tiny_model_dir):
    out = fmt(tmp_path, [cats_thread()], tiny_model_dir, test_fraction=1.0, val_fraction=0.0)
    pairs = read(out, "pairs.jsonl")
    assert [p["pair_id"] for p in pairs] == ["t1:a5", "t1:e1"]
    bob, gina = pairs
    # bob's text shares {dogs, are, loyal, and} with dave's b1 alone: 4/19, more than with b1+b3
    # (4/21) or erin (3/20); frank (OP silent), hank (delta) and ivan (removed) are never losers.
    assert bob["loser_comment_ids"] == ["b1"] and bob["loser_author"] == "dave"
    assert bob["jaccard"] == pytest.approx(4 / 19, abs=1e-6)
    assert bob["winner"] == (
        "Dogs are loyal.\n\nDogs can be trained to be clean too.\n\nWalks make you healthier and dogs love you."
    )
    assert bob["loser"] == "Dogs are loyal friends and protect the house."
    assert bob["prompt"] == [{"role": "user", "content": PROMPT}]
    assert bob["winner_comment_ids"] == ["a1", "a2", "a3", "a4", "a5"]
    assert gina["loser_comment_ids"] == ["c1"] and gina["jaccard"] == pytest.approx(6 / 9, abs=1e-6)


def test_pairs_only_for_test_threads(tmp_path, tiny_model_dir):
    out = fmt(tmp_path, [cats_thread()], tiny_model_dir, test_fraction=0.0, val_fraction=0.0)
    assert read(out, "pairs.jsonl") == []
    stats = storage.read_json(storage.join(out, "stats.json"))
    assert stats["pairs"] == 0


# ---------------------------------------------------------------- stage behaviour


def test_outputs_manifest_and_skip(tmp_path, tiny_model_dir, capsys):
    out = fmt(tmp_path, [cats_thread()], tiny_model_dir)
    assert sorted(storage.list_files(out)) == [
        "_SUCCESS",
        "pairs.jsonl",
        "stats.json",
        "test.jsonl",
        "train.jsonl",
        "train_preferences.jsonl",
        "val.jsonl",
        "val_preferences.jsonl",
    ]
    manifest = storage.read_json(storage.join(out, "_SUCCESS"))
    assert manifest["stage"] == "format" and manifest["summary"]["examples_total"] == 2
    assert "examples: train" in capsys.readouterr().out
    before = Path(out, "_SUCCESS").read_bytes()
    again = run_format(str(tmp_path / "clean"), out, FormatConfig(), tiny_model_dir, run_id="t")
    assert Path(out, "_SUCCESS").read_bytes() == before and again == manifest  # skipped


def test_bad_input_names_file_and_line(tmp_path, tiny_model_dir):
    good = simple_thread("g1", "Fine.")
    broken = simple_thread("g2", "Fine too.")
    broken["winning_branches"][0]["comment_ids"] = ["nope"]
    src = write_clean(tmp_path / "clean", [good, broken])
    with pytest.raises(FormatInputError, match=r"conversations.jsonl.gz:2: thread g2: .*unknown comments \['nope'\]"):
        run_format(src, str(tmp_path / "out"), FormatConfig(), tiny_model_dir)
    assert not storage.exists(storage.join(str(tmp_path / "out"), "_SUCCESS"))


def test_missing_input_manifest_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "clean").mkdir()
    with pytest.raises(storage.MissingInputError):
        run_format(str(tmp_path / "clean"), str(tmp_path / "out"), FormatConfig(), tiny_model_dir)


# ---------------------------------------------------------------- on the bundled sample (real clean stage)


def test_format_on_bundled_sample(clean_output, format_output, tmp_path, tiny_model_dir):
    from cmv_core import config

    tiny_recipe = config.section(config.load_recipe(str(REPO / "configs" / "tiny.yaml")), "format", FormatConfig)
    threads = {t["thread_id"]: t for t in storage.read_jsonl(storage.join(clean_output, "conversations.jsonl.gz"))}
    branch_ids = {f"{t['thread_id']}:{b['comment_ids'][-1]}" for t in threads.values() for b in t["winning_branches"]}
    # Every winning branch is an example or a counted drop.
    stats = storage.read_json(storage.join(format_output, "stats.json"))
    examples = all_examples(format_output)
    assert len(examples) + sum(stats["dropped"].values()) == stats["winning_branches"] == len(branch_ids)
    assert {e["id"] for e in examples} <= branch_ids and len({e["id"] for e in examples}) == len(examples)
    assert stats["examples_total"] == len(examples) > 0
    split_of(format_output)  # no thread in two splits
    for e in examples:
        thread = threads[e["thread_id"]]
        rewarded = next(c for c in thread["comments"] if c["id"] == e["id"].split(":")[1])
        assert rewarded["author"] == e["metadata"]["recipient"]
        if ">" not in rewarded["body"]:
            assert e["messages"][-1] == {"role": "assistant", "content": rewarded["body"].strip()}
    for p in read(format_output, "pairs.jsonl"):
        thread = threads[p["thread_id"]]
        assert assign_split(p["thread_id"], thread["created_utc"], tiny_recipe) == "test"
        won = {d["rewarded_comment_id"] for d in thread["deltas"] if d["from_op"]}
        assert not won & set(p["loser_comment_ids"]) and p["loser_author"] != p["winner_author"]

    # The multi-turn view of the same data: roles alternate, user first, the recipient last.
    out = str(tmp_path / "multi")
    run_format(clean_output, out, FormatConfig(view="multi", test_fraction=0.3), tiny_model_dir)
    multi = all_examples(out)
    assert len(multi) > 0 and any(e["metadata"]["n_turns"] > 2 for e in multi)
    for e in multi:
        roles = [m["role"] for m in e["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2), (e["id"], roles)
        assert all(m["content"].strip() == m["content"] and m["content"] for m in e["messages"])
    assert read(out, "pairs.jsonl"), "the sample should give at least one matched pair at test_fraction 0.3"
