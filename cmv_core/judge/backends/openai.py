"""The judge backend for any OpenAI-compatible chat endpoint, and the request and answer records
that the Batch API backend shares with it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from cmv_core.judge.config import JudgeCallError, JudgeConfig, JudgeConfigError
from cmv_core.judge.prompts import json_schema


def request_params(c: JudgeConfig, base_url: str) -> dict:
    """Everything besides the prompt that decides the answer (part of the cache key): the endpoint
    too, since two servers can serve different models under one name. The dry run computes the same
    without a client (plan.planned_params)."""
    return {
        "temperature": c.temperature,
        c.token_limit_param: c.max_tokens,
        "response_format": c.response_format,
        "logprobs": c.logprobs,
        "top_logprobs": c.top_logprobs if c.logprobs else None,
        "seed": c.api_seed,
        "base_url": base_url.rstrip("/"),
    }


class OpenAIBackend:
    """Any OpenAI-compatible chat endpoint. Retries with backoff are the client's (max_retries,
    timeout); concurrency is bounded by the caller."""

    def __init__(self, cfg: JudgeConfig):
        from openai import AsyncOpenAI, DefaultAioHttpClient

        base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            if base_url is None:
                raise JudgeCallError(
                    f"${cfg.api_key_env} is not set (needed for the OpenAI judge); "
                    "set it, or point judge.base_url / $OPENAI_BASE_URL at another server, "
                    "or use judge.backend=local"
                )
            api_key = "EMPTY"  # self-hosted servers (vLLM) often need no key
        self.cfg = cfg
        self.base_url = base_url or "https://api.openai.com/v1"
        self._secret = api_key if api_key != "EMPTY" else None
        if cfg.http_transport not in ("aiohttp", "httpx"):
            raise JudgeConfigError(f"judge.http_transport must be 'aiohttp' or 'httpx', got {cfg.http_transport!r}")
        # The client's own transport choice (openai[aiohttp]); its retries and timeouts are the same.
        http_client = DefaultAioHttpClient(timeout=cfg.timeout_s) if cfg.http_transport == "aiohttp" else None
        self.client = AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            max_retries=cfg.max_retries,
            timeout=cfg.timeout_s,
            http_client=http_client,
        )

    def _redact(self, text: str) -> str:
        """An error text without the API key (a server or proxy may echo it back)."""
        return text.replace(self._secret, "***") if self._secret else text

    def params(self) -> dict:
        return request_params(self.cfg, self.base_url)

    async def complete(self, messages: list[dict], form: dict) -> dict:
        import openai

        c = self.cfg
        kwargs = request_body(c, messages, form)
        # The same JSON on the wire, but the messages and the schema go in as extra_body, which the
        # client merges into the body as it is (over the required, here empty, `messages`): its
        # type-directed transform of them was 40% of its CPU per call (benchmarks/bench_judge.py).
        extra = {k: kwargs.pop(k) for k in ("messages", "response_format") if k in kwargs}
        try:
            # The raw body, not the client's pydantic objects: building those was most of the
            # client's CPU per call, which bounds throughput at high concurrency.
            raw = await self.client.chat.completions.with_raw_response.create(**kwargs, messages=[], extra_body=extra)
            resp = json.loads(raw.content)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            # Configuration errors: every call would fail the same way, so stop the stage. The
            # message is redacted and the original exception (which holds it verbatim) not chained.
            raise JudgeConfigError(
                self._redact(f"judge endpoint refused the call: {type(exc).__name__}: {exc}")
            ) from None
        except (openai.APIError, ValueError) as exc:
            raise JudgeCallError(self._redact(f"{type(exc).__name__}: {exc}")) from None
        if not isinstance(resp, dict):
            raise JudgeCallError("the response is not a JSON object")
        return completion_record(resp, c, redact=self._redact)

    async def aclose(self) -> None:
        await self.client.close()


def request_body(c: JudgeConfig, messages: list[dict], form: dict) -> dict:
    """The chat.completions request for one judge call (also a Batch API line's body)."""
    body: dict[str, Any] = {
        "model": c.model,
        "messages": messages,
        "temperature": c.temperature,
        c.token_limit_param: c.max_tokens,
    }
    if c.api_seed is not None:
        body["seed"] = c.api_seed
    if c.response_format == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "strict": True, "schema": json_schema(form)},
        }
    elif c.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    if c.logprobs:
        body.update(logprobs=True, top_logprobs=c.top_logprobs)
    return body


def completion_record(resp: dict, c: JudgeConfig, redact: Callable[[str], str] = str) -> dict:
    """What the cache keeps of a chat.completion (a dict, from the client or a Batch output line):
    the answer, its token log-probabilities, usage, and provenance (the model snapshot that
    answered, system_fingerprint, the seed sent); a refusal is kept as a refusal."""
    choices = resp.get("choices") or []
    if not choices:
        raise JudgeCallError("the response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    tokens = None
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        tokens = [
            {"token": t["token"], "top": [[a["token"], a["logprob"]] for a in (t.get("top_logprobs") or [])]}
            for t in content
        ]
    usage = resp.get("usage") or {}
    # redacted before anything stores it (cache, judgments, report): a server may echo the key
    return {
        "text": redact(message.get("content") or ""),
        "finish_reason": choice.get("finish_reason"),
        "tokens": tokens,
        "refusal": redact(message.get("refusal") or "") or None,
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
        "model": resp.get("model"),
        "system_fingerprint": resp.get("system_fingerprint"),
        "seed": c.api_seed,
    }
