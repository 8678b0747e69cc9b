"""Published pair sets as judge instrument benchmarks (cmv_core/cmv/pairs.py, judge.pair_files).

The fixtures are written here in the released formats: Tan et al. (2016)'s pair data (one JSON
object per original post and pair, with ``positive`` and ``negative`` each holding a ``comments``
list of reddit comment dicts; plain and bz2) and ConvoKit's winning-args corpus (a directory with
utterances.jsonl and conversations.json), both built from the same pairs.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI
from test_judge import config, make_inputs, smart_judge

from cmv_core.cmv import pairs as pairs_mod
from cmv_core.judge import stage as judging
from cmv_core.judge.config import InputError, JudgeConfig
from cmv_core.judge.inputs import load_pair_file, pair_files_summary
from cmv_core.judge.plan import plan_calls

# the prompts' own instructions say "delta"; the OP's "EDIT: delta awarded ..." must not reach them
LEAKS = ("\u2206", "\u0394", "12\u2206", "&#8710;", "delta awarded", "Thanks")

# (post, title, OP text, winner body, loser body): the delta winner is longer in p0, p2; shorter in p1
PAIRS = [
    ("t3_aa", "CMV: cats", "Cats are best.\n\nEDIT: delta awarded to u/x, thanks", "WIN cats " + "w " * 8, "LOSE no"),
    ("t3_aa", "CMV: cats", "Cats are best.", "WIN short", "LOSE long " + "x " * 9),
    (
        "t3_bb",
        "CMV: dogs",
        "Dogs &amp; more.",
        "WIN dogs " + "y " * 5 + "\n\nThanks \u2206\n\n> you said \u0394\n\nok",
        "LOSE d",
    ),
    # skipped: a deleted loser, then a side without comments
    ("t3_cc", "CMV: fish", "Fish.", "WIN fish", "[deleted]"),
    ("t3_dd", "CMV: birds", "Birds.", "WIN birds", None),
]


def comment(cid: str, body: str, author: str) -> dict:
    # author_flair_text is the user's delta count on CMV: it shows who won deltas before
    return {"id": cid, "name": f"t1_{cid}", "body": body, "author": author, "author_flair_text": "12\u2206"}


def tan_lines(pairs=PAIRS) -> list[dict]:
    lines = []
    for i, (post, title, text, win, lose) in enumerate(pairs):
        side = {"positive": [comment(f"p{i}", win, "alice")], "negative": [comment(f"n{i}", lose, "bob")]}
        if lose is None:
            side["negative"] = []
        lines.append(
            {
                "op_author": "op",
                "op_text": text,
                "op_title": title,
                "op_name": post,
                **{k: {"author": "x", "comments": c} for k, c in side.items()},
            }
        )
    return lines


def write_tan(path: Path, compress: bool) -> str:
    data = "".join(json.dumps(line) + "\n" for line in tan_lines()).encode()
    path.write_bytes(bz2.compress(data) if compress else data)
    return str(path)


def write_convokit(root: Path) -> str:
    root.mkdir()
    utterances, conversations = [], {}
    for i, line in enumerate(tan_lines()):
        conv = line["op_name"][3:]
        pair_id = f"pair_{i}"
        c = conversations.setdefault(
            conv,
            {"op-userID": "op", "op-text-body": line["op_text"], "op-title": line["op_title"], "pair_ids": []},
        )
        c["pair_ids"].append(pair_id)
        c["train"] = 0
        if not any(u["id"] == conv for u in utterances):
            utterances.append(
                {"id": conv, "speaker": "op", "conversation_id": conv, "reply_to": None, "text": line["op_text"]}
                | {"meta": {"success": None, "pair_ids": []}}
            )
        for key, success in (("positive", 1), ("negative", 0)):
            parent = conv
            for cm in line[key]["comments"]:
                meta = {"success": success, "pair_ids": [pair_id], "author_flair_text": cm["author_flair_text"]}
                utterances.append(
                    {"id": cm["id"], "speaker": cm["author"], "conversation_id": conv, "reply_to": parent}
                    | {"text": cm["body"], "meta": meta}
                )
                parent = cm["id"]
    (root / "utterances.jsonl").write_text("".join(json.dumps(u) + "\n" for u in utterances))
    (root / "conversations.json").write_text(json.dumps(conversations))
    return str(root)


def content(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in ("uri", "source", "format")}


def test_loaders_detect_the_format_and_agree(tmp_path):
    tan = load_pair_file(write_tan(tmp_path / "heldout_pair_data.jsonlist", compress=False), None, 0)
    tan_bz2 = load_pair_file(write_tan(tmp_path / "heldout.bz2", compress=True), None, 0)
    convo = load_pair_file(write_convokit(tmp_path / "winning-args-corpus"), None, 0)
    assert {p["format"] for p in tan + tan_bz2} == {pairs_mod.TAN}
    assert {p["format"] for p in convo} == {pairs_mod.CONVOKIT}
    assert [content(p) for p in tan] == [content(p) for p in tan_bz2] == [content(p) for p in convo]
    judged = [p for p in tan if "skip" not in p]
    assert [p["pair_id"] for p in judged] == ["aa:p0:n0", "aa:p1:n1", "bb:p2:n2"]
    assert [p["thread_id"] for p in judged] == ["aa", "aa", "bb"]
    assert all(p["winner"].startswith("WIN") and p["loser"].startswith("LOSE") for p in judged)
    assert judged[2]["prompt"] == [{"role": "user", "content": "CMV: dogs\n\nDogs & more."}]
    summary = pair_files_summary(convo)["winning-args-corpus"]
    assert summary["n_judged"] == 3
    assert summary["skipped"] == {"deleted_or_empty_reply": 1, "side_without_comments": 1}
    capped = pair_files_summary(load_pair_file(str(tmp_path / "heldout.bz2"), 2, 0))["heldout.bz2"]
    assert capped["n_judged"] == 2 and capped["skipped"]["over_max_pair_file_pairs"] == 1


def test_unknown_content_is_an_input_error(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "winner": "a"}) + "\n")
    with pytest.raises(InputError, match="not a known pair format"):
        load_pair_file(str(bad), None, 0)


def test_label_leaks_never_reach_a_prompt(tmp_path):
    pairs = load_pair_file(write_tan(tmp_path / "t.jsonlist.bz2", compress=True), None, 0)
    calls, builders, _ = plan_calls([], pairs, JudgeConfig(pairwise=True, single=True))
    # forced choice (2 orders), pairwise (2 orders), rubric (winner, loser) on each of the 3 pairs
    assert len(calls) == 18 and len(builders) == 9
    texts = [m["content"] for messages, _ in calls for m in messages]
    for leak in LEAKS:
        assert not any(leak.lower() in t.lower() for t in texts), leak
    assert any("> you said" in t for t in texts)  # the quote stays, only its token goes


def test_cmv_judge_scores_every_instrument_on_pair_files(tmp_path):
    gen, fmt = make_inputs(tmp_path)
    tan = write_tan(tmp_path / "heldout_pair_data.jsonlist.bz2", compress=True)
    with FakeOpenAI(smart_judge) as srv:
        cfg = config(srv, pair_files=[tan], validate_instruments=True)
        judging.run_judge(gen, fmt, str(tmp_path / "judge"), cfg)
        sent = [m["content"] for body in srv.requests for m in body["messages"]]
    report = json.loads((tmp_path / "judge" / "report.json").read_text())
    assert report["calibration"]["n_pairs"] == 3  # the headline stays on the format stage's own pairs
    block = report["pair_files"]["heldout_pair_data.jsonlist.bz2"]
    assert block["format"] == pairs_mod.TAN and block["n_judged"] == 3
    assert block["skipped"] == {"deleted_or_empty_reply": 1, "side_without_comments": 1}
    inst = block["instruments"]
    assert sorted(inst) == ["forced_choice", "length", "pairwise", "single"]
    for name in ("forced_choice", "pairwise", "single"):
        assert (inst[name]["n_pairs"], inst[name]["n_threads"], inst[name]["accuracy"]) == (3, 2, 1.0), name
        assert inst[name]["vs_length"]["discordant_first_better"] == 1  # p1: the judge right, length wrong
    # length: longer wins; thread aa has p0 right, p1 wrong (mean 1/2), thread bb right: (1/2 + 1) / 2
    assert inst["length"]["accuracy"] == pytest.approx(0.75)
    diffs = [8, -9, 9]  # winner - loser words, per pair
    pairs = [(x, y) for x in diffs for y in (-d for d in diffs)]
    assert inst["length"]["auc"] == pytest.approx(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / 9)
    md = (tmp_path / "judge" / "report.md").read_text()
    assert "- pairs judged: 3; skipped: 2 (deleted_or_empty_reply 1, side_without_comments 1)" in md
    for leak in LEAKS:
        assert not any(leak.lower() in t.lower() for t in sent), leak
