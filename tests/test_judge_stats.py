"""The judge stage's statistics end to end, against fake judges with known behaviour.

- a judge that always prefers the longer reply: raw preference ~100%, length-controlled ~50%,
  and the report says the judge knows nothing beyond length;
- a judge with set per-variant strengths: Bradley-Terry recovers their order and the gap;
- a judge that gives log-probabilities: exact Brier and AUC on the delta pairs;
- dry run and max_cost_usd; provenance; refusals; base URL in the cache key.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from fake_openai_server import FakeOpenAI, Reply, completion, token_logprobs, verdict_fields, verdict_json
from test_judge import INSTRUCTION, judge_argv, replies_shown, write_stage_outputs

from cmv_core import storage
from cmv_core.judge import stage as judging
from cmv_core.judge.backends.local import LocalBackend, local_dtype
from cmv_core.judge.backends.openai import OpenAIBackend, request_body
from cmv_core.judge.cache import cache_key, key_backend
from cmv_core.judge.config import JudgeBudgetError, JudgeConfig, JudgeConfigError
from cmv_core.judge.plan import planned_params
from cmv_core.judge.prompts import (
    PAIRWISE_FORM,
    PAIRWISE_INSTRUCTIONS,
    single_form,
    single_messages,
    two_reply_messages,
)

CRITS = ["persuasiveness"]


def make_inputs(root, n, reply, pair_texts, human=lambda i: f"HUMAN reply {i}"):
    """format + generate outputs with n prompts, each in its own thread; ``reply(variant, i)``
    gives the generated replies, ``pair_texts(i)`` the (winner, loser) of the delta pair."""
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
                "metadata": {"comment_ids": [f"c{i}"]},
                "messages": prompt + [{"role": "assistant", "content": human(i)}],
            }
        )
        win, lose = pair_texts(i)
        pairs.append(
            {
                "pair_id": f"t{i}:c{i}",
                "thread_id": f"t{i}",
                "prompt": prompt,
                "winner": win,
                "loser": lose,
                "loser_comment_ids": [f"l{i}"],
            }
        )
        for v in ("base", "finetuned"):
            gens.append(
                {
                    "id": f"t{i}:c{i}",
                    "thread_id": f"t{i}",
                    "model": v,
                    "messages": prompt,
                    "response": reply(v, i),
                    "finish_reason": "stop",
                }
            )
    return write_stage_outputs(run, fmt, gen, tests, pairs, gens)


def cfg(srv, **kw):
    base = dict(
        backend="openai",
        model="gpt-4o-mini",
        base_url=srv.base_url,
        concurrency=8,
        max_retries=2,
        timeout_s=5.0,
        bootstrap_samples=300,
        criteria=CRITS,
        logprobs=False,
    )
    return JudgeConfig(**{**base, **kw})


def unit(i: int, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:8], 16) / 16**8


def longer_judge(body, n):
    """Prefers the longer reply, every time; grades by length too."""
    fields = verdict_fields(body)
    shown = replies_shown(body)
    if len(shown) == 1:
        return Reply(body=completion(verdict_json({k: min(7, 1 + len(shown[0].split()) // 10) for k in fields})))
    a, b = (len(x.split()) for x in shown)
    return Reply(body=completion(verdict_json({"winner": "A" if a > b else "B" if b > a else "tie"})))


def test_a_judge_that_prefers_the_longer_reply_is_length_controlled_away(tmp_path):
    n = 40
    words = lambda k: " ".join(["word"] * k)  # noqa: E731

    def reply(v, i):
        # finetuned is always the longer of the two models (by 20-60 words)
        return ("FT " if v == "finetuned" else "BASE ") + words(
            30 + (20 + int(40 * unit(i, "ft")) if v == "finetuned" else 0)
        )

    def human(i):  # sometimes longer, sometimes shorter than the models
        return "HUMAN " + words(int(10 + 100 * unit(i, "h")))

    def pair_texts(i):  # the delta winner is longer in about half of the pairs
        return "WIN " + words(int(10 + 80 * unit(i, "w"))), "LOSE " + words(int(10 + 80 * unit(i, "l")))

    gen, fmt = make_inputs(tmp_path, n, reply, pair_texts, human)
    out = str(tmp_path / "judge")
    with FakeOpenAI(longer_judge) as srv:
        judging.run_judge(
            gen,
            fmt,
            out,
            cfg(
                srv,
                comparisons=[["finetuned", "base"], ["finetuned", "human"], ["base", "human"]],
                length_probe_items=10,
            ),
        )
    rep = storage.read_json(storage.join(out, "report.json"))
    raw = rep["pairwise"]["finetuned_vs_base"]["preference"]
    assert raw["estimate"] == 1.0 and raw["n_threads"] == n and raw["p_value"] < 0.001
    lc = rep["length_control"]["model"]["by_group"]["finetuned_vs_base"]
    assert lc["estimate"] == pytest.approx(0.5, abs=0.15)
    assert lc["ci95"][0] < 0.5 < lc["ci95"][1]
    assert rep["length_control"]["model"]["coef"]["length"] > 2
    # the same reply, trimmed: the longer version always wins
    assert rep["length_control"]["probe_prefer_longer"]["estimate"] == 1.0
    # the judge is exactly the length baseline on the delta pairs: no discordant pair
    vs = rep["calibration"]["vs_length"]
    assert vs["discordant_first_better"] == vs["discordant_second_better"] == 0 and vs["p_value"] == 1.0
    md = storage.read_text(storage.join(out, "report.md"))
    head = md.split("\n## ")[0]
    assert "**finetuned vs base**" in head and "P(finetuned preferred) 1.00" in head
    assert "not at equal length: the preference is explained by reply length" in head
    assert "has not been shown to know more than reply length" in head
    assert "always on one side in length here" in head and lc["one_sided_length"]
    # every instrument was scored on the delta pairs, with a length-only model beside it
    assert set(rep["instruments"]) == {"forced_choice", "pairwise", "single"}
    for block in rep["instruments"].values():
        # (equal-length pairs get "tie", which the forced-choice form refuses: failed and counted)
        assert block["n_pairs"] + block["n_failed"] == n and block["n_pairs"] >= n - 5
        assert block["length_cv_accuracy"] is not None


STRENGTH = {"BASE": 0.0, "FT": 0.8, "HUMAN": 1.6, "LOSE": 0.4}


def strength_judge(body, n):
    """Picks A with probability sigmoid(s_A - s_B), a deterministic draw per prompt."""
    fields = verdict_fields(body)
    shown = replies_shown(body)
    if len(shown) == 1:
        return Reply(body=completion(verdict_json({k: 4 for k in fields})))
    sa, sb = (STRENGTH.get(x.split()[0], 0.0) for x in shown)
    u = int(hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:8], 16) / 16**8
    p_a = 1 / (1 + math.exp(-(sa - sb)))
    return Reply(body=completion(verdict_json({"winner": "A" if u < p_a else "B"})))


def test_bradley_terry_recovers_set_strengths_and_the_gap(tmp_path):
    n = 150
    gen, fmt = make_inputs(
        tmp_path,
        n,
        lambda v, i: f"{'FT' if v == 'finetuned' else 'BASE'} reply {i}",
        lambda i: (f"WIN {i}", f"LOSE {i}"),
    )
    out = str(tmp_path / "judge")
    with FakeOpenAI(strength_judge) as srv:
        judging.run_judge(
            gen, fmt, out, cfg(srv, single=False, calibration=False, length_probe_items=0, bootstrap_samples=200)
        )
    rep = storage.read_json(storage.join(out, "report.json"))
    scale = rep["scale"]
    s = scale["strengths"]
    assert set(s) == {"base", "finetuned", "human", "human_nondelta"}
    assert s["base"] == 0.0 < s["finetuned"] < s["human"]
    assert s["finetuned"] == pytest.approx(0.8, abs=0.3) and s["human"] == pytest.approx(1.6, abs=0.35)
    gap = scale["models"]["finetuned"]
    assert gap["gap_closed"] == pytest.approx(0.5, abs=0.2)
    assert gap["gap_closed_ci95"][0] < gap["gap_closed"] < gap["gap_closed_ci95"][1]
    md = storage.read_text(storage.join(out, "report.md"))
    assert "share of the gap to `human` closed" in md and "depth 1" in md


def logprob_judge(body, n):
    """Calibration prompt: P(winner) = 0.8 when the winner is shown first, 0.6 when second.
    Rubric: persuasiveness 5 for WIN texts (p 0.5/0.5 over 4, 6 -> weighted 5), else 4 or 3."""
    fields = verdict_fields(body)
    shown = replies_shown(body)
    if len(shown) == 1:
        text = shown[0]
        score = 5 if text.startswith("WIN") else 3 if text.endswith("odd") else 4
        content = verdict_json({k: score for k in fields})
        dist = {"4": 0.5, "6": 0.5} if score == 5 else {str(score): 1.0}
        if score == 5:
            content = verdict_json({k: 6 for k in fields})
        return Reply(body=completion(content, logprobs=token_logprobs(content, {"persuasiveness": dist})))
    winner_first = shown[0].startswith("WIN")
    p_first = 0.8 if winner_first else 0.4  # P(A): winner first 0.8; winner second P(B) = 0.6
    choice = "A" if p_first >= 0.5 else "B"
    content = verdict_json({"winner": choice})
    dist = {"A": p_first, "B": 1 - p_first}
    if "tie" in fields.get("winner", []):
        dist = {"A": p_first, "B": 1 - p_first, "tie": 1e-9}
    return Reply(body=completion(content, logprobs=token_logprobs(content, {"winner": dist})))


def test_exact_brier_and_auc_from_logprobs(tmp_path):
    n = 6
    gen, fmt = make_inputs(
        tmp_path, n, lambda v, i: f"{v} reply {i}", lambda i: (f"WIN {i}", f"LOSE {i}" + (" odd" if i % 2 else ""))
    )
    out = str(tmp_path / "judge")
    with FakeOpenAI(logprob_judge) as srv:
        judging.run_judge(
            gen,
            fmt,
            out,
            cfg(
                srv,
                logprobs=True,
                comparisons=[["finetuned", "base"]],
                length_probe_items=0,
                nondelta_reference=False,
                grade_human=False,
            ),
        )
    rep = storage.read_json(storage.join(out, "report.json"))
    fc = rep["instruments"]["forced_choice"]
    # P(winner) per pair = (0.8 + 0.6) / 2 = 0.7 -> Brier (1 - 0.7)^2 = 0.09, the same for every pair
    assert fc["brier"] == pytest.approx(0.09, abs=1e-6)
    assert rep["calibration"]["brier"] == pytest.approx(0.09, abs=1e-6)
    assert fc["accuracy"] == pytest.approx(1.0)
    single = rep["instruments"]["single"]
    # weighted winner score 5 (0.5*4 + 0.5*6) vs loser 4 (even pairs) or 3 (odd): every d > 0
    assert single["auc_weighted"]["persuasiveness"] == 1.0
    # parsed digits: winner 6 vs 4 or 3: also all positive
    assert single["auc"]["persuasiveness"] == 1.0 and single["accuracy"] == 1.0


def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path):
    from conftest import run_cmv

    gen, fmt = make_inputs(tmp_path, 3, lambda v, i: f"{v} reply {i}", lambda i: (f"WIN {i}", f"LOSE {i}"))
    out = tmp_path / "judge"
    with FakeOpenAI() as srv:  # a valid verdict for every ask: no re-asks, which the dry run leaves out
        argv = judge_argv(gen, fmt, out, srv)
        proc = run_cmv(*argv, "--dry-run", env={"OPENAI_API_KEY": "sk-dry"})
        assert srv.count == 0
        assert "dry run:" in proc.stdout and "estimated cost $" in proc.stdout
        est = json.loads(proc.stdout.strip().splitlines()[-1])
        assert not (out / "_SUCCESS").exists() and not (out / "judgments.jsonl").exists()

        # The plan is the run: the real run (every answer parses, so no re-asks) makes exactly the
        # calls the dry run counted and sends exactly the new ones (a prompt asked twice in the plan,
        # e.g. by two instruments, is sent once and then read from the cache).
        run_cmv(*argv, env={"OPENAI_API_KEY": "sk-dry"})
        summary = storage.require_success(str(out))["summary"]
        assert est["calls"] == summary["calls"] and est["cached_calls"] == summary["cached_calls"]
        assert est["new_calls"] == summary["new_calls"] == srv.count
        assert est["est_cost_usd"] > 0
        # and a second dry run sees every call in the cache
        again = json.loads(run_cmv(*argv, "--dry-run", env={"OPENAI_API_KEY": "sk-dry"}).stdout.splitlines()[-1])
        assert (again["calls"], again["cached_calls"], again["new_calls"]) == (est["calls"], est["calls"], 0)


def test_max_cost_stops_before_any_call(tmp_path):
    gen, fmt = make_inputs(tmp_path, 3, lambda v, i: f"{v} reply {i}", lambda i: (f"WIN {i}", f"LOSE {i}"))
    with FakeOpenAI(longer_judge) as srv:
        with pytest.raises(JudgeBudgetError, match="max_cost_usd"):
            judging.run_judge(gen, fmt, str(tmp_path / "judge"), cfg(srv, max_cost_usd=1e-6))
        assert srv.count == 0


def test_provenance_refusals_token_param_and_base_url_in_cache_key(tmp_path):
    gen, fmt = make_inputs(tmp_path, 2, lambda v, i: f"{v} reply {i}", lambda i: (f"WIN {i}", f"LOSE {i}"))

    def handler(body, n):
        reply = longer_judge(body, n)
        reply.body["model"] = "gpt-4o-mini-2024-07-18"
        reply.body["system_fingerprint"] = "fp_test123"
        if replies_shown(body) == ("base reply 1",):
            reply.body["choices"][0]["message"] = {
                "role": "assistant",
                "content": None,
                "refusal": "I can't help with that.",
            }
        return reply

    out = str(tmp_path / "judge")
    with FakeOpenAI(handler) as srv:
        c = cfg(srv, calibration=False, pairwise=False, max_failed_fraction=0.9)
        judging.run_judge(gen, fmt, out, c)
        first = srv.count
        for body in srv.requests:
            assert body["max_completion_tokens"] == c.max_tokens and "max_tokens" not in body
            assert body["seed"] == 0
        rows = {r["id"]: r for r in storage.read_jsonl(storage.join(out, "judgments.jsonl"))}
        refused = rows["single:base:t1:c1"]
        assert refused["status"] == "refused" and refused["attempts"] == 1  # not re-asked
        ok = rows["single:base:t0:c0"]
        assert ok["model"] == "gpt-4o-mini-2024-07-18" and ok["system_fingerprint"] == "fp_test123"
        rep = storage.read_json(storage.join(out, "report.json"))
        assert rep["failures"]["refusals"] == 1 and rep["failures"]["unparseable"] == 0
        assert rep["provenance"]["system_fingerprints"] == ["fp_test123"]
        assert "fp_test123" in storage.read_text(storage.join(out, "report.md"))
        with FakeOpenAI(handler) as other:  # same model name, another server: not answered from the cache
            judging.run_judge(
                gen, fmt, out, cfg(other, calibration=False, pairwise=False, max_failed_fraction=0.9), force=True
            )
            assert other.count == first


def test_local_judge_batches_calls_with_the_same_answers(tiny_model_dir):
    """Micro-batched local judging (one forward pass per step for many prompts) gives the same
    verdict texts and token counts as one call at a time, and the same probabilities up to float
    rounding, for prompts of different lengths and both forms."""
    import asyncio

    post = [{"role": "user", "content": "CMV: x is y.\n\nBecause z."}]
    sform = single_form(CRITS)
    calls = []
    for i in range(6):
        calls.append((single_messages(post, "Reply " + "word " * (i * 7 + 1), CRITS, 1000), sform))
        calls.append(
            (
                two_reply_messages(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, post, "A " * (i + 1), "B " * (9 - i), 1000),
                PAIRWISE_FORM,
            )
        )
    answers = {}
    for batch_size in (1, 4):
        # float32: "the same up to rounding" (bfloat16 keeps 3 digits, too few for a random tiny model's
        # near-uniform logits)
        backend = LocalBackend(
            JudgeConfig(
                backend="local",
                model=tiny_model_dir,
                local_rationale_tokens=3,
                local_batch_size=batch_size,
                local_dtype="float32",
            )
        )
        sizes = []
        original = backend._complete_batch

        def counted(batch, sizes=sizes, original=original):
            sizes.append(len(batch))
            return original(batch)

        backend._complete_batch = counted

        async def go(backend=backend):
            return await asyncio.gather(*(backend.complete(m, f) for m, f in calls))

        answers[batch_size] = asyncio.run(go())
        if batch_size > 1:
            assert max(sizes) == 4 and sum(sizes) == len(calls)  # really batched, every call answered once
    for one, many in zip(answers[1], answers[4]):
        assert one["text"] == many["text"] and one["completion_tokens"] == many["completion_tokens"]
        assert one["prompt_tokens"] == many["prompt_tokens"]
        for a, b in zip(one["tokens"], many["tokens"]):
            assert a["token"] == b["token"]
            assert [v for v, _ in a["top"]] == [v for v, _ in b["top"]]
            assert [lp for _, lp in a["top"]] == pytest.approx([lp for _, lp in b["top"]], abs=1e-4)


def test_local_judge_dtype_is_resolved_recorded_and_keyed(tiny_model_dir, monkeypatch):
    """auto is bfloat16 only where the CPU multiplies bf16 natively; the dtype the weights are in is
    part of the backend's params (the cache key), and the dry run plans with the same params."""
    import torch

    for amx, avx512_bf16, expected in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512_bf16=avx512_bf16: avx512_bf16)
        assert local_dtype("auto") == expected
    assert local_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="judge.local_dtype must be"):
        local_dtype("fp8")
    monkeypatch.undo()
    keys = set()
    for dtype in ("bfloat16", "float32"):
        cfg = JudgeConfig(backend="local", model=tiny_model_dir, local_dtype=dtype)
        backend = LocalBackend(cfg)
        assert next(backend.model.parameters()).dtype == getattr(torch, dtype)
        assert backend.params() == planned_params(cfg)
        keys.add(
            cache_key(
                key_backend(cfg),
                cfg.model,
                [{"role": "user", "content": "x"}],
                PAIRWISE_FORM,
                backend.params(),
            )
        )
    assert len(keys) == 2


def test_training_time_beside_the_judge_is_sft_plus_dpo(tmp_path):
    """The judge prints its time beside the training behind the generations: every train-stage
    input of the generate stage (SFT and DPO), not the first one found, and not the format stage."""
    import datetime as dt
    import json

    def stage(name: str, kind: str, inputs: list[str], seconds: float) -> str:
        uri = str(tmp_path / name)
        run = storage.begin_stage(kind, uri, inputs=inputs, config={}, run_id="t")
        storage.write_json(storage.join(uri, "metrics.json"), {})
        storage.finish_stage(run, {})
        manifest = json.loads((tmp_path / name / "_SUCCESS").read_text())
        end = dt.datetime.fromisoformat(manifest["finished_at"])
        manifest["started_at"] = (end - dt.timedelta(seconds=seconds)).isoformat()
        (tmp_path / name / "_SUCCESS").write_text(json.dumps(manifest))
        return uri

    fmt = stage("format", "format", [], 500)
    sft = stage("train", "train", [fmt], 40)
    dpo = stage("dpo", "train", [fmt, sft], 15)
    both = stage("generate", "generate", [fmt, sft, dpo], 5)
    only_sft = stage("generate_sft", "generate", [fmt, sft], 5)
    assert judging.training_seconds(both) == pytest.approx(55)
    assert judging.training_seconds(only_sft) == pytest.approx(40)
    assert judging.training_seconds(fmt) is None


@pytest.mark.parametrize("response_format", ["json_schema", "json_object"])
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_the_sync_backend_sends_exactly_the_request_body(response_format, transport):
    """The messages and schema go to the client as extra_body (its transform of them was most of its
    CPU): what reaches the server must still be exactly request_body, the Batch API line's body, on
    either of the client's transports; an unknown transport is a configuration error."""
    import asyncio

    messages = single_messages([{"role": "user", "content": "CMV: x.\n\nBecause y."}], "A reply.", CRITS, 1000)
    form = single_form(CRITS)
    with FakeOpenAI(longer_judge) as srv:
        c = cfg(srv, response_format=response_format, http_transport=transport)
        with pytest.raises(JudgeConfigError, match="judge.http_transport must be"):
            OpenAIBackend(cfg(srv, http_transport="requests"))

        async def one():
            backend = OpenAIBackend(c)
            try:
                return await backend.complete(messages, form)
            finally:
                await backend.aclose()

        asyncio.run(one())
        assert srv.requests == [request_body(c, messages, form)]
