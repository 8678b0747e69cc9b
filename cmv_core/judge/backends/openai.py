"""The judge backend for any OpenAI-compatible chat endpoint, and the request and answer records
that the Batch API backend shares with it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from cmv_core.judge.config import JudgeCallError, JudgeConfig, JudgeConfigError
from cmv_core.judge.flow import Flow
from cmv_core.judge.prompts import json_schema

log = logging.getLogger(__name__)
EXTENSIONS = 3  # a late call's deadline is moved at most 3 times (each at least doubling its wait)
# The call an HTTP answer belongs to (its epoch, whether it was retried), for the client's event hook.
_CALL: ContextVar[dict | None] = ContextVar("judge_call", default=None)


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
    """Any OpenAI-compatible chat endpoint. The calls in flight and each call's timeout are the
    ``Flow``'s (flow.py: they adapt to what the server sustains); 429/5xx answers and connection
    errors are retried by the client itself (max_retries, with its backoff and Retry-After), and a
    429/503 it sees also halves the window. A parameter the server rejects is detected once
    (``adapted``) and every later call is sent without it."""

    def __init__(self, cfg: JudgeConfig):
        from openai import AsyncOpenAI, DefaultAioHttpClient, DefaultAsyncHttpxClient

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
        self.flow = Flow(cfg.concurrency, cfg.timeout_s, cfg.max_tokens)
        self.adapted: dict[str, str] = {}  # parameter -> what is sent instead, once the server rejected it
        # No transport timeout: a call's deadline is the flow's (sized per call, see complete); a fixed
        # one here would cut every slow answer at the same point and the client would resend it as is.
        hooks = {"response": [self._on_response]}
        http_client = (
            DefaultAioHttpClient(timeout=None, event_hooks=hooks)
            if cfg.http_transport == "aiohttp"
            else DefaultAsyncHttpxClient(timeout=None, event_hooks=hooks)
        )
        self.client = AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=cfg.max_retries, timeout=None, http_client=http_client
        )

    def _redact(self, text: str) -> str:
        """An error text without the API key (a server or proxy may echo it back)."""
        return text.replace(self._secret, "***") if self._secret else text

    def params(self) -> dict:
        return request_params(self.cfg, self.base_url)

    async def _on_response(self, response) -> None:
        """Every HTTP answer the client gets, its own retries included (an httpx event hook, run in the
        task of the call that sent it): a 429/503 halves the window; an error answer is a retry."""
        self.flow.stats["requests"] += 1
        status = response.status_code
        if status >= 400:
            state = _CALL.get(None)
            if state is not None:
                state["retried"] = True
            if status in (429, 503):
                self.flow.congestion(state["epoch"] if state else self.flow.epoch, "overloaded")
                if state is not None:
                    # The client resends after its backoff; first this call gives up its slot and waits for
                    # room in the smaller window, so that the resend does not go out at the same load.
                    self.flow.release()
                    await self.flow.acquire(first=True)
                    state["epoch"] = self.flow.epoch

    async def complete(self, messages: list[dict], form: dict) -> dict:
        import openai

        c, flow = self.cfg, self.flow
        body = request_body(c, messages, form)
        loop = asyncio.get_running_loop()
        timeout, resends = flow.timeout_for(), 0
        state = {"epoch": flow.epoch, "retried": False}
        _CALL.set(state)
        try:
            while True:
                kwargs = self._adapt(body)
                state["epoch"], load, t0 = flow.epoch, flow.in_flight, loop.time()
                try:
                    resp = json.loads(await self._send(kwargs, timeout, state["epoch"]))
                except TimeoutError:
                    resends += 1
                    if resends > c.max_retries:
                        raise JudgeCallError(f"no answer within {timeout:.0f} s, {resends} tries") from None
                    # Sent again only once the window has room for it (the load has dropped), with a
                    # longer deadline: never the same doomed request at the same load.
                    state["retried"] = True
                    flow.stats["resent_after_timeout"] += 1
                    flow.release()
                    await flow.acquire(first=True)
                    timeout = max(2 * timeout, flow.timeout_for())
                    continue
                except openai.BadRequestError as exc:
                    if not self._rejected(exc, kwargs):
                        raise JudgeCallError(self._redact(f"{type(exc).__name__}: {exc}")) from None
                    state["retried"] = True
                    continue
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
                record = completion_record(resp, c, redact=self._redact)
                flow.success(loop.time() - t0, record["completion_tokens"], load)
                return record
        finally:
            if state["retried"]:
                flow.stats["retried_calls"] += 1

    async def _send(self, body: dict, timeout: float, epoch: int) -> bytes:
        """One request (the client's own retries of 429/5xx included) under the call's deadline. At the
        deadline the server is taken to be overloaded (the window halves); while other calls are in
        flight the load can still drop, and while the throughput seen since says its budget needs longer,
        the call keeps waiting (as long again as it has waited, or until that size; up to ``EXTENSIONS``
        times); else it is cut (TimeoutError) and sent again by complete()."""
        loop = asyncio.get_running_loop()
        flow, start, extensions = self.flow, loop.time(), [0]
        async with asyncio.timeout(None) as deadline:

            def overdue() -> None:
                flow.congestion(epoch, "timeout")
                waited = loop.time() - start
                # what the budget takes at the load and throughput seen now (the first answers may have
                # come in since the call was sent, with the measure of a slow server)
                sized = flow.timeout_for()
                if (flow.can_drop() or sized > waited) and extensions[0] < EXTENSIONS:
                    extensions[0] += 1
                    handle[0] = loop.call_later(max(waited, sized - waited), overdue)
                else:
                    deadline.reschedule(loop.time())

            handle = [loop.call_later(timeout, overdue)]
            try:
                # The client's request path (auth, retries with backoff, errors as exceptions, hooks) with
                # the body as JSON and the answer as bytes: its type-directed transform of the parameters
                # and its pydantic answer objects were most of its CPU per call, which bounds throughput
                # at high concurrency (benchmarks/bench_judge.py).
                return await self.client.post("/chat/completions", body=body, cast_to=bytes)
            finally:
                handle[0].cancel()

    def _adapt(self, body: dict) -> dict:
        """The request as this server takes it (after the rejections detected so far)."""
        kwargs = dict(body)
        if "max_completion_tokens" in self.adapted and "max_completion_tokens" in kwargs:
            kwargs["max_tokens"] = kwargs.pop("max_completion_tokens")
        if "seed" in self.adapted:
            kwargs.pop("seed", None)
        if "logprobs" in self.adapted:
            kwargs.pop("logprobs", None)
            kwargs.pop("top_logprobs", None)
        fmt = self.adapted.get("response_format")
        if fmt == "json_object" and "response_format" in kwargs:
            kwargs["response_format"] = {"type": "json_object"}
        elif fmt == "dropped":
            kwargs.pop("response_format", None)
        return kwargs

    def _rejected(self, exc, sent: dict) -> bool:
        """Whether a 400 names a parameter the judge can do without (or say otherwise); if so it is
        recorded once, logged once, and the call is sent again without it."""
        body = exc.body if isinstance(exc.body, dict) else {}
        param = body.get("param") or (body.get("error") or {}).get("param")
        message = str(getattr(exc, "message", exc)).lower()
        for name in ("max_completion_tokens", "seed", "top_logprobs", "logprobs", "response_format"):
            if name not in sent or (param != name and name not in message):
                continue
            key = "logprobs" if name == "top_logprobs" else name
            if key == "response_format":
                fmt = sent["response_format"].get("type")
                instead = "json_object" if fmt == "json_schema" else "dropped"
            else:
                instead = {"max_completion_tokens": "max_tokens"}.get(key, "dropped")
            if self.adapted.get(key) != instead:
                self.adapted[key] = instead
                how = "without it" if instead == "dropped" else f"as {instead}"
                log.warning("the judge server rejected %s (%s); sending it %s from now on", name, message[:200], how)
            return True
        return False

    async def describe(self) -> dict:
        """What serves the judge, for the report: the server's own version (vLLM's /version) and the
        models it lists (/v1/models); what it does not answer is left out."""
        out: dict = {"base_url": self.base_url}
        quick = self.client.with_options(max_retries=0, timeout=10.0)
        try:
            models = await quick.models.list()
            out["models"] = [{"id": m.id, "owned_by": getattr(m, "owned_by", None)} for m in models.data]
        except Exception:  # noqa: BLE001 - an endpoint without /models only means "not known"
            pass
        root = self.base_url.rstrip("/").removesuffix("/v1")
        try:
            version = await quick.get(f"{root}/version", cast_to=object)
            if isinstance(version, dict) and version.get("version"):
                owners = {m.get("owned_by") for m in out.get("models", [])}
                out["server"] = "vLLM" if "vllm" in owners else "unknown"
                out["version"] = str(version["version"])
        except Exception:  # noqa: BLE001
            pass
        if self.adapted:
            out["adapted"] = dict(self.adapted)
        return out

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
