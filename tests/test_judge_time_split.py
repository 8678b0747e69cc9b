"""The time-split view end to end: a real format run with ``split: time`` (train-period pairs in
pairs_before.jsonl, test pairs in pairs.jsonl), then the judge against the fake OpenAI server.

The fake judge knows which thread a prompt comes from (the post's title names it): it finds the
delta winner on every pair of a thread from before the date, and on exactly half of those after it
(right on even-numbered test threads, wrong on odd ones, in both orders and on every instrument).
"""

from __future__ import annotations

import re

import pytest
from fake_openai_server import FakeOpenAI, Reply, completion, user_text, verdict_fields, verdict_json
from test_format import time_split_threads, write_clean
from test_judge import replies_shown
from test_judge_stats import cfg

from cmv_core import storage
from cmv_core.config import parse_utc
from cmv_core.format.config import FormatConfig
from cmv_core.format.stage import run_format
from cmv_core.judge import stage as judging

CUT = "2015-05-08"


def time_split_inputs(root, model: str, n_before: int, n_after: int) -> tuple[str, str]:
    """format (split: time, real stage) and generate outputs; returns (generations, data)."""
    write_clean(root / "clean", time_split_threads(n_before, n_after, parse_utc(CUT)))
    fmt, gen = str(root / "format"), str(root / "generate")
    run_format(
        str(root / "clean"), fmt, FormatConfig(split="time", test_after=CUT, val_fraction=0.3), model=model, run_id="t"
    )
    run = storage.begin_stage("generate", gen, inputs=[fmt], config={}, run_id="t")
    rows = [
        {
            "id": t["id"],
            "thread_id": t["thread_id"],
            "model": v,
            "messages": t["messages"][:-1],
            "response": f"{v.upper()} reply",
            "finish_reason": "stop",
        }
        for t in storage.read_jsonl(storage.join(fmt, "test.jsonl"))
        for v in ("base", "finetuned")
    ]
    storage.write_jsonl(storage.join(gen, "generations.jsonl"), rows)
    storage.finish_stage(run, {"rows": len(rows)})
    return gen, fmt


def era_judge(body: dict, n: int) -> Reply:
    """Right on threads bN (before the date); on threads aN (after) right iff N is even."""
    fields = verdict_fields(body)
    shown = replies_shown(body)
    m = re.search(r"CMV: topic ([ab])(\d+)", user_text(body))
    right = m is not None and (m.group(1) == "b" or int(m.group(2)) % 2 == 0)
    if len(shown) == 1:
        delta_pair = shown[0].startswith(("WIN", "LOSE"))
        score = (6 if shown[0].startswith("WIN") == right else 2) if delta_pair else 4
        return Reply(body=completion(verdict_json({k: score for k in fields})))
    if any(s.startswith("WIN") for s in shown):
        win_is_a = shown[0].startswith("WIN")
        return Reply(body=completion(verdict_json({"winner": "A" if win_is_a == right else "B"})))
    return Reply(body=completion(verdict_json({"winner": "A"})))


def judge_config(srv, **kw):
    return cfg(
        srv,
        comparisons=[["finetuned", "base"]],
        length_probe_items=0,
        nondelta_reference=False,
        grade_human=False,
        **kw,
    )


def test_time_split_judges_train_period_pairs_and_detects_a_judge_that_knows_the_old_threads(tmp_path, tiny_model_dir):
    gen, fmt = time_split_inputs(tmp_path, tiny_model_dir, n_before=18, n_after=16)
    assert len(list(storage.read_jsonl(storage.join(fmt, "pairs_before.jsonl")))) == 18
    out = str(tmp_path / "judge")
    with FakeOpenAI(era_judge) as srv:
        judging.run_judge(gen, fmt, out, judge_config(srv))
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["time_split_utc"] == parse_utc(CUT)
    # the judge reads the OP's post, not our instruction to the model (found in a real format manifest)
    instruction = FormatConfig().instruction
    asked = [m["content"] for body in srv.requests for m in body["messages"] if m["role"] == "user"]
    assert asked and all(instruction not in text for text in asked)
    assert any("## Original post by the OP\nCMV:" in text for text in asked)

    # every instrument judged both groups; the train-period sample is as large as the test pairs (16 of 18)
    rows = [r for r in storage.read_jsonl(storage.join(out, "judgments.jsonl")) if "pair_id" in r]
    for kind, instrument in (("calibration", None), ("validation", "pairwise"), ("validation", "single")):
        mine = [r for r in rows if r["kind"] == kind and r.get("instrument") == instrument]
        after = [r for r in mine if r["period"] == "after"]
        before = [r for r in mine if r["period"] == "before"]
        assert sorted(r["thread_id"] for r in after) == sorted(f"a{i}" for i in range(16))
        assert all(r["split"] == "test" for r in after)
        assert len(before) == 16 and {r["thread_id"] for r in before} <= {f"b{i}" for i in range(18)}
        assert {r["split"] for r in before} == {"train", "val"}
    for name in ("forced_choice", "pairwise", "single"):
        t = rep["instruments"][name]["time_split"]
        assert (t["before"]["n_pairs"], t["before"]["n_threads"]) == (16, 16)
        assert (t["after"]["n_pairs"], t["after"]["n_threads"]) == (16, 16)
        assert t["before"]["accuracy"] == 1.0 and t["after"]["accuracy"] == 0.5
        assert t["difference"]["estimate"] == pytest.approx(0.5)
        assert t["difference"]["p_value"] < 0.01 and t["difference"]["ci95"][0] > 0
        assert t["reading"] == "better_before", name
        # the instrument's own numbers stay on the test pairs
        assert rep["instruments"][name]["n_pairs"] == 16 and rep["instruments"][name]["accuracy"] == 0.5
    # the headline calibration is on the test pairs only, as without a time split
    assert rep["calibration"]["n_pairs"] == 16 and rep["calibration"]["accuracy"]["rate"] == 0.5
    md = storage.read_text(storage.join(out, "report.md"))
    assert f"### Time split: threads before and after {CUT}" in md
    assert md.count("consistent with the judge having read those threads in pretraining") == 4  # 3 rows + conclusion
    head = md.split("\n## ")[0]
    assert "Judge agreement with real deltas 50% [" in head  # the headline line, test pairs
    assert f"Time split at {CUT}: judge agreement with real deltas 100% on 16 pairs before vs 50% on 16 after" in head


def test_time_split_caps_each_group_and_says_when_a_sample_is_too_small(tmp_path, tiny_model_dir):
    gen, fmt = time_split_inputs(tmp_path, tiny_model_dir, n_before=8, n_after=6)
    with FakeOpenAI(era_judge) as srv:
        small = str(tmp_path / "small")
        judging.run_judge(gen, fmt, small, judge_config(srv, max_calibration_pairs=3))  # per group
        capped = str(tmp_path / "capped")
        judging.run_judge(gen, fmt, capped, judge_config(srv, max_calibration_pairs=3, max_before_pairs=5))
    rep = storage.read_json(storage.join(small, "report.json"))
    for name in ("forced_choice", "pairwise", "single"):
        t = rep["instruments"][name]["time_split"]
        assert t["before"]["n_pairs"] == 3 and t["after"]["n_pairs"] == 3
        assert t["before"]["accuracy"] == 1.0  # a difference in the data, but too few threads to tell
        assert t["reading"] == "too_few"
    md = storage.read_text(storage.join(small, "report.md"))
    assert md.count("too few pairs to tell (threads: 3 before, 3 after; at least 10 in each needed)") == 4
    t = storage.read_json(storage.join(capped, "report.json"))["instruments"]["forced_choice"]["time_split"]
    assert (t["before"]["n_pairs"], t["after"]["n_pairs"], t["reading"]) == (5, 3, "too_few")
