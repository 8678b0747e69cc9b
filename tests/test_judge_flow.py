"""The judge against servers that are slow, overloaded or older than it (cmv_core/judge/flow.py,
backends/openai.py): the calls in flight adapt to what the server sustains, a call's timeout grows
with its token budget and the throughput observed, and a rejected parameter is detected once.

The servers are tests/fake_openai_server.py with a throughput limit (tokens generated per second,
shared by the answers in progress, an answer dropped when its client hangs up, as vLLM does)."""

from __future__ import annotations

import asyncio

import pytest
from fake_openai_server import FakeOpenAI, Reply, completion, default_answer
from test_judge import config, judgments, make_inputs, smart_judge

from cmv_core import storage
from cmv_core.judge import stage as judging
from cmv_core.judge.flow import Flow

ANSWER_TOKENS = 40  # each answer's completion tokens, generated at the server's rate


def slow_judge(body: dict, n: int) -> Reply:
    """smart_judge's verdicts, each ANSWER_TOKENS tokens long for the throughput limit."""
    reply = smart_judge(body, n)
    text = reply.body["choices"][0]["message"]["content"]
    reply.body = completion(text, completion_tokens=ANSWER_TOKENS)
    return reply


@pytest.fixture
def inputs(tmp_path):
    return make_inputs(tmp_path, n=4)


def fixed_client_failures(base_url: str, n: int, concurrency: int, timeout_s: float) -> int:
    """What a client with a fixed bound and a fixed timeout gets from the same server: the openai
    client's own retries resend each timed-out request at the same load."""
    from openai import APITimeoutError, AsyncOpenAI

    async def go() -> int:
        client = AsyncOpenAI(api_key="x", base_url=base_url, timeout=timeout_s, max_retries=2)
        sem = asyncio.Semaphore(concurrency)
        body = {"model": "m", "messages": [{"role": "system", "content": '"winner"'}, {"role": "user", "content": "x"}]}

        async def one() -> bool:
            async with sem:
                try:
                    await client.chat.completions.create(**body)
                    return True
                except APITimeoutError:
                    return False

        try:
            return sum(not ok for ok in await asyncio.gather(*(one() for _ in range(n))))
        finally:
            await client.close()

    return asyncio.run(go())


def test_slow_server_zero_failures_where_a_fixed_client_times_out(tmp_path, inputs):
    gen, fmt = inputs
    out = str(tmp_path / "judge")
    with FakeOpenAI(slow_judge) as srv:
        # 400 tokens/s shared: 8 answers of 40 tokens in flight take 0.8 s each, over the 0.5 s timeout.
        srv.tokens_per_s = 400.0

        def control(body, n):
            return Reply(
                body=completion(default_answer(body)["choices"][0]["message"]["content"], completion_tokens=40)
            )

        srv.handler = control
        failed = fixed_client_failures(srv.base_url, 16, concurrency=8, timeout_s=0.5)
        assert failed > 0  # the server is too slow for a fixed client at this timeout and load
        assert srv.aborted > 0  # and the work of its cut requests was lost

        srv.handler, srv.aborted = slow_judge, 0
        srv.reset()
        cfg = config(srv, concurrency=8, timeout_s=0.5, max_retries=2, comparisons=[["finetuned", "base"]])
        manifest = judging.run_judge(gen, fmt, out, cfg)
    rows = judgments(out)
    assert rows and all(r["status"] == "ok" for r in rows)
    summary = manifest["summary"]
    assert summary["failed_calls"] == 0
    transport = summary["transport"]
    # every request answered was a call's only one: no call was cut and sent again
    assert transport["retried_calls"] == 0 and srv.aborted == 0
    assert srv.count == summary["new_calls"]
    # the first round ran past the timeout: that halved the window, and the timeout grew from what it saw
    assert transport["timeouts"] > 0 and transport["min_window"] < 8
    assert transport["tokens_per_s"] is not None


def test_overloaded_server_429_halves_the_window_and_no_call_fails(tmp_path, inputs):
    gen, fmt = inputs
    out = str(tmp_path / "judge")
    with FakeOpenAI(slow_judge) as srv:
        srv.tokens_per_s, srv.max_active, srv.overload_status = 2000.0, 2, 429
        cfg = config(srv, concurrency=8, timeout_s=5.0, max_retries=8, comparisons=[["finetuned", "base"]])
        manifest = judging.run_judge(gen, fmt, out, cfg)
        refused = srv.refused
    summary = manifest["summary"]
    assert summary["failed_calls"] == 0 and all(r["status"] == "ok" for r in judgments(out))
    transport = summary["transport"]
    assert refused > 0 and transport["overloaded"] == refused
    assert transport["window_cuts"] >= 1 and transport["min_window"] <= 4


def test_rejected_parameters_are_detected_once_and_named_in_the_report(tmp_path, inputs):
    gen, fmt = inputs
    out = str(tmp_path / "judge")
    with FakeOpenAI(smart_judge) as srv:
        srv.reject_params = {"max_completion_tokens", "seed"}
        srv.version = "0.0.fake"
        cfg = config(srv, concurrency=4, comparisons=[["finetuned", "base"]])
        manifest = judging.run_judge(gen, fmt, out, cfg)
        refused, sent = srv.refused, list(srv.requests)
    assert manifest["summary"]["failed_calls"] == 0
    # at most one round of calls in flight learns of each rejection; every later request goes without it
    assert refused <= 2 * cfg.concurrency
    answered = [b for b in sent if "max_completion_tokens" not in b and "seed" not in b]
    assert len(answered) == manifest["summary"]["new_calls"] and len(sent) - len(answered) == refused
    assert all(b["max_tokens"] == cfg.max_tokens and "logprobs" in b for b in answered)
    report = storage.read_json(storage.join(out, "report.json"))
    server = report["judge_server"]
    assert server["server"] == "vLLM" and server["version"] == "0.0.fake"
    assert server["adapted"] == {"max_completion_tokens": "max_tokens", "seed": "dropped"}
    md = storage.read_text(storage.join(out, "report.md"))
    assert "judge server: vLLM 0.0.fake" in md and "`fake-judge`" in md and "rejected `seed`" in md


def test_flow_window_aimd_and_timeout_from_budget_and_throughput():
    async def go():
        flow = Flow(max_window=8, timeout_s=2.0, max_tokens=100)
        assert flow.timeout_for() == 2.0  # nothing observed yet: the configured timeout
        for _ in range(8):
            await flow.acquire()
        waiter = asyncio.ensure_future(flow.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()  # the window is full
        epoch = flow.epoch
        flow.congestion(epoch, "timeout")
        flow.congestion(epoch, "timeout")  # the same round: one cut
        assert flow.window == 4.0 and flow.stats["window_cuts"] == 1
        flow.congestion(flow.epoch, "overloaded")
        assert flow.window == 2.0
        for _ in range(7):
            flow.release()
        await asyncio.sleep(0)
        assert waiter.done() and flow.in_flight == 2  # room again only once the load fell under the window
        # 10 tokens in 5 s at load 1: 0.5 s per token per call in flight
        flow.success(5.0, 10, load=1)
        assert flow.window == 2.5
        assert flow.timeout_for() == pytest.approx(2 * 100 * 2 * 0.5)  # budget x load x s/token, twice
        assert flow.timeout_for(10) == pytest.approx(max(2.0, 2 * 10 * 2 * 0.5))
        for _ in range(40):
            flow.success(0.1, 10, load=1)
        assert flow.window == 8.0  # additive increase, up to judge.concurrency

    asyncio.run(go())
