"""One judge call (asked again until its verdict parses, through the cache), and many at once."""

from __future__ import annotations

import asyncio
from typing import Any

from cmv_core.judge.cache import ResponseCache, cache_key, key_backend
from cmv_core.judge.config import JudgeCallError, JudgeConfig, VerdictError, call_cost
from cmv_core.judge.parse import choice_probabilities, parse_verdict
from cmv_core.judge.prompts import reask


def next_uncached(
    messages: list[dict], form: dict, cache: ResponseCache, cfg: JudgeConfig, params: dict
) -> tuple[list[dict], str] | None:
    """The next ask of a call that the cache cannot answer (its messages and key), replaying the
    re-ask sequence from cached answers; None when the call is settled (parsed, refused, or out
    of re-asks). The Batch backend plans each round with this."""
    convo = list(messages)
    for attempt in range(1, cfg.parse_retries + 2):
        key = cache_key(key_backend(cfg), cfg.model, convo, form, params)
        completion = cache.get(key)
        if completion is None:
            return convo, key
        if completion.get("refusal"):
            return None
        try:
            parse_verdict(completion["text"], form)
            return None
        except VerdictError as exc:
            error = str(exc)
            if completion.get("finish_reason") == "length":
                error += " (the answer hit max_tokens)"
            convo = reask(messages, completion["text"], error, attempt, form)
    return None


async def _ask_once(key: str, convo: list[dict], form: dict, backend, cache: ResponseCache) -> tuple[dict, bool]:
    """The backend's answer for ``key`` and whether another call of this run paid for it: a prompt that two
    calls ask at the same time (two instruments grading the same reply, say) is sent once, as the dry run
    counts it; the second call reads the first one's answer, as it would from the cache a moment later."""
    pending = cache.in_flight.get(key)
    if pending is not None:
        completion = await asyncio.shield(pending)  # a waiter cancelled must not cancel the one ask
        if completion is not None:
            return completion, True
        # the first ask failed: this call asks itself (a transient error need not fail both)
    future = asyncio.get_running_loop().create_future()
    cache.in_flight[key] = future
    try:
        completion = await backend.complete(convo, form)
    except BaseException:
        if not future.done():
            future.set_result(None)
        raise
    finally:
        cache.in_flight.pop(key, None)
    cache.put(key, completion)
    if not future.done():
        future.set_result(completion)
    return completion, False


async def judge_call(messages: list[dict], form: dict, *, backend, cache: ResponseCache, cfg: JudgeConfig) -> dict:
    """Ask until the verdict parses (at most 1 + parse_retries asks), through the cache.

    A re-ask shows the judge its unusable answer and why, so it is a different prompt with its
    own cache key: a rerun replays the same sequence from the cache and asks nothing new."""
    result: dict[str, Any] = {
        "status": None,
        "attempts": 0,
        "cached_calls": 0,
        "new_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "cost_usd_this_run": 0.0,
    }
    convo = list(messages)
    raw = error = None
    for attempt in range(1, cfg.parse_retries + 2):
        key = cache_key(key_backend(cfg), cfg.model, convo, form, backend.params())
        completion = cache.get(key)
        # An answer the Batch backend loaded into the cache in this run is new in this run (for the
        # first call that reads it, as if that call had asked).
        cached = completion is not None and not cache.take_batch_loaded(key)
        if completion is None:
            try:
                completion, cached = await _ask_once(key, convo, form, backend, cache)
            except JudgeCallError as exc:
                # Not cached: a rerun tries again.
                return {**result, "status": "error", "error": str(exc), "raw": raw}
        cost = call_cost(cfg, completion["prompt_tokens"], completion["completion_tokens"])
        result["attempts"] += 1
        result["cached_calls" if cached else "new_calls"] += 1
        result["prompt_tokens"] += completion["prompt_tokens"]
        result["completion_tokens"] += completion["completion_tokens"]
        result["cost_usd"] += cost
        result["cost_usd_this_run"] += 0.0 if cached else cost
        raw = completion["text"]
        result.update(
            model=completion.get("model"),
            system_fingerprint=completion.get("system_fingerprint"),
            seed=completion.get("seed"),
        )
        if completion.get("refusal"):
            # A refusal is an answer, not a format slip: asking again would get the same; counted apart.
            return {
                **result,
                "status": "refused",
                "error": f"the judge refused: {completion['refusal'][:200]}",
                "raw": completion["refusal"],
            }
        try:
            verdict = parse_verdict(raw, form)
        except VerdictError as exc:
            error = str(exc)
            if completion.get("finish_reason") == "length":
                error += " (the answer hit max_tokens)"
            convo = reask(messages, raw, error, attempt, form)
            continue
        probs = {
            name: choice_probabilities(completion.get("tokens"), name, allowed, verdict[name])
            for name, allowed in form.items()
        }
        return {
            **result,
            "status": "ok",
            "verdict": {k: verdict[k] for k in form},
            "rationale": verdict["rationale"],
            "probs": probs,
        }
    return {**result, "status": "unparseable", "error": error, "raw": raw}


async def run_calls(
    calls: list[tuple[list[dict], dict]], *, backend, cache: ResponseCache, cfg: JudgeConfig
) -> list[dict]:
    """All calls, at most ``concurrency`` in flight; results in the order of ``calls``."""
    from tqdm import tqdm

    # An adaptive window where the backend has one (the OpenAI-compatible server: flow.py), else a fixed bound.
    flow = getattr(backend, "flow", None)
    sem = flow or _Fixed(max(1, cfg.concurrency))
    bar = tqdm(total=len(calls), desc="judge", unit="call", mininterval=2.0)
    results: list[dict] = [{}] * len(calls)
    # The order calls start in (the semaphore is first come, first served) is the backend's choice:
    # the local one wants the calls that share a post in flight together. Results keep plan order.
    order = backend.call_order(calls) if hasattr(backend, "call_order") else range(len(calls))

    async def one(i: int) -> None:
        messages, form = calls[i]
        await sem.acquire()
        try:
            results[i] = await judge_call(messages, form, backend=backend, cache=cache, cfg=cfg)
        finally:
            sem.release()
        bar.update(1)

    try:
        await asyncio.gather(*(one(i) for i in order))
        return results
    finally:
        bar.close()


class _Fixed(asyncio.Semaphore):
    """A fixed bound with the Flow's interface (acquire, release)."""
