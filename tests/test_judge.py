"""The judge stage against a real HTTP server on loopback (tests/fake_openai_server.py).

Inputs are built here as the generate and format stages write them (jsonl + _SUCCESS). The
server's handler plays a judge whose answers depend on what it is shown, so the tests can
check retries (server-side request counts), the cache (no new requests on rerun), failure
accounting, the position swap and the log-probability-weighted score.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from fake_openai_server import (
    FakeOpenAI,
    Reply,
    completion,
    rate_limited,
    server_error,
    token_logprobs,
    user_text,
    verdict_fields,
    verdict_json,
)

from cmv_core import storage
from cmv_core.judge import cache as judge_cache
from cmv_core.judge import stage as judging
from cmv_core.judge.cache import ResponseCache, cache_key
from cmv_core.judge.config import CRITERIA, InputError, JudgeCallError, JudgeConfig, JudgeFailed, VerdictError
from cmv_core.judge.parse import choice_probabilities, expected_score, parse_verdict
from cmv_core.judge.prompts import CALIBRATION_FORM, PAIRWISE_FORM, single_form, single_messages

INSTRUCTION = (
    "Below is a post from the Change My View subreddit. Write a response that you think will change the author's view."
)
N_ITEMS = 3


# ---------------------------------------------------------------- fixtures: stage outputs


def make_inputs(root: Path, n: int = N_ITEMS, variants=("base", "finetuned")) -> tuple[str, str]:
    """A format output (test.jsonl, pairs.jsonl) and a generate output, each with its _SUCCESS."""
    fmt, gen = str(root / "format"), str(root / "generate")
    run = storage.begin_stage(
        "format",
        fmt,
        inputs=[],
        config={"format": {"instruction": INSTRUCTION, "instruction_role": "user"}},
        run_id="t",
    )
    tests, pairs, gens = [], [], []
    for i in range(n):
        prompt = [{"role": "user", "content": f"{INSTRUCTION}\n\nCMV: topic {i}\n\nI believe thing {i}."}]
        tests.append(
            {
                "id": f"t{i}:c{i}",
                "thread_id": f"t{i}",
                "messages": prompt + [{"role": "assistant", "content": f"HUMAN reply {i}"}],
            }
        )
        # The delta winner is longer than the loser in pairs 0 and 1, shorter in pair 2.
        win = f"WIN argument {i} " + ("with many extra words " * (3 if i < 2 else 0))
        lose = f"LOSE argument {i} " + ("padding " * (1 if i < 2 else 20))
        pairs.append({"pair_id": f"t{i}:c{i}", "thread_id": f"t{i}", "prompt": prompt, "winner": win, "loser": lose})
        for v in variants:
            tag = {"base": "BASE", "finetuned": "FT"}[v]
            gens.append(
                {
                    "id": f"t{i}:c{i}",
                    "thread_id": f"t{i}",
                    "model": v,
                    "messages": prompt,
                    "response": f"{tag} reply {i}",
                    "finish_reason": "stop",
                    "prompt_tokens": 20,
                    "completion_tokens": 3,
                }
            )
    return write_stage_outputs(run, fmt, gen, tests, pairs, gens)


def write_stage_outputs(run, fmt: str, gen: str, tests: list, pairs: list, gens: list) -> tuple[str, str]:
    """Finish the format stage ``run`` with test.jsonl and pairs.jsonl, then a generate stage on it."""
    storage.write_jsonl(storage.join(fmt, "test.jsonl"), tests)
    storage.write_jsonl(storage.join(fmt, "pairs.jsonl"), pairs)
    storage.finish_stage(run, {"test": len(tests)})
    run = storage.begin_stage("generate", gen, inputs=[fmt], config={}, run_id="t")
    storage.write_jsonl(storage.join(gen, "generations.jsonl"), gens)
    storage.finish_stage(run, {"rows": len(gens)})
    return gen, fmt


def replies_shown(body: dict) -> tuple[str, str] | tuple[str]:
    """The reply (or replies A, B) in the judge prompt; re-asks append messages after it."""
    text = next(m["content"] for m in body["messages"] if m["role"] == "user")
    two = re.search(r"## Reply A\n(.*)\n\n## Reply B\n(.*)$", text, re.S)
    if two:
        return two.group(1).strip(), two.group(2).strip()
    return (re.search(r"## Reply to evaluate\n(.*)$", text, re.S).group(1).strip(),)


SCORE = {"FT": 6, "BASE": 3, "HUMAN": 5, "WIN": 5, "LOSE": 2}


def smart_judge(body: dict, n: int) -> Reply:
    """Scores FT 6, BASE 3, HUMAN 5; prefers FT over BASE in either order; is position-biased
    (always "A") on FT vs HUMAN; finds the delta winner (marked WIN) in either order."""
    fields = verdict_fields(body)
    shown = replies_shown(body)
    if len(shown) == 1:
        tag = shown[0].split()[0]
        verdict = {k: SCORE[tag] for k in fields}
    elif "WIN" in shown[0] or "WIN" in shown[1]:
        verdict = {"winner": "A" if "WIN" in shown[0] else "B"}
    elif {shown[0].split()[0], shown[1].split()[0]} == {"FT", "BASE"}:
        verdict = {"winner": "A" if shown[0].startswith("FT") else "B"}
    else:
        verdict = {"winner": "A"}
    return Reply(body=completion(verdict_json(verdict), prompt_tokens=1000, completion_tokens=50))


@pytest.fixture()
def inputs(tmp_path):
    return make_inputs(tmp_path)


def judge_argv(gen: str, fmt: str, out, srv: FakeOpenAI) -> list[str]:
    """``cmv judge`` of the test inputs with the tiny recipe, against the fake OpenAI server."""
    from conftest import CONFIGS

    return [
        "judge",
        "--generations",
        gen,
        "--data",
        fmt,
        "--output",
        str(out),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--set",
        "judge.backend=openai",
        "--set",
        "judge.model=gpt-4o-mini",
        "--set",
        f"judge.base_url={srv.base_url}",
    ]


def config(server: FakeOpenAI, **kw) -> JudgeConfig:
    # The original three kinds of judgment only; the validation, probe and reference defaults are
    # tested on their own below.
    base = dict(
        backend="openai",
        model="gpt-4o-mini",
        base_url=server.base_url,
        concurrency=4,
        max_retries=4,
        timeout_s=5.0,
        bootstrap_samples=200,
        comparisons=[["finetuned", "base"], ["finetuned", "human"]],
        validate_instruments=False,
        length_probe_items=0,
        nondelta_reference=False,
        human_replies=0,  # the percentile's human grades: tests/test_percentile.py
    )
    return JudgeConfig(**{**base, **kw})


def judgments(out: str) -> list[dict]:
    return list(storage.read_jsonl(storage.join(out, "judgments.jsonl")))


SECTIONS = [
    "# CMV persuasion: judge report",
    "## How far to trust the judge (calibration on human pairs)",
    "## Single-answer grades (mean, 95% CI)",
    "## Every instrument on real delta pairs",
    "## Paired score differences (a - b on the same prompts; per-thread means)",
    "## Pairwise (each pair judged in both orders; disagreement counts as a tie)",
    "## Length and style control",
    "## A scale anchored on people (Bradley-Terry over every pairwise verdict)",
    "## Failures (excluded from every score, never scored as a number)",
    "## Usage",
    "## Plots",
]


def assert_report_counts(md: str, rows: list[dict], requests: int) -> None:
    """report.md has every section of a full run, in order, and each shows the counts that
    judgments.jsonl gives (counted here, not read from report.json)."""
    assert [line for line in md.splitlines() if line.startswith("#")] == SECTIONS
    body = dict(zip(SECTIONS, re.split(r"^#.*$", md, flags=re.M)[1:]))

    def has(section: str, *lines: str) -> None:
        for line in lines:
            assert line in body[section].splitlines(), (section, line)

    calls = [r for r in rows if r["kind"] == "single"] + [o for r in rows for o in r.get("orders", [])]
    failed_calls = sum(c["status"] != "ok" for c in calls)
    kind = {k: [r for r in rows if r["kind"] == k] for k in ("single", "pairwise", "calibration")}
    ok = {k: sum(r["status"] == "ok" for r in v) for k, v in kind.items()}
    has(
        SECTIONS[1], f"| pairs judged / failed | {ok['calibration']} / {len(kind['calibration']) - ok['calibration']} |"
    )
    n_cal = ok["calibration"]
    assert any(line.startswith(f"| forced_choice | {n_cal} (0 failed) |") for line in body[SECTIONS[3]].splitlines())
    for variant in sorted({r["variant"] for r in kind["single"]}):
        v_rows = [r for r in kind["single"] if r["variant"] == variant]
        n_ok = sum(r["status"] == "ok" for r in v_rows)
        assert f"| {variant} | {n_ok} / {len(v_rows) - n_ok} |" in body[SECTIONS[2]], variant
    for comparison in sorted({r["comparison"] for r in kind["pairwise"]}):
        c_rows = [r for r in kind["pairwise"] if r["comparison"] == comparison]
        a, b = c_rows[0]["a"], c_rows[0]["b"]
        n_ok, threads = sum(r["status"] == "ok" for r in c_rows), len({r["thread_id"] for r in c_rows})
        pairwise = [line for line in body[SECTIONS[5]].splitlines() if line.startswith(f"| {a} vs {b} |")]
        assert len(pairwise) == 2, comparison  # the outcome table and the preference table
        assert pairwise[0].startswith(f"| {a} vs {b} | {n_ok} |") and pairwise[0].endswith(f"| {len(c_rows) - n_ok} |")
        assert pairwise[1].endswith(f"| {threads} |")
        diffs = [line for line in body[SECTIONS[4]].splitlines() if line.startswith(f"| {a} - {b} |")]
        assert len(diffs) == len(CRITERIA) and all(d.endswith(f"| {threads} | 0 |") for d in diffs)
    has(
        SECTIONS[8],
        f"- judge calls that failed: {failed_calls} (unparseable after retries: 0, refusals: 0, transport errors: 0)",
        f"- judgments excluded: {sum(r['status'] != 'ok' for r in rows)}",
    )
    assert len(calls) == requests
    has(
        SECTIONS[9],
        f"- judge calls: {len(calls)} (0 from cache, {len(calls)} new this run)",
        f"- tokens: {sum(c['prompt_tokens'] for c in calls)} prompt, "
        f"{sum(c['completion_tokens'] for c in calls)} completion",
    )
    has(SECTIONS[10], "![pairwise.png](pairwise.png)", "![scores_histogram.png](scores_histogram.png)")


# ---------------------------------------------------------------- end to end


def test_judge_end_to_end_swap_calibration_report_and_cache(tmp_path, inputs, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gen, fmt = inputs
    out = str(tmp_path / "judge")
    with FakeOpenAI(smart_judge) as srv:
        cfg = config(srv)
        judging.run_judge(gen, fmt, out, cfg, run_id="r1")
        # single: 3 variants x 3 prompts; pairwise: 2 comparisons x 3 prompts x 2 orders; calibration: 3 x 2
        planned = 9 + 12 + 6
        assert srv.count == planned
        first_requests = list(srv.requests)

        # Every request asked for a JSON-schema-constrained answer and log-probabilities.
        for body in first_requests:
            assert body["response_format"]["type"] == "json_schema"
            assert body["logprobs"] is True and body["top_logprobs"] == cfg.top_logprobs
            assert body["model"] == "gpt-4o-mini"
            # The judge reads the post, not our instruction to the generating model.
            assert INSTRUCTION not in user_text(body) and "I believe thing" in user_text(body)

        # The position swap: every pair was shown in both orders.
        shown = [replies_shown(b) for b in first_requests if len(replies_shown(b)) == 2]
        assert len(shown) == 18
        for a, b in shown:
            assert (b, a) in shown
        for i in range(N_ITEMS):
            assert (f"FT reply {i}", f"BASE reply {i}") in shown and (f"BASE reply {i}", f"FT reply {i}") in shown
            assert (f"FT reply {i}", f"HUMAN reply {i}") in shown and (f"HUMAN reply {i}", f"FT reply {i}") in shown

        rows = judgments(out)
        rep = storage.read_json(storage.join(out, "report.json"))
        single = rep["single"]["variants"]
        assert set(single) == {"base", "finetuned", "human"}
        for variant, expected in (("finetuned", 6), ("base", 3), ("human", 5)):
            for crit in CRITERIA:
                c = single[variant]["criteria"][crit]
                assert c["mean"] == expected and c["n"] == N_ITEMS
                assert c["ci95"][0] <= c["mean"] <= c["ci95"][1]
                # this server sends no log-probabilities: no weighted score is made up
                assert c["weighted_mean"] is None and c["n_weighted"] == 0

        vs_base = rep["pairwise"]["finetuned_vs_base"]
        assert vs_base["win"]["rate"] == 1.0 and vs_base["position_consistency"]["rate"] == 1.0
        vs_human = rep["pairwise"]["finetuned_vs_human"]
        # An always-"A" judge is inconsistent on every pair: recorded as ties, not hidden.
        assert vs_human["tie"]["rate"] == 1.0 and vs_human["inconsistent"] == N_ITEMS
        assert vs_human["first_position_preference"]["rate"] == 1.0
        for p in rep["pairwise"].values():
            assert p["win"]["rate"] + p["tie"]["rate"] + p["loss"]["rate"] == pytest.approx(1.0)

        cal = rep["calibration"]
        assert cal["accuracy"]["rate"] == 1.0 and cal["accuracy_winner_second"]["rate"] == 1.0
        assert cal["length_baseline"]["rate"] == pytest.approx(2 / 3)

        # Tokens and cost: gpt-4o-mini's default price.
        assert rep["usage"]["prompt_tokens"] == 1000 * planned
        assert rep["usage"]["cost_usd"] == pytest.approx(planned * (1000 * 0.15 + 50 * 0.60) / 1e6)
        assert rep["usage"]["new_calls"] == planned and rep["failures"]["failed_calls"] == 0

        for name in ("report.md", "scores_histogram.png", "pairwise.png", "_SUCCESS"):
            assert storage.exists(storage.join(out, name)), name
        assert_report_counts(storage.read_text(storage.join(out, "report.md")), rows, planned)

        # Rerun with the same inputs and config: skipped by its _SUCCESS, no request.
        judging.run_judge(gen, fmt, out, cfg, run_id="r1")
        assert srv.count == planned
        # Forced rerun: everything comes from the cache, zero new requests, same verdicts.
        judging.run_judge(gen, fmt, out, cfg, run_id="r1", force=True)
        assert srv.count == planned
        rep2 = storage.read_json(storage.join(out, "report.json"))
        assert rep2["usage"]["new_calls"] == 0 and rep2["usage"]["cached_calls"] == planned
        assert rep2["usage"]["cost_usd_this_run"] == 0 and rep2["usage"]["cost_usd"] == rep["usage"]["cost_usd"]
        assert [r.get("scores") or r.get("outcome") for r in judgments(out)] == [
            r.get("scores") or r.get("outcome") for r in rows
        ]

        # A new rubric version invalidates the cache (the key includes it).
        monkeypatch.setattr(judge_cache, "RUBRIC_VERSION", "test-v2")
        judging.run_judge(gen, fmt, out, cfg, run_id="r1", force=True)
        assert srv.count == 2 * planned


def test_client_retries_429_500_and_timeouts(tmp_path, inputs):
    import threading
    from collections import Counter

    gen, fmt = inputs
    # The asks about one reply get, in turn: an answer slower than the timeout, 429, 429, 500, then an
    # answer. Scripted per reply and counted per reply, so an answer that happens to be slow on a
    # loaded machine can add requests only to its own count, never shift the script. (The timeout comes
    # first: the client's backoff without a retry-after header grows per retry.)
    script = [Reply(delay_s=6.0), rate_limited(), rate_limited(), server_error()]
    asked: Counter = Counter()
    lock = threading.Lock()

    def handler(body, n):
        shown = replies_shown(body)
        with lock:
            asked[shown] += 1
            k = asked[shown]
        if shown[0].startswith("BASE") and k <= len(script):
            if script[k - 1].body is not None:
                return script[k - 1]
            reply = smart_judge(body, n)
            reply.delay_s = script[k - 1].delay_s
            return reply
        return smart_judge(body, n)

    out = str(tmp_path / "judge")
    with FakeOpenAI(handler) as srv:
        cfg = config(
            srv,
            concurrency=1,
            timeout_s=2.0,
            max_retries=5,
            single=True,
            grade_human=False,
            pairwise=False,
            calibration=False,
            max_items=1,
            comparisons=[],
        )
        judging.run_judge(gen, fmt, out, cfg)
    # 2 judgments (base, finetuned on the one prompt): the scripted one took 1 + 4 client retries
    assert sorted((shown[0].split()[0], n) for shown, n in asked.items()) == [("BASE", 5), ("FT", 1)]
    rows = judgments(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["usage"]["new_calls"] == 2 and rep["failures"]["failed_calls"] == 0


def test_unparseable_verdicts_are_retried_then_counted_and_excluded(tmp_path, inputs):
    gen, fmt = inputs

    def handler(body, n):
        shown = replies_shown(body)
        if shown == ("BASE reply 1",):
            return Reply(body=completion('{"rationale": "ok", "persuasiveness": 9, "relevance": '))
        if shown == ("BASE reply 2",) and len(body["messages"]) == 2:
            # malformed at first, fine when told what was wrong
            return Reply(body=completion("I would rate this a solid five out of seven."))
        if len(shown) == 2 and shown[0] == "FT reply 0" and "BASE" in shown[1]:
            return Reply(body=completion(verdict_json({"winner": "C"})))
        return smart_judge(body, n)

    out = str(tmp_path / "judge")
    with FakeOpenAI(handler) as srv:
        cfg = config(
            srv,
            parse_retries=2,
            grade_human=False,
            calibration=False,
            comparisons=[["finetuned", "base"]],
            max_failed_fraction=0.5,
        )
        judging.run_judge(gen, fmt, out, cfg)
        bad_single = [b for b in srv.requests if replies_shown(b) == ("BASE reply 1",)]
        # asked 1 + 2 times; each re-ask shows the judge its answer and what was wrong
        assert len(bad_single) == 3
        assert bad_single[1]["messages"][-2]["role"] == "assistant"
        assert "Attempt 1 could not be used" in bad_single[1]["messages"][-1]["content"]
        assert "Attempt 2 could not be used" in bad_single[2]["messages"][-1]["content"]
        assert len([b for b in srv.requests if replies_shown(b) == ("BASE reply 2",)]) == 2
        count = srv.count

        rows = {r["id"]: r for r in judgments(out)}
        failed = rows["single:base:t1:c1"]
        assert failed["status"] == "unparseable" and failed["scores"] is None and failed["attempts"] == 3
        assert failed["raw"].startswith('{"rationale": "ok"') and "JSON" in failed["error"]
        recovered = rows["single:base:t2:c2"]
        assert recovered["status"] == "ok" and recovered["attempts"] == 2 and recovered["scores"]["fluency"] == 3
        pair0 = rows["pairwise:finetuned_vs_base:t0:c0"]
        assert pair0["status"] == "failed" and pair0["outcome"] is None
        assert pair0["orders"][0]["status"] == "unparseable" and "'C'" in pair0["orders"][0]["error"]

        rep = storage.read_json(storage.join(out, "report.json"))
        base = rep["single"]["variants"]["base"]
        assert base["n_ok"] == 2 and base["n_failed"] == 1
        assert base["criteria"]["persuasiveness"]["mean"] == 3  # the failure is excluded, not scored
        assert rep["pairwise"]["finetuned_vs_base"]["n"] == 2 and rep["pairwise"]["finetuned_vs_base"]["n_failed"] == 1
        assert rep["failures"]["unparseable"] == 2 and rep["failures"]["excluded_judgments"] == 2
        assert "never scored" in storage.read_text(storage.join(out, "report.md"))

        # The failed asks were cached too: a rerun replays them and asks nothing new.
        judging.run_judge(gen, fmt, out, cfg, force=True)
        assert srv.count == count


def test_transport_errors_are_failures_not_cached_and_too_many_fail_the_stage(tmp_path, inputs):
    gen, fmt = inputs
    state = {"broken": True}

    def handler(body, n):
        shown = replies_shown(body)
        if state["broken"] and shown == ("FT reply 0",):
            return Reply(status=500, body={"error": {"message": "boom"}}, headers={"retry-after-ms": "1"})
        if state["broken"] and shown == ("FT reply 1",):
            return Reply(raw=b"{this is not json")
        return smart_judge(body, n)

    out = str(tmp_path / "judge")
    with FakeOpenAI(handler) as srv:
        cfg = config(srv, max_retries=2, grade_human=False, pairwise=False, calibration=False, max_failed_fraction=0.2)
        with pytest.raises(JudgeFailed, match="2 of 6 judge calls failed"):
            judging.run_judge(gen, fmt, out, cfg)
        assert len([b for b in srv.requests if replies_shown(b) == ("FT reply 0",)]) == 3  # 1 + 2 client retries
        assert not storage.exists(storage.join(out, "_SUCCESS"))
        rows = {r["id"]: r for r in judgments(out)}
        assert rows["single:finetuned:t0:c0"]["status"] == "error" and "500" in rows["single:finetuned:t0:c0"]["error"]
        assert rows["single:finetuned:t1:c1"]["status"] == "error"

        # The server recovers: only the two failed calls are asked again.
        state["broken"] = False
        before = srv.count
        judging.run_judge(gen, fmt, out, cfg)
        assert srv.count == before + 2
        assert storage.exists(storage.join(out, "_SUCCESS"))
        assert all(r["status"] == "ok" for r in judgments(out))


def test_probability_weighted_score_from_logprobs(tmp_path, inputs):
    gen, fmt = inputs
    dist = {"4": 0.2, "5": 0.5, "6": 0.3}

    def handler(body, n):
        fields = verdict_fields(body)
        if "persuasiveness" in fields:
            content = verdict_json({k: 5 for k in fields}, rationale='I quote "persuasiveness": 1 here.')
            return Reply(body=completion(content, logprobs=token_logprobs(content, {"persuasiveness": dist})))
        content = verdict_json({"winner": "B"})
        return Reply(body=completion(content, logprobs=token_logprobs(content, {"winner": {"A": 0.25, "B": 0.75}})))

    out = str(tmp_path / "judge")
    with FakeOpenAI(handler) as srv:
        judging.run_judge(gen, fmt, out, config(srv, calibration=False, comparisons=[["finetuned", "base"]]))
    rows = judgments(out)
    single = [r for r in rows if r["kind"] == "single"]
    assert len(single) == 9
    for r in single:
        assert r["scores"]["persuasiveness"] == 5
        assert r["weighted_scores"]["persuasiveness"] == pytest.approx(4 * 0.2 + 5 * 0.5 + 6 * 0.3)
        assert r["score_probs"]["persuasiveness"] == pytest.approx(dist)
        assert r["weighted_scores"]["fluency"] == pytest.approx(5.0)
    pair = next(r for r in rows if r["kind"] == "pairwise")
    assert pair["orders"][0]["probs"] == pytest.approx({"A": 0.25, "B": 0.75})
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["single"]["variants"]["base"]["criteria"]["persuasiveness"]["weighted_mean"] == pytest.approx(5.1)
    assert rep["single"]["variants"]["base"]["criteria"]["persuasiveness"]["mean"] == 5


def test_s3_output_cache_survives_a_rerun(s3_bucket, tmp_path, inputs):
    gen, fmt = inputs
    out = f"{s3_bucket}/run/judge"
    with FakeOpenAI(smart_judge) as srv:
        cfg = config(srv, calibration=False, cache_flush_every=4)
        judging.run_judge(gen, fmt, out, cfg)
        count = srv.count
        assert count == 9 + 12
        shards = [f for f in storage.list_files(out) if f.startswith("cache/")]
        assert len(shards) == math.ceil(count / 4)
        judging.run_judge(gen, fmt, out, cfg, force=True)
        assert srv.count == count
    assert storage.read_json(storage.join(out, "report.json"))["usage"]["new_calls"] == 0


def test_cli_judge_against_fake_server(tmp_path, inputs):
    from conftest import run_cmv

    gen, fmt = inputs
    out = tmp_path / "judge"
    with FakeOpenAI(smart_judge) as srv:
        proc = run_cmv(
            *judge_argv(gen, fmt, out, srv),
            "--set",
            "judge.max_calibration_pairs=2",
            env={"OPENAI_API_KEY": "sk-test-secret"},
        )
        assert srv.count > 0
    assert f"report: {out}/report.md" in proc.stdout
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["summary"]["failed_calls"] == 0
    # The key is never written to any artifact or log.
    assert "sk-test-secret" not in proc.stdout + proc.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert b"sk-test-secret" not in f.read_bytes(), f


def test_refused_key_stops_the_stage_and_is_never_echoed(tmp_path, inputs):
    """A 401 is a configuration error: one clear line, exit 1, no _SUCCESS, and the key is redacted
    even from a server message that echoes it back."""
    from conftest import run_cmv

    gen, fmt = inputs
    out = tmp_path / "judge"
    secret = "sk-test-refused-4242"

    def refuse(body, n):
        return Reply(
            status=401, body={"error": {"message": f"Incorrect API key provided: {secret}", "code": "invalid_api_key"}}
        )

    with FakeOpenAI(refuse) as srv:
        proc = run_cmv(
            *judge_argv(gen, fmt, out, srv),
            env={"OPENAI_API_KEY": secret},
            check=False,
        )
        assert srv.count >= 1
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "AuthenticationError" in proc.stderr and "Incorrect API key provided: ***" in proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert not (out / "_SUCCESS").exists()
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_call_errors_are_recorded_without_the_key(tmp_path, inputs, monkeypatch):
    gen, fmt = inputs
    secret = "sk-test-echoed-777"
    monkeypatch.setenv("OPENAI_API_KEY", secret)

    def handler(body, n):
        if replies_shown(body) == ("FT reply 0",):
            return Reply(status=400, body={"error": {"message": f"bad request from key {secret}"}})
        return smart_judge(body, n)

    out = tmp_path / "judge"
    with FakeOpenAI(handler) as srv:
        judging.run_judge(
            gen,
            fmt,
            str(out),
            config(srv, grade_human=False, pairwise=False, calibration=False, max_failed_fraction=0.5),
        )
    rows = {r["id"]: r for r in judgments(str(out))}
    failed = rows["single:finetuned:t0:c0"]
    assert failed["status"] == "error" and "bad request from key ***" in failed["error"]
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_missing_api_key_is_a_clear_error(tmp_path, inputs, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    gen, fmt = inputs
    with pytest.raises(JudgeCallError, match="OPENAI_API_KEY is not set"):
        judging.run_judge(gen, fmt, str(tmp_path / "judge"), JudgeConfig())


def test_bad_generation_line_names_file_and_line(tmp_path, inputs):
    gen, fmt = inputs
    path = Path(gen) / "generations.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = json.dumps({"id": "x", "thread_id": "x", "model": "base", "messages": []})
    # rewritten by an attempt of the generate stage: an edit after _SUCCESS would be refused as tampering
    run = storage.begin_stage("generate", gen, inputs=[fmt], config={}, run_id="t", force=True)
    path.write_text("\n".join(lines) + "\n")
    storage.finish_stage(run, {})
    with FakeOpenAI(smart_judge) as srv:
        with pytest.raises(InputError, match=r"generations.jsonl: line 3: missing field\(s\) response"):
            judging.run_judge(gen, fmt, str(tmp_path / "judge"), config(srv), force=True)
        assert srv.count == 0


# ---------------------------------------------------------------- local backend


def test_local_backend_tiny_model(tmp_path, inputs, tiny_model_dir):
    gen, fmt = inputs
    out = str(tmp_path / "judge")
    cfg = JudgeConfig(
        backend="local",
        model=tiny_model_dir,
        local_rationale_tokens=3,
        max_calibration_pairs=2,
        bootstrap_samples=100,
        human_replies=0,  # the percentile's human grades: tests/test_percentile.py
    )
    est = judging.dry_run(gen, fmt, out, cfg)
    judging.run_judge(gen, fmt, out, cfg)
    summary = storage.require_success(out)["summary"]
    usage = storage.read_json(storage.join(out, "report.json"))["usage"]
    # The dry run counts prompts with the judge's own tokenizer, as the backend does: as many calls
    # as the real run, its prompt tokens within 10% of the run's, and exactly those of the distinct
    # prompts the run answered (one cache entry each). The run answered 2 prompts twice (both
    # instruments' asks were in flight at once), which the dry run counts once.
    assert est["est_prompt_tokens_by"] == "judge tokenizer" and est["calls"] == summary["calls"]
    assert abs(est["est_prompt_tokens"] - usage["prompt_tokens"]) <= 0.1 * usage["prompt_tokens"]
    cache = [json.loads(line) for f in sorted(Path(out, "cache").glob("*.jsonl")) for line in f.open()]
    assert len({e["key"] for e in cache}) == est["new_calls"]
    distinct = {e["key"]: e["completion"]["prompt_tokens"] for e in cache}
    assert est["est_prompt_tokens"] == sum(distinct.values())
    rows = judgments(out)
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in (r for r in rows if r["kind"] == "single"):
        for crit in CRITERIA:
            probs = r["score_probs"][crit]
            assert set(probs) == {str(k) for k in range(1, 8)} and sum(probs.values()) == pytest.approx(1.0)
            assert r["scores"][crit] == int(max(probs, key=probs.get))  # the most likely digit
            assert 1.0 <= r["weighted_scores"][crit] <= 7.0
    rep = storage.read_json(storage.join(out, "report.json"))
    assert rep["calibration"]["n_pairs"] == 2 and rep["usage"]["cost_usd"] == 0
    judging.run_judge(gen, fmt, out, cfg, force=True)
    assert storage.read_json(storage.join(out, "report.json"))["usage"]["new_calls"] == 0


# ---------------------------------------------------------------- units

FORM = single_form(["persuasiveness", "fluency"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"rationale": "r", "persuasiveness": 5, "fluency": 7}', {"persuasiveness": 5, "fluency": 7}),
        (
            '```json\n{"rationale": "r", "persuasiveness": "5", "fluency": 7.0}\n```',
            {"persuasiveness": 5, "fluency": 7},
        ),
    ],
)
def test_parse_verdict_accepts(text, expected):
    out = parse_verdict(text, FORM)
    assert {k: out[k] for k in FORM} == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"rationale": "r", "persuasiveness": 8, "fluency": 7}', "not an integer 1-7"),
        ('{"rationale": "r", "persuasiveness": 0, "fluency": 7}', "not an integer 1-7"),
        ('{"rationale": "r", "persuasiveness": true, "fluency": 7}', "not an integer 1-7"),
        ('{"rationale": "r", "fluency": 7}', "missing field 'persuasiveness'"),
        ('{"rationale": "r", "persuasiveness": 5, ', "no JSON object"),
        ('{"rationale": "r", "persuasiveness": 5,}', "invalid JSON"),
        ("five", "no JSON object"),
    ],
)
def test_parse_verdict_rejects(text, message):
    with pytest.raises(VerdictError, match=message):
        parse_verdict(text, FORM)


def test_parse_winner_is_case_insensitive_and_strict():
    assert parse_verdict('{"winner": "b"}', PAIRWISE_FORM)["winner"] == "B"
    assert parse_verdict('{"winner": "TIE"}', PAIRWISE_FORM)["winner"] == "tie"
    with pytest.raises(VerdictError):
        parse_verdict('{"winner": "tie"}', CALIBRATION_FORM)


def test_cache_key_covers_model_prompt_reply_and_rubric(monkeypatch):
    msgs = single_messages([{"role": "user", "content": "post"}], "reply", ["fluency"], 100)
    key = cache_key("openai", "m", msgs, FORM, {})
    assert key == cache_key("openai", "m", [dict(m) for m in msgs], FORM, {})
    assert key != cache_key("openai", "m2", msgs, FORM, {})
    other = single_messages([{"role": "user", "content": "post"}], "reply2", ["fluency"], 100)
    assert key != cache_key("openai", "m", other, FORM, {})
    monkeypatch.setattr(judge_cache, "RUBRIC_VERSION", "other")
    assert key != cache_key("openai", "m", msgs, FORM, {})


def test_cache_tolerates_a_torn_last_line(tmp_path):
    cache = ResponseCache(str(tmp_path / "cache"))
    cache.put("k1", {"text": "a"})
    cache.put("k2", {"text": "b"})
    cache.close()
    f = next((tmp_path / "cache").glob("*.jsonl"))
    f.write_text(f.read_text() + '{"key": "k3", "compl')  # killed mid-write
    again = ResponseCache(str(tmp_path / "cache"))
    assert again.get("k1") == {"text": "a"} and again.get("k2") == {"text": "b"} and again.get("k3") is None


def test_choice_probabilities_needs_a_clean_value_token():
    tokens = [{"token": t, "top": []} for t in ['{"', "fluency", '":', " ", "5", "}"]]
    tokens[4]["top"] = [["5", math.log(0.6)], ["6", math.log(0.2)], [" 4", math.log(0.1)], ["x", math.log(0.1)]]
    probs = choice_probabilities(tokens, "fluency", list(range(1, 8)), 5)
    assert probs == pytest.approx({"4": 1 / 9, "5": 6 / 9, "6": 2 / 9})
    assert expected_score(probs) == pytest.approx((4 + 30 + 12) / 9)
    # value merged with other characters into one token: no distribution rather than a wrong one
    merged = [{"token": t, "top": [[t, 0.0]]} for t in ['{"', "fluency", '":', " 5}"]]
    assert choice_probabilities(merged, "fluency", list(range(1, 8)), 5) is None
    assert choice_probabilities(None, "fluency", list(range(1, 8)), 5) is None
