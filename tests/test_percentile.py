"""Percentile vs humans (README, "Reading the report"): the rank rule on planted cases, the share of the
gap closed, and the judge end to end against the fake OpenAI server: the human replies of each test
thread graded in the single-reply form, counted in the dry run, and the headline table of report.md."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAI, Reply, completion, verdict_fields, verdict_json
from test_judge import INSTRUCTION, config, judgments, replies_shown, write_stage_outputs

from cmv_core import storage
from cmv_core.judge import stage as judging
from cmv_core.report.percentile import gap_share, percentile_among

# ---------------------------------------------------------------- the rank rule


def test_percentile_planted_cases():
    assert percentile_among(7.0, [1.0, 2.0, 3.0]) == 100.0  # above every human
    assert percentile_among(0.0, [1.0, 2.0, 3.0]) == 0.0  # below every human
    assert percentile_among(2.0, [1.0, 2.0, 3.0]) == 50.0  # tied with the median of an odd set
    assert percentile_among(2.0, [2.0, 2.0]) == 50.0  # ties split: half above, half below
    assert percentile_among(4.0, [2.0, 4.0, 4.0, 6.0]) == 50.0  # 1 below + 2 ties / 2, of 4
    assert percentile_among(3.0, [1.0, 2.0, 3.0, 5.0]) == 62.5
    assert percentile_among(3.0, []) is None


def test_gap_share_and_its_interval():
    # Threads a, b, c: model - base = 50, 75, 50; winners - base = 50, 75, 0: 175/3 over 125/3.
    model, base, ceiling = {"a": 75, "b": 100, "c": 50}, {"a": 25, "b": 25, "c": 0}, {"a": 75, "b": 100, "c": 0}
    g = gap_share(model, base, ceiling)
    assert g["estimate"] == pytest.approx(1.4) and g["n_threads"] == 3
    # The gap (25 [-...]) cannot be told from zero at 3 threads: Fieller's interval is unbounded.
    assert g["ci95"] is None
    # Ten threads each closing 40% +- 10% of a gap of 40 +- 4: a bounded interval around 0.4.
    base = {str(i): 10.0 for i in range(10)}
    ceiling = {str(i): 50.0 + (4 if i % 2 else -4) for i in range(10)}
    model = {str(i): 10.0 + (ceiling[str(i)] - 10.0) * (0.4 + (0.1 if i % 3 else -0.1)) for i in range(10)}
    g = gap_share(model, base, ceiling)
    assert g["estimate"] == pytest.approx((sum(model.values()) / 10 - 10.0) / (sum(ceiling.values()) / 10 - 10.0))
    lo, hi = g["ci95"]
    assert lo < g["estimate"] < hi and 0.3 < lo and hi < 0.55
    assert gap_share({"a": 50}, {"a": 60}, {"a": 55})["estimate"] is None  # base above the winners: no gap


# ---------------------------------------------------------------- end to end

# Each reply text starts with "S<k>": the judge grades it k on every criterion and prefers the higher k.
# Thread t0 has two winning branches (items t0:w1, t0:w2), t1 and t2 one each.
THREADS = {
    "t0": {"pairs": [("w1", "S6 win", "S2 lose"), ("w2", "S4 win", "S4 lose")], "ft": "S5 ft", "base": "S4 base"},
    "t1": {"pairs": [("w1", "S5 win", "S3 lose")], "ft": "S7 ft", "base": "S3 base"},
    "t2": {"pairs": [("w1", "S3 win", "S5 lose")], "ft": "S4 ft", "base": "S2 base"},
}


def make_thread_inputs(root: Path) -> tuple[str, str]:
    fmt, gen = str(root / "format"), str(root / "generate")
    run = storage.begin_stage(
        "format", fmt, inputs=[], config={"format": {"instruction": INSTRUCTION, "instruction_role": "user"}}
    )
    tests, pairs, gens = [], [], []
    for t, spec in THREADS.items():
        prompt = [{"role": "user", "content": f"{INSTRUCTION}\n\nCMV: topic {t}\n\nI believe thing {t}."}]
        for c, win, lose in spec["pairs"]:
            item = f"{t}:{c}"
            tests.append({"id": item, "thread_id": t, "messages": prompt + [{"role": "assistant", "content": win}]})
            pairs.append(
                {
                    "pair_id": item,
                    "thread_id": t,
                    "prompt": prompt,
                    "winner": win,
                    "loser": lose,
                    "winner_comment_ids": [c],
                    "loser_comment_ids": [f"{c}x"],
                }
            )
            for v in ("base", "finetuned"):
                text = spec["ft" if v == "finetuned" else "base"]
                gens.append({"id": item, "thread_id": t, "model": v, "messages": prompt, "response": text})
    return write_stage_outputs(run, fmt, gen, tests, pairs, gens)


def grade(text: str) -> int:
    return int(text.split()[0][1:])


def graded_judge(body: dict, n: int) -> Reply:
    fields, shown = verdict_fields(body), replies_shown(body)
    if len(shown) == 1:
        verdict = {k: grade(shown[0]) for k in fields}
    else:
        a, b = grade(shown[0]), grade(shown[1])
        verdict = {"winner": "A" if a > b else "B" if b > a else ("tie" if "tie" in fields["winner"] else "A")}
    return Reply(body=completion(verdict_json(verdict), prompt_tokens=100, completion_tokens=10))


def headline_table(md: str) -> list[str]:
    lines = md.splitlines()
    start = lines.index("| variant | percentile vs humans | win rate vs base | Bradley-Terry strength |")
    return lines[start + 2 : start + 5]


def test_percentile_end_to_end_headline_table_and_dry_run(tmp_path):
    gen, fmt = make_thread_inputs(tmp_path)
    out = str(tmp_path / "judge")
    with FakeOpenAI(graded_judge) as srv:
        # One call in flight: a repeated prompt is then answered by the cache, as the dry run counts it
        # (run_calls does not merge two identical calls in flight at once).
        cfg = config(
            srv,
            human_replies=10,
            concurrency=1,
            comparisons=[["finetuned", "base"], ["finetuned", "human"], ["base", "human"]],
        )
        off = judging.dry_run(gen, fmt, out, config(srv, human_replies=0, comparisons=cfg.comparisons))
        dry = judging.dry_run(gen, fmt, out, cfg)
        # 8 distinct human replies (t0: 2 winners + 2 losers; t1, t2: 1 + 1) are 8 more calls; the 4
        # winners are the `human` variant's own calls (same post, same text), sent once: 4 new calls.
        assert dry["calls"] - off["calls"] == 8 and dry["new_calls"] - off["new_calls"] == 4
        assert srv.count == 0
        judging.run_judge(gen, fmt, out, cfg, run_id="r1")
        assert srv.count == dry["new_calls"]

    rows = judgments(out)
    humans = [r for r in rows if r["kind"] == "human_reply"]
    assert len(humans) == 8 and sum(r["delta"] for r in humans) == 4
    assert {r["id"] for r in humans if r["thread_id"] == "t0"} == {
        f"human_reply:t0:{c}" for c in ("w1", "w1x", "w2", "w2x")
    }
    rep = storage.read_json(storage.join(out, "report.json"))
    pct = rep["percentile"]
    # finetuned: t0 5 among {6, 2, 4, 4} = 75, t1 7 among {5, 3} = 100, t2 4 among {3, 5} = 50
    # base: t0 4 -> (1 + 2/2)/4 = 50, t1 3 -> 25, t2 2 -> 0
    # winners among the other humans: t0 (6 -> 100, 4 among {6, 2, 4} -> 50) = 75, t1 100, t2 0
    assert pct["variants"]["finetuned"]["estimate"] == pytest.approx(75.0)
    assert pct["variants"]["base"]["estimate"] == pytest.approx(25.0)
    assert pct["ceiling"]["estimate"] == pytest.approx(175 / 3)
    assert pct["gap_closed"]["finetuned"]["estimate"] == pytest.approx(50 / (175 / 3 - 25))
    assert pct["vs_base"]["finetuned"]["estimate"] == pytest.approx(50.0)
    assert {v: x["n_threads"] for v, x in pct["variants"].items()} == {"base": 3, "finetuned": 3}

    md = storage.read_text(storage.join(out, "report.md"))
    table = headline_table(md)
    assert [line.split(" | ")[0] for line in table] == ["| base", "| finetuned", "| human delta winners"]
    assert table[0].startswith("| base | 25.0 [") and table[0].count("(3 threads)") == 2  # win rate vs itself: -
    assert table[1].startswith("| finetuned | 75.0 [") and "| 1.00 [1.00, 1.00] (3 threads) |" in table[1]
    assert table[2].startswith("| human delta winners | 58.3 [") and "| 0.92 [" in table[2]
    sentence = next(line for line in md.splitlines() if line.startswith("`finetuned`'s replies rank"))
    assert sentence.startswith("`finetuned`'s replies rank at percentile 75 among their thread's human replies")
    assert sentence.endswith("over 3 threads: too few threads to tell an effect of this size from zero.")
    print("\n".join(md.splitlines()[:12]))


def test_unparsable_human_grade_is_a_counted_failure(tmp_path):
    gen, fmt = make_thread_inputs(tmp_path)
    out = str(tmp_path / "judge")

    def judge(body: dict, n: int) -> Reply:
        if replies_shown(body) == ("S4 lose",):
            return Reply(body=completion("no verdict here"))
        return graded_judge(body, n)

    with FakeOpenAI(judge) as srv:
        judging.run_judge(gen, fmt, out, config(srv, human_replies=10, parse_retries=0), run_id="r1")
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["failures"]["by_kind"] == {"human_reply": 1} and rep["failures"]["unparseable"] == 1
    pct = rep["percentile"]
    assert pct["n_human_replies"] == 8 and pct["n_human_failed"] == 1
    # t0 without the failed 4: finetuned 5 among {6, 2, 4} = 66.7, so (66.7 + 100 + 50) / 3
    assert pct["variants"]["finetuned"]["estimate"] == pytest.approx((200 / 3 + 150) / 3)
