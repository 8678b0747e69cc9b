"""The judge stage: score generated replies with an LLM judge and write the report.

Kinds of judgment, all from one rubric version:

- single: each reply (every generated variant, and the human references) graded 1-7 on each
  criterion of ``CRITERIA`` with a short rationale;
- pairwise: each ``comparisons`` pair (default: finetuned vs base, each model vs the human delta
  winner, each model vs the matched non-delta reply of an ordinary commenter), each judged in
  both orders; when the orders disagree the pair is a tie and is counted as inconsistent;
- calibration: on the format stage's ``pairs.jsonl`` the judge picks which of two human
  replies won the delta (both orders), reported beside a length baseline on the same pairs;
- validation (``validate_instruments``, on by default): the pairwise prompt and the rubric that
  produce the headline numbers are run on the same delta pairs, so that every instrument is
  scored against real outcomes;
- time split: when the format stage split by time it also wrote ``pairs_before.jsonl``, the
  delta pairs of its train-period threads (before ``test_after``). Every instrument above judges
  a sample of them too (``max_before_pairs``), and the report compares its accuracy on them with
  its accuracy on the test pairs (after the date): a judge that read the earlier threads in
  pretraining may do better on them. The headline calibration stays on the test pairs. (Judging
  the judge on threads the fine-tuned model trained on is legitimate: the judge is another model.)
- length probe (``length_probe_items``): a model's reply against its own trimmed version, for
  P(prefer longer | same content).

Human references are fair by default (``human_reference: depth1``): only delta winners that
reply to the post itself, so that the judge sees everything the human reply answered.

Backends: any OpenAI-compatible chat endpoint (``openai.AsyncOpenAI``: its own retries with
backoff on 429/5xx/timeouts, bounded concurrency here), OpenAI's Batch API
(``backend: openai-batch``, half price; a killed stage resumes by polling its batch), and a
local in-process model that fills the verdict JSON itself and reads the score digit from
next-token probabilities. Every judge call goes through a persistent cache under the output
(keyed by endpoint, model, prompt, parameters and rubric), so a rerun or a resumed run repeats
no call. A verdict that cannot be parsed is asked again, then recorded as a failure and
excluded from every score; a refusal is recorded as a refusal. ``cmv judge --dry-run`` prints
the plan (calls, estimated tokens and cost) and sends nothing; ``max_cost_usd`` stops the stage
before it would spend more. The returned model snapshot, system fingerprint and seed are kept
per call and summarised in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cmv_core import errors, storage

log = logging.getLogger(__name__)

# Bump when a prompt, rubric or form changes: it is part of every cache key and of the report.
RUBRIC_VERSION = "cmv-likert7-v1"
LIKERT = [1, 2, 3, 4, 5, 6, 7]
HUMAN = "human"  # the variant name of the human reply that won the delta (from test.jsonl)
HUMAN_NONDELTA = "human_nondelta"  # the matched reply of an ordinary commenter that won no delta (pairs.jsonl)

# Anchored descriptions (1, 4, 7) so that scores mean the same thing across replies and runs.
CRITERIA = {
    "persuasiveness": (
        "Persuasiveness to this OP: how likely is the reply to change this OP's view, at least in "
        "part (to earn a delta from them)? 1 = no chance: ignores or restates the OP's reasons, or "
        "would make them dig in. 4 = raises a relevant point, but unlikely to move this OP by itself. "
        "7 = engages the OP's own stated reasons with a specific, strong argument or evidence they "
        "have not considered; a reasonable OP would likely change at least part of their view."
    ),
    "relevance": (
        "Relevance to the post: does the reply address this post's actual view and reasoning? "
        "1 = off-topic, or generic text that could be posted under any view. 4 = on topic, but "
        "addresses the view loosely or only a side point. 7 = squarely addresses the OP's central "
        "claim and the specific reasons they gave."
    ),
    "civility": (
        "Civility and good faith: 1 = hostile, insulting or mocking, or arguing in bad faith "
        "(straw man, misrepresenting the OP). 4 = mostly civil, with some condescension or an "
        "uncharitable reading. 7 = respectful, reads the OP charitably, honest about uncertainty."
    ),
    "fluency": (
        "Fluency: is the reply clear, coherent, well-formed English? 1 = incoherent, repetitive, "
        "truncated or broken text. 4 = understandable, with noticeable errors, repetition or "
        "awkward passages. 7 = clear, well organized, natural prose."
    ),
}

CMV_INTRO = (
    "You evaluate replies on Reddit's r/ChangeMyView (CMV). There, the original poster (OP) states "
    "a view and their reasons, and others reply to try to change it; the OP awards a delta to a "
    "reply that changed their view, at least in part. Your own opinion on the topic does not matter."
)

SINGLE_INSTRUCTIONS = (
    "You will see the OP's post, possibly earlier turns of the discussion, and one reply to "
    "evaluate. Rate the reply as a reply to this OP on each criterion from 1 (worst) to 7 (best), "
    "using the whole scale. Length alone is not a merit.\n\n{rubric}\n\n"
    "First write a short rationale (at most three sentences), then the scores. Answer with only a "
    "JSON object of this form: {shape}"
)
PAIRWISE_INSTRUCTIONS = (
    "You will see the OP's post, possibly earlier turns of the discussion, and two replies, A and B. "
    "Decide which reply is more likely to change this OP's view (to earn a delta from this OP). "
    "Weigh mainly persuasiveness to this OP: engaging the OP's own reasons, offering arguments or "
    "evidence the OP has not considered; relevance, civility and fluency count only as far as they "
    "affect that. The order in which the replies are shown and their length are not reasons to "
    'prefer one. Answer "tie" only if neither is more persuasive.\n\n'
    "First write a short rationale (at most three sentences). Answer with only a JSON object of "
    "this form: {shape}"
)
CALIBRATION_INSTRUCTIONS = (
    "You will see the OP's post and two replies, A and B, both written by people in this thread. "
    "Exactly one of them changed the OP's view and earned a delta. Decide which one. The order in "
    "which the replies are shown and their length are not reasons to prefer one.\n\n"
    "First write a short rationale (at most three sentences). Answer with only a JSON object of "
    "this form: {shape}"
)

# USD per million tokens. Local models cost nothing; unknown models are reported as unpriced.
DEFAULT_PRICES = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    # Batch API: half the synchronous price (OpenAI's published batch discount)
    "gpt-4o-mini@batch": {"input": 0.075, "output": 0.30},
    "gpt-4o@batch": {"input": 1.25, "output": 5.00},
    "gpt-4.1-mini@batch": {"input": 0.20, "output": 0.80},
    "gpt-4.1-nano@batch": {"input": 0.05, "output": 0.20},
}


@dataclass
class JudgeConfig:
    backend: str = "openai"  # "openai" (any OpenAI-compatible endpoint), "openai-batch" or "local"
    model: str = "gpt-4o-mini"  # judge model name, or a model spec for the local backend
    base_url: str | None = None  # default: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    concurrency: int = 16  # judge calls in flight at once
    max_retries: int = 6  # the openai client's own retries (429/5xx/timeouts)
    timeout_s: float = 60.0  # per request
    # aiohttp: less client CPU per call than httpx (3.2 vs 4.1 ms, benchmarks/bench_judge.py), which
    # bounds throughput at high concurrency | httpx: the openai client's default transport
    http_transport: str = "aiohttp"
    parse_retries: int = 2  # extra asks after an unparseable verdict
    temperature: float = 0.0
    max_tokens: int = 400  # sent as token_limit_param
    token_limit_param: str = "max_completion_tokens"  # or "max_tokens" for servers that only take that
    api_seed: int | None = 0  # sent as `seed` (best-effort determinism), recorded per call
    response_format: str = "json_schema"  # json_schema | json_object | none
    logprobs: bool = True  # ask for top log-probabilities (weighted Likert score)
    top_logprobs: int = 10
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    single: bool = True
    grade_human: bool = True  # also grade the human delta-winning reply
    pairwise: bool = True
    # "finetuned" is the SFT model; "dpo" (when generated) the DPO model trained from it. A comparison whose
    # variant no item has (no DPO in this run) is left out.
    comparisons: list[list[str]] = field(
        default_factory=lambda: [
            ["finetuned", "base"],
            ["finetuned", HUMAN],
            ["base", HUMAN],
            ["finetuned", HUMAN_NONDELTA],
            ["base", HUMAN_NONDELTA],
            ["dpo", "finetuned"],
            ["dpo", "base"],
            ["dpo", HUMAN],
        ]
    )
    # Which test prompts get a human reference: "depth1" keeps only winners that reply to the post
    # itself (the judge sees all they answered); "all" also deep winners, which in the single view
    # answer OP turns the judge never sees (unfair to the human side).
    human_reference: str = "depth1"
    nondelta_reference: bool = True  # add variant human_nondelta: the matched reply that won no delta
    calibration: bool = True
    validate_instruments: bool = True  # also run the pairwise prompt and the rubric on the delta pairs
    length_probe_items: int = 20  # prompts whose reply is judged against its own trimmed version
    validation_split_date: str | None = None  # time-split view; default: format's test_after when split: time
    # Time split: train-period pairs (pairs_before.jsonl) judged by every instrument (seeded sample). None: as
    # many as max_calibration_pairs, or as the test pairs judged when that is unset; 0: none.
    max_before_pairs: int | None = None
    max_cost_usd: float | None = None  # stop before planned new calls would cost more than this
    batch_poll_s: float = 30.0  # openai-batch: seconds between polls of a running batch
    max_items: int | None = None  # cap on test prompts judged (seeded sample)
    max_calibration_pairs: int | None = None  # cap on calibration pairs (seeded sample)
    max_text_chars: int = 6000  # longer post/reply texts are cut (and marked) in prompts
    local_rationale_tokens: int = 0  # local backend: greedy rationale tokens before scores
    local_batch_size: int = 8  # local backend: calls answered together (1 = one at a time)
    # local backend: auto = bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16: its matmuls
    # ~2.8x, the judge stage ~1.4x faster), else float32 | float32 | bfloat16. Part of the cache key.
    local_dtype: str = "auto"
    max_failed_fraction: float = 0.2  # more failed calls than this fails the stage
    cache: str | None = None  # cache URI (default: <output>/cache)
    cache_flush_every: int = 50  # S3 cache: entries per uploaded shard
    bootstrap_samples: int = 2000
    seed: int = 0
    prices: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))


class InputError(errors.InputError):
    """An input file line lacks what the judge needs."""


class VerdictError(ValueError):
    """A judge answer that is not a usable verdict."""


class JudgeCallError(errors.StageFailed):
    """A judge call failed after the client's own retries."""


class JudgeConfigError(errors.StageFailed):
    """The endpoint refuses every call (bad key, no access, unknown model): the stage stops."""


class JudgeBudgetError(errors.StageFailed):
    """The planned calls would cost more than judge.max_cost_usd: nothing is sent."""


class JudgeFailed(errors.StageFailed):
    """Too many judge calls failed for the results to mean much."""


# ---------------------------------------------------------------- forms and parsing


def single_form(criteria: list[str]) -> dict[str, list]:
    return {c: list(LIKERT) for c in criteria}


PAIRWISE_FORM = {"winner": ["A", "B", "tie"]}
CALIBRATION_FORM = {"winner": ["A", "B"]}


def form_shape(form: dict[str, list]) -> str:
    parts = ['"rationale": "<short rationale>"']
    for name, allowed in form.items():
        if isinstance(allowed[0], int):
            parts.append(f'"{name}": <integer {allowed[0]}-{allowed[-1]}>')
        else:
            parts.append(f'"{name}": ' + " | ".join(f'"{a}"' for a in allowed))
    return "{" + ", ".join(parts) + "}"


def json_schema(form: dict[str, list]) -> dict:
    props: dict[str, Any] = {"rationale": {"type": "string"}}
    for name, allowed in form.items():
        props[name] = {"type": "integer" if isinstance(allowed[0], int) else "string", "enum": allowed}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def parse_verdict(text: str, form: dict[str, list]) -> dict[str, Any]:
    """The verdict fields of a judge answer, or VerdictError saying what is wrong.

    Tolerates code fences and text around the object (json_object/none modes); values must be
    one of the allowed ones: a number outside 1-7 or a missing field is not guessed at."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise VerdictError("no JSON object in the answer")
    try:
        obj = json.loads(text[start : end + 1])
    except json.JSONDecodeError as exc:
        raise VerdictError(f"invalid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise VerdictError("the answer is not a JSON object")
    out: dict[str, Any] = {}
    for name, allowed in form.items():
        if name not in obj:
            raise VerdictError(f"missing field {name!r}")
        value = obj[name]
        if isinstance(allowed[0], int):
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value.strip())
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or value not in allowed:
                raise VerdictError(f"field {name!r} is {value!r}, not an integer {allowed[0]}-{allowed[-1]}")
        else:
            match = [a for a in allowed if isinstance(value, str) and value.strip().lower() == a.lower()]
            if not match:
                raise VerdictError(f"field {name!r} is {value!r}, not one of {allowed}")
            value = match[0]
        out[name] = value
    rationale = obj.get("rationale")
    out["rationale"] = rationale if isinstance(rationale, str) else None
    return out


def choice_probabilities(tokens: list[dict] | None, name: str, allowed: list, chosen: Any) -> dict[str, float] | None:
    """Renormalised probabilities of the allowed values at the token that holds field ``name``'s
    value, from the judge's top log-probabilities; None when they are not available there.

    The field is found in the concatenated token texts (not the message text, which can differ
    for partial multi-byte tokens); its last occurrence is used, since the rationale comes first
    and may quote field names."""
    if not tokens:
        return None
    joined, starts = "", []
    for t in tokens:
        starts.append(len(joined))
        joined += t["token"]
    matches = list(re.finditer(r'"%s"\s*:\s*"?' % re.escape(name), joined))
    if not matches:
        return None
    pos = matches[-1].end()
    idx = max(i for i, s in enumerate(starts) if s <= pos)
    if starts[idx] + len(tokens[idx]["token"]) <= pos:  # value starts in the next token
        idx += 1
    if idx >= len(tokens):
        return None
    canon = {str(a).lower(): a for a in allowed}

    def value_of(token_text: str):
        return canon.get(token_text.strip().strip('"').lower())

    if value_of(tokens[idx]["token"]) != chosen:
        return None  # the value is split across tokens or merged with others: no clean distribution
    probs: dict[str, float] = {}
    for alt, logprob in tokens[idx].get("top") or []:
        value = value_of(alt)
        if value is not None:
            probs[str(value)] = probs.get(str(value), 0.0) + math.exp(logprob)
    total = sum(probs.values())
    if total <= 0:
        return None
    return {k: v / total for k, v in sorted(probs.items())}


def expected_score(probs: dict[str, float] | None) -> float | None:
    """sum_k p(k) * k over the Likert digits: steadier than the single parsed digit."""
    if not probs:
        return None
    return sum(int(k) * p for k, p in probs.items())


# ---------------------------------------------------------------- prompts


def _cut(text: str, max_chars: int) -> str:
    text = (text or "").strip()
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + " [...cut]"


def render_context(prompt_messages: list[dict], max_chars: int) -> str:
    """The OP's post and any earlier turns, as the judge reads them (system prompts dropped)."""
    turns = [m for m in prompt_messages if m.get("role") != "system"]
    if not turns:
        return "## Original post by the OP\n(empty)"
    parts = ["## Original post by the OP\n" + _cut(turns[0]["content"], max_chars)]
    if len(turns) > 1:
        parts.append("## Earlier turns in this discussion")
        for m in turns[1:]:
            who = "OP" if m["role"] == "user" else "Challenger"
            parts.append(f"[{who}]: {_cut(m['content'], max_chars)}")
    return "\n\n".join(parts)


def single_messages(prompt_messages: list[dict], reply: str, criteria: list[str], max_chars: int) -> list[dict]:
    rubric = "\n".join(f"- {c}: {CRITERIA[c]}" for c in criteria)
    system = CMV_INTRO + "\n\n" + SINGLE_INSTRUCTIONS.format(rubric=rubric, shape=form_shape(single_form(criteria)))
    user = render_context(prompt_messages, max_chars) + "\n\n## Reply to evaluate\n" + _cut(reply, max_chars)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def two_reply_messages(
    instructions: str, form: dict, prompt_messages: list[dict], first: str, second: str, max_chars: int
) -> list[dict]:
    system = CMV_INTRO + "\n\n" + instructions.format(shape=form_shape(form))
    user = (
        render_context(prompt_messages, max_chars)
        + "\n\n## Reply A\n"
        + _cut(first, max_chars)
        + "\n\n## Reply B\n"
        + _cut(second, max_chars)
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- cache


def _messages_text(messages: list[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages)


def cache_key(backend: str, model: str, messages: list[dict], form: dict, params: dict) -> str:
    """sha256 over everything that decides the answer: judge, full prompt (replies included),
    form, sampling parameters and the rubric version."""
    blob = json.dumps(
        {
            "rubric": RUBRIC_VERSION,
            "backend": backend,
            "model": model,
            "messages": messages,
            "form": form,
            "params": params,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Judge answers by cache key, persisted under a URI as JSONL files.

    Local: each process appends to its own file and flushes every entry, so a killed run loses
    nothing. S3 (no appends): entries are uploaded as a new shard every ``flush_every`` entries
    and at close. Reading takes every file under the URI; a torn last line is skipped."""

    def __init__(self, uri: str, flush_every: int = 50):
        self.uri = uri
        self.flush_every = flush_every
        self.entries: dict[str, dict] = {}
        self.batch_loaded: set[str] = set()  # keys the Batch backend put in this run, not yet read
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._shard = 0
        self._file = None
        torn = 0
        for rel in storage.list_files(uri):
            if not rel.endswith(".jsonl"):
                continue
            for line in storage.read_bytes(storage.join(uri, rel)).splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["completion"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    torn += 1
        if torn:
            log.warning("judge cache %s: skipped %d unreadable line(s) (a run killed mid-write)", uri, torn)
        log.info("judge cache %s: %d cached answer(s)", uri, len(self.entries))

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, completion: dict) -> None:
        line = json.dumps({"key": key, "completion": completion}, ensure_ascii=False)
        with self._lock:
            self.entries[key] = completion
            if storage.is_s3(self.uri):
                self._pending.append({"key": key, "completion": completion})
                if len(self._pending) >= self.flush_every:
                    self._flush_shard()
                return
            if self._file is None:
                path = storage.local_path(storage.join(self.uri, f"{self._name}.jsonl"))
                path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(path, "a", encoding="utf-8")
            self._file.write(line + "\n")
            self._file.flush()

    def take_batch_loaded(self, key: str) -> bool:
        with self._lock:
            if key in self.batch_loaded:
                self.batch_loaded.discard(key)
                return True
            return False

    def _flush_shard(self) -> None:
        if self._pending:
            storage.write_jsonl(storage.join(self.uri, f"{self._name}-{self._shard:05d}.jsonl"), self._pending)
            self._shard += 1
            self._pending = []

    def close(self) -> None:
        with self._lock:
            self._flush_shard()
            if self._file is not None:
                self._file.close()
                self._file = None


# ---------------------------------------------------------------- backends


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
        """Everything besides the prompt that decides the answer (part of the cache key): the
        endpoint too, since two servers can serve different models under one name."""
        c = self.cfg
        return {
            "temperature": c.temperature,
            c.token_limit_param: c.max_tokens,
            "response_format": c.response_format,
            "logprobs": c.logprobs,
            "top_logprobs": c.top_logprobs if c.logprobs else None,
            "seed": c.api_seed,
            "base_url": self.base_url.rstrip("/"),
        }

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


def local_dtype(name: str) -> str:
    """The torch dtype name the local judge runs in (see ``JudgeConfig.local_dtype``)."""
    import torch

    if name == "auto":
        # Without native bf16 (AVX2-only CPUs) bfloat16 is emulated and slower than float32.
        native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bfloat16" if native else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"judge.local_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return name


class LocalBackend:
    """An in-process causal LM (the embedded default for the demo).

    The backend writes the verdict JSON itself and lets the model choose only where a choice is
    needed: an optional greedy rationale, then for each field the allowed value with the highest
    next-token probability. The answer is thus always parseable, and the value probabilities come
    straight from the logits (reported like an API's top log-probabilities)."""

    def __init__(self, cfg: JudgeConfig):
        import torch

        from cmv_core.models import load_causal_lm, load_tokenizer

        self.cfg = cfg
        self.torch = torch
        self.tokenizer = load_tokenizer(cfg.model)
        self.dtype = local_dtype(cfg.local_dtype)
        self.model = load_causal_lm(cfg.model, dtype=getattr(torch, self.dtype))
        self.model.eval()
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses every core
        self._prefixes: dict[tuple[int, ...], Any] = {}  # KV cache of each system prompt (one per kind)
        self._queue: list = []
        self._draining = False

    def params(self) -> dict:
        # the dtype changes the logits, hence the probabilities (and rarely a verdict): a cached answer
        # of one dtype is not an answer of the other
        return {"rationale_tokens": self.cfg.local_rationale_tokens, "dtype": self.dtype}

    async def complete(self, messages: list[dict], form: dict) -> dict:
        if self.cfg.local_batch_size <= 1:
            return await asyncio.to_thread(self._complete, messages, form)
        # Micro-batching: calls in flight at once (run_calls keeps `concurrency` of them) are
        # queued and answered together, one forward pass per step for the whole batch.
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((messages, form, fut))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while True:
                for _ in range(3):  # let the coroutines whose answers just came enqueue their next call
                    await asyncio.sleep(0)
                if not self._queue:
                    return
                batch = self._next_batch()
                for q in batch:
                    self._queue.remove(q)
                try:
                    results = await asyncio.to_thread(self._complete_batch, [(m, f) for m, f, _ in batch])
                except Exception as exc:  # noqa: BLE001 - handed to every waiting call
                    for _, _, fut in batch:
                        fut.set_exception(exc)
                    continue
                for (_, _, fut), res in zip(batch, results):
                    fut.set_result(res)
        finally:
            self._draining = False

    def call_order(self, calls: list[tuple[list[dict], dict]]) -> list[int]:
        """Calls of one form and one post next to each other (see ``_next_batch``)."""
        return sorted(
            range(len(calls)), key=lambda i: (json.dumps(calls[i][1], sort_keys=True), _messages_text(calls[i][0]))
        )

    def _next_batch(self) -> list:
        """Queued calls of the first call's form, those that share its context (the post, up to the
        replies: every comparison and order of one item) first: their common prompt prefix is then
        encoded once for the whole batch (``_complete_batch``), which is most of a call's tokens."""
        key = json.dumps(self._queue[0][1], sort_keys=True)
        same_form = [q for q in self._queue if json.dumps(q[1], sort_keys=True) == key]
        texts = [_messages_text(q[0]) for q in same_form]
        common = len(os.path.commonprefix(texts))  # the system prompt and headers: shared anyway
        extra = [len(os.path.commonprefix([texts[0], t])) - common for t in texts]
        best = max(extra[1:], default=0)
        if best < 200:  # nothing else shares its post: any calls of the form make the batch
            return same_form[: self.cfg.local_batch_size]
        # On a CPU a forward pass costs about its token count whatever the batch, so a smaller batch
        # that shares the post beats a full one that does not.
        return [q for q, e in zip(same_form, extra) if e >= best // 2][: self.cfg.local_batch_size]

    def _complete_batch(self, batch: list[tuple[list[dict], dict]]) -> list[dict]:
        """Several calls of one form at once: the same answers as ``_complete`` (up to float
        rounding), one forward pass per step for all of them.

        Rows are [system prompt (shared KV cache) | left padding | rest of the prompt | answer];
        padding, and the tokens a row feeds after its rationale has ended, are masked out, and
        position ids count only a row's real tokens."""

        torch = self.torch
        form = batch[0][1]
        prompts = [
            self.tokenizer.encode(
                self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            )
            for m, _ in batch
        ]
        prefixes = {self._system_prefix(m, ids) for (m, _), ids in zip(batch, prompts)}
        prefix = prefixes.pop() if len(prefixes) == 1 else ()
        if len(batch) == 1 or not prefix:
            # Without a shared unmasked prefix a left-padded row would start with no key to attend
            # to: one at a time instead.
            return [self._complete(m, f) for m, f in batch]
        # Beyond the system prompt, the rows may share more (the same post, different replies): that
        # part is encoded once, in a batch of one, and repeated. Each row keeps at least one token.
        shared = min(len(os.path.commonprefix(prompts)), min(len(ids) for ids in prompts) - 1)
        with self._lock, torch.inference_mode():
            B = len(batch)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            kv = self._prefix_kv(prefix)
            if shared > len(prefix):
                self.model(
                    input_ids=torch.tensor([prompts[0][len(prefix) : shared]]),
                    cache=kv,
                    use_cache=True,
                    logits_to_keep=1,
                )
            shared = max(shared, len(prefix))
            kv.batch_repeat_interleave(B)
            mask = torch.ones((B, shared), dtype=torch.long)
            count = torch.full((B,), shared, dtype=torch.long)  # real tokens per row so far
            rests = [ids[shared:] for ids in prompts]
            last = {"logits": None}
            texts = [[] for _ in range(B)]
            tokens: list[list[dict]] = [[] for _ in range(B)]
            n_out = [0] * B

            def feed(rows: list[list[int]], active: list[bool]) -> None:
                k = max(len(r) for r in rows)
                ids = torch.full((B, k), pad, dtype=torch.long)
                new_mask = torch.zeros((B, k), dtype=torch.long)
                for i, r in enumerate(rows):
                    if r and active[i]:
                        ids[i, k - len(r) :] = torch.tensor(r)  # right-aligned: the last column is real
                        new_mask[i, k - len(r) :] = 1
                nonlocal mask, count
                pos = count[:, None] + torch.cumsum(new_mask, dim=1) - 1
                pos = torch.where(new_mask.bool(), pos, torch.zeros_like(pos))
                mask = torch.cat([mask, new_mask], dim=1)
                # only the last position's logits: the vocabulary projection of every prompt token
                # would cost about as much as the rest of this small model
                out = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=pos, cache=kv, use_cache=True, logits_to_keep=1
                )
                logits = out.logits[:, -1]
                if last["logits"] is None:
                    last["logits"] = logits.clone()
                else:
                    upd = torch.tensor(active) & new_mask.any(dim=1)
                    last["logits"][upd] = logits[upd]
                count = count + new_mask.sum(dim=1)

            def emit(i: int, text: str, n_ids: int, top=None) -> None:
                texts[i].append(text)
                tokens[i].append({"token": text, "top": top or []})
                n_out[i] += n_ids

            # A decode step costs about the same for one token as for a few (reading the weights is
            # the work), so the tokens the backend writes itself go in with the next step that needs
            # logits: `pending` is what each row still has to feed before it.
            head0 = self._ids('{"rationale": "')
            pending = [list(r) + head0 for r in rests]
            for i in range(B):
                emit(i, '{"rationale": "', len(head0))
            active = [True] * B
            for _ in range(self.cfg.local_rationale_tokens):
                feed(pending, [bool(p) for p in pending])
                for i in range(B):
                    pending[i] = []
                    if not active[i]:
                        continue
                    next_id = int(last["logits"][i].argmax())
                    piece = self.tokenizer.decode([next_id])
                    if (
                        next_id == self.tokenizer.eos_token_id
                        or any(ch in piece for ch in '"\\')
                        or any(ord(ch) < 32 for ch in piece)
                    ):
                        active[i] = False
                        continue
                    emit(i, piece, 1)
                    pending[i] = [next_id]
                if not any(active):
                    break
            for f, (name, allowed) in enumerate(form.items()):
                quoted = isinstance(allowed[0], str)
                head = (f'", "{name}": ' if f == 0 else f', "{name}": ') + ('"' if quoted else "")
                head_ids = self._ids(head)
                feed([p + head_ids for p in pending], [True] * B)
                first_ids = [self._ids(str(a))[0] for a in allowed]
                if len(set(first_ids)) != len(first_ids):
                    raise RuntimeError(f"{self.cfg.model}: values {allowed} share a first token")
                logprobs = torch.log_softmax(last["logits"].float(), dim=-1)
                q = self._ids('"') if quoted else []
                for i in range(B):
                    emit(i, head, len(head_ids))
                    scores = [float(logprobs[i, t]) for t in first_ids]
                    best = allowed[max(range(len(allowed)), key=lambda k: scores[k])]
                    value = self._ids(str(best))
                    emit(i, str(best), len(value), top=[[str(a), sc] for a, sc in zip(allowed, scores)])
                    if quoted:
                        emit(i, '"', len(q))
                    pending[i] = value + q
            out = []
            for i in range(B):
                tokens[i].append({"token": "}", "top": []})
                out.append(
                    {
                        "text": "".join(texts[i]) + "}",
                        "finish_reason": "stop",
                        "tokens": tokens[i],
                        "prompt_tokens": len(prompts[i]),
                        "completion_tokens": n_out[i] + 1,
                    }
                )
            return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prefix_kv(self, prefix: tuple[int, ...]):
        """A fresh KV cache holding ``prefix`` (computed once per prefix, then copied), or an empty one."""
        from transformers import DynamicCache

        if not prefix:
            return DynamicCache(config=self.model.config)
        if prefix not in self._prefixes:
            self._prefixes[prefix] = DynamicCache(config=self.model.config)
            self.model(
                input_ids=self.torch.tensor([list(prefix)]),
                cache=self._prefixes[prefix],
                use_cache=True,
                logits_to_keep=1,
            )
        return copy.deepcopy(self._prefixes[prefix])

    def _system_prefix(self, messages: list[dict], prompt_ids: list[int]) -> tuple[int, ...]:
        """The token ids of the rendered system turn when they are a clean prefix of the prompt."""
        if not messages or messages[0]["role"] != "system" or len(self._prefixes) > 8:
            return ()
        text = self.tokenizer.apply_chat_template(messages[:1], tokenize=False)
        ids = self._ids(text)
        return tuple(ids) if 0 < len(ids) < len(prompt_ids) and prompt_ids[: len(ids)] == ids else ()

    def _complete(self, messages: list[dict], form: dict) -> dict:

        torch = self.torch
        with self._lock, torch.inference_mode():
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            # One KV cache per answer: the prompt is encoded once, each piece after it costs a few
            # tokens. The system prompt (the rubric, most of the prompt) is shared by every call of
            # a kind, so its KV cache is computed once and copied.
            prefix = self._system_prefix(messages, prompt_ids)
            kv = self._prefix_kv(prefix)
            state: dict[str, Any] = {"logits": None, "n": 0}
            pieces: list[dict] = []

            def feed(ids: list[int], text: str | None = None, top=None) -> None:
                out = self.model(input_ids=torch.tensor([ids]), cache=kv, use_cache=True, logits_to_keep=1)
                state["logits"] = out.logits[0, -1]
                if text is not None:
                    pieces.append({"token": text, "top": top or []})
                    state["n"] += len(ids)

            feed(prompt_ids[len(prefix) :])
            feed(self._ids('{"rationale": "'), '{"rationale": "')
            for _ in range(self.cfg.local_rationale_tokens):
                next_id = int(state["logits"].argmax())
                piece = self.tokenizer.decode([next_id])
                if (
                    next_id == self.tokenizer.eos_token_id
                    or any(ch in piece for ch in '"\\')
                    or any(ord(ch) < 32 for ch in piece)
                ):
                    break
                feed([next_id], piece)
            for i, (name, allowed) in enumerate(form.items()):
                quoted = isinstance(allowed[0], str)
                head = f'", "{name}": ' if i == 0 else f', "{name}": '
                head += '"' if quoted else ""
                feed(self._ids(head), head)
                first_ids = [self._ids(str(a))[0] for a in allowed]
                if len(set(first_ids)) != len(first_ids):
                    raise RuntimeError(f"{self.cfg.model}: values {allowed} share a first token")
                logprobs = torch.log_softmax(state["logits"].float(), dim=-1)
                scores = [float(logprobs[t]) for t in first_ids]
                best = allowed[max(range(len(allowed)), key=lambda k: scores[k])]
                feed(self._ids(str(best)), str(best), top=[[str(a), s] for a, s in zip(allowed, scores)])
                if quoted:
                    feed(self._ids('"'), '"')
            pieces.append({"token": "}", "top": []})
            return {
                "text": "".join(p["token"] for p in pieces),
                "finish_reason": "stop",
                "tokens": pieces,
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": state["n"] + 1,
            }

    async def aclose(self) -> None:
        return None


class BatchBackend:
    """OpenAI's Batch API (half price, results within 24 h) for the same requests.

    ``prefetch`` runs before the ordinary call path: each round writes the asks the cache cannot
    answer to a JSONL file (``custom_id`` = cache key, body = the synchronous request), uploads
    it (``files.create(purpose="batch")``), creates a batch on ``/v1/chat/completions`` with
    ``completion_window="24h"``, polls it with progress and loads every answer into the cache;
    asks that follow an unparseable answer go in the next round. The batch id is stored under the
    cache before the first poll, so a stage killed while the batch runs resumes by polling that
    batch, never by submitting it again. Afterwards every judge call is answered from the cache;
    ``complete`` is only reached for a request the batch failed, and reports that failure."""

    def __init__(self, cfg: JudgeConfig):
        # the same endpoint, key handling and request parameters as the synchronous path
        self.api = OpenAIBackend(cfg)
        self.cfg, self.client, self._redact = cfg, self.api.client, self.api._redact
        self.errors: dict[str, str] = {}
        self.stats = {"batches": 0, "resumed": 0, "requests": 0, "rounds": 0}

    def params(self) -> dict:
        return self.api.params()

    async def aclose(self) -> None:
        await self.api.aclose()

    async def complete(self, messages: list[dict], form: dict) -> dict:
        key = cache_key(key_backend(self.cfg), self.cfg.model, messages, form, self.params())
        raise JudgeCallError(self.errors.get(key, "no answer from the batch for this request"))

    def _state_uri(self, cache: ResponseCache) -> str:
        return storage.join(cache.uri, "batch_state.json")

    async def prefetch(self, calls: list[tuple[list[dict], dict]], cache: ResponseCache) -> None:
        import openai

        params = self.params()
        try:
            for round_no in range(1, self.cfg.parse_retries + 3):
                state_uri = self._state_uri(cache)
                if storage.exists(state_uri):
                    state = storage.read_json(state_uri)
                    log.info(
                        "batch %s of an earlier run is still open: polling it, not resubmitting", state["batch_id"]
                    )
                    self.stats["resumed"] += 1
                    await self._finish(state, cache)
                    continue
                todo: dict[str, list[dict]] = {}
                for messages, form in calls:
                    nxt = next_uncached(messages, form, cache, self.cfg, params)
                    if nxt is not None and nxt[1] not in self.errors:
                        todo.setdefault(nxt[1], request_body(self.cfg, nxt[0], form))
                if not todo:
                    return
                lines = [
                    json.dumps(
                        {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body},
                        ensure_ascii=False,
                    )
                    for key, body in todo.items()
                ]
                upload = await self.client.files.create(
                    file=(f"cmv-judge-{round_no}.jsonl", ("\n".join(lines) + "\n").encode("utf-8")), purpose="batch"
                )
                batch = await self.client.batches.create(
                    input_file_id=upload.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    metadata={"source": "cmv-persuasion judge"},
                )
                state = {
                    "batch_id": batch.id,
                    "input_file_id": upload.id,
                    "requests": len(todo),
                    "round": round_no,
                    "submitted_at": time.time(),
                }
                storage.write_json(state_uri, state)  # before the first poll: a killed stage resumes here
                self.stats["batches"] += 1
                self.stats["requests"] += len(todo)
                log.info("batch %s submitted: %d request(s) (round %d)", batch.id, len(todo), round_no)
                await self._finish(state, cache)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            raise JudgeConfigError(
                self._redact(f"batch endpoint refused the call: {type(exc).__name__}: {exc}")
            ) from None
        except openai.APIError as exc:
            raise JudgeCallError(self._redact(f"batch: {type(exc).__name__}: {exc}")) from None

    async def _finish(self, state: dict, cache: ResponseCache) -> None:
        """Poll the batch to an end state, load its answers into the cache, forget the state."""
        from tqdm import tqdm

        self.stats["rounds"] += 1
        bar = tqdm(total=state["requests"], desc=f"batch {state['batch_id']}", unit="req", mininterval=2.0)
        try:
            while True:
                batch = await self.client.batches.retrieve(state["batch_id"])
                counts = batch.request_counts
                if counts is not None:
                    bar.n = counts.completed + counts.failed
                    bar.refresh()
                if batch.status in ("completed", "failed", "expired", "cancelled"):
                    break
                await asyncio.sleep(self.cfg.batch_poll_s)
        finally:
            bar.close()
        if batch.status == "failed":
            errors = getattr(batch, "errors", None)
            raise JudgeCallError(f"batch {batch.id} failed: {errors}")
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for line in content.content.decode("utf-8").splitlines():
                if not line.strip():
                    continue
                entry = json.loads(line)
                key, response = entry.get("custom_id"), entry.get("response") or {}
                if response.get("status_code") == 200 and not entry.get("error"):
                    cache.put(key, completion_record(response["body"], self.cfg, redact=self._redact))
                    cache.batch_loaded.add(key)
                else:
                    err = entry.get("error") or (response.get("body") or {}).get("error") or response
                    self.errors[key] = self._redact(f"batch request failed: {json.dumps(err)[:300]}")
        storage.delete(self._state_uri(cache))
        log.info(
            "batch %s %s: answers loaded into the cache (%d failed request(s) so far)",
            batch.id,
            batch.status,
            len(self.errors),
        )


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "openai-batch":
        return BatchBackend(cfg)
    if cfg.backend == "local":
        return LocalBackend(cfg)
    raise ValueError(f"judge.backend must be 'openai', 'openai-batch' or 'local', got {cfg.backend!r}")


# ---------------------------------------------------------------- one judgment, many judgments


def price_name(cfg: JudgeConfig) -> str:
    """The price table entry: the Batch API has its own (half) prices, under "<model>@batch"."""
    return f"{cfg.model}@batch" if cfg.backend == "openai-batch" else cfg.model


def call_cost(cfg: JudgeConfig, prompt_tokens: int, completion_tokens: int) -> float:
    if cfg.backend == "local":
        return 0.0
    price = cfg.prices.get(price_name(cfg))
    if price is None:
        return 0.0
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


def key_backend(cfg: JudgeConfig) -> str:
    """The backend name in cache keys: the Batch API answers exactly as the synchronous endpoint
    does, so both share one cache."""
    return "openai" if cfg.backend == "openai-batch" else cfg.backend


def reask(messages: list[dict], raw: str, error: str, attempt: int, form: dict) -> list[dict]:
    """The follow-up after an unusable answer: the judge sees it and what was wrong."""
    return list(messages) + [
        {"role": "assistant", "content": raw},
        # The attempt number keeps each re-ask (and its cache key) distinct from the last.
        {
            "role": "user",
            "content": f"Attempt {attempt} could not be used: {error}. Answer again "
            f"with only the JSON object, of this form: {form_shape(form)}",
        },
    ]


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
                completion = await backend.complete(convo, form)
            except JudgeCallError as exc:
                # Not cached: a rerun tries again.
                return {**result, "status": "error", "error": str(exc), "raw": raw}
            cache.put(key, completion)
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

    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    bar = tqdm(total=len(calls), desc="judge", unit="call", mininterval=2.0)
    results: list[dict] = [{}] * len(calls)
    # The order calls start in (the semaphore is first come, first served) is the backend's choice:
    # the local one wants the calls that share a post in flight together. Results keep plan order.
    order = backend.call_order(calls) if hasattr(backend, "call_order") else range(len(calls))

    async def one(i: int) -> None:
        messages, form = calls[i]
        async with sem:
            results[i] = await judge_call(messages, form, backend=backend, cache=cache, cfg=cfg)
        bar.update(1)

    try:
        await asyncio.gather(*(one(i) for i in order))
        return results
    finally:
        bar.close()


# ---------------------------------------------------------------- inputs


def _rows(uri: str, required: tuple[str, ...]) -> list[dict]:
    rows = []
    for lineno, row in enumerate(storage.read_jsonl(uri), 1):
        missing = [k for k in required if k not in row]
        if missing:
            raise InputError(f"{uri}: line {lineno}: missing field(s) {', '.join(missing)}")
        rows.append(row)
    return rows


def _first_file(stage_uri: str, names: tuple[str, ...]) -> str | None:
    for name in names:
        uri = storage.join(stage_uri, name)
        if storage.exists(uri):
            return uri
    return None


def instruction_prefix(data: str) -> str | None:
    """The format stage's instruction when it was put in the user turn before the post (from its
    manifest), so the judge sees the OP's post rather than our instruction to the model."""
    cfg = (storage.require_success(data).get("config") or {}).get("format") or {}  # the recipe's format section
    if cfg.get("instruction_role", "user") == "user" and cfg.get("instruction"):
        return str(cfg["instruction"]).strip()
    return None


def strip_instruction(prompt: list[dict], instruction: str | None) -> list[dict]:
    out = [dict(m) for m in prompt]
    first_user = next((m for m in out if m.get("role") == "user"), None)
    if instruction and first_user and first_user["content"].startswith(instruction):
        first_user["content"] = first_user["content"][len(instruction) :].lstrip()
    return out


def load_items(
    generations_uri: str, test_uri: str | None, instruction: str | None = None, human_reference: str = "all"
) -> list[dict]:
    """One item per test prompt: its prompt and the reply of every variant, including the human
    delta winner (variant ``human``: the first assistant turn of the test example, the one that
    answers the same prompt). Joined on the example id that the generate stage copies.

    ``human_reference: depth1`` gives the human reply only where the winning branch is a single
    comment replying to the post (metadata.comment_ids of length 1), so that the judge sees all
    that the human answered; deeper winners answered OP turns the prompt does not show."""
    items: dict[str, dict] = {}
    for row in _rows(generations_uri, ("thread_id", "model", "messages", "response")):
        item_id = str(row.get("id") or row["thread_id"])
        item = items.setdefault(
            item_id,
            {
                "item_id": item_id,
                "thread_id": str(row["thread_id"]),
                "prompt": strip_instruction(row["messages"], instruction),
                "replies": {},
                "finish": {},
            },
        )
        item["replies"][row["model"]] = row["response"]
        item["finish"][row["model"]] = row.get("finish_reason")
    if test_uri:
        for lineno, row in enumerate(_rows(test_uri, ("thread_id", "messages")), 1):
            reply = next((m.get("content") for m in row["messages"] if m.get("role") == "assistant"), None)
            if reply is None:
                raise InputError(f"{test_uri}: line {lineno}: no assistant (human reply) turn")
            item = items.get(str(row.get("id") or row["thread_id"]))
            depth = len((row.get("metadata") or {}).get("comment_ids") or [None])
            if item is not None and (human_reference == "all" or depth == 1):
                item["replies"][HUMAN] = reply
                item["finish"][HUMAN] = "stop"
    return sorted(items.values(), key=lambda i: i["item_id"])


def add_nondelta_replies(items: list[dict], pairs: list[dict], human_reference: str = "all") -> int:
    """Give each item the matched losing reply of its calibration pair (same thread, same winning
    comment: the pair id is the example id) as variant ``human_nondelta``; returns how many."""
    by_id = {p["pair_id"]: p for p in pairs}
    n = 0
    for item in items:
        pair = by_id.get(item["item_id"])
        if pair is None or (human_reference == "depth1" and len(pair.get("loser_comment_ids") or [None]) != 1):
            continue
        item["replies"][HUMAN_NONDELTA] = pair["loser"]
        item["finish"][HUMAN_NONDELTA] = "stop"
        n += 1
    return n


def _pair_prompt(row: dict) -> list[dict]:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return prompt


def _text(value: Any) -> str:
    """A reply given as text, a message dict, or a list of messages (the last one is the reply)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("content") or value.get("body") or ""
    if isinstance(value, list) and value:
        return _text(value[-1])
    return ""


def load_pairs(pairs_uri: str, instruction: str | None = None, split: str = "test") -> list[dict]:
    """Delta pairs with their tags: ``split`` (the thread's format split; ``split`` when the row has
    none, as in format outputs written before the tag) and ``period`` (before/after the time split)."""
    out = []
    for lineno, row in enumerate(_rows(pairs_uri, ("prompt",)), 1):
        winner = row.get("winner", row.get("winning_reply", row.get("positive")))
        loser = row.get("loser", row.get("losing_reply", row.get("negative")))
        if winner is None or loser is None:
            raise InputError(f"{pairs_uri}: line {lineno}: needs a winning and a losing reply")
        out.append(
            {
                "pair_id": str(row.get("pair_id", row.get("id", lineno))),
                "thread_id": row.get("thread_id"),
                "prompt": strip_instruction(_pair_prompt(row), instruction),
                "winner": _text(winner),
                "loser": _text(loser),
                "loser_comment_ids": row.get("loser_comment_ids"),
                "created_utc": row.get("created_utc"),
                "split": row.get("split") or split,
                "period": row.get("period"),
            }
        )
    return out


def _sample(rows: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- assembling judgments

CALL_FIELDS = (
    "status",
    "attempts",
    "cached_calls",
    "new_calls",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "cost_usd_this_run",
    "model",
    "system_fingerprint",
    "seed",
)


def _order_result(r: dict, first: str, second: str) -> dict:
    verdict = (r.get("verdict") or {}).get("winner")
    preferred = {"A": first, "B": second, "tie": "tie"}.get(verdict)
    keep = {k: r.get(k) for k in CALL_FIELDS}
    return {
        "first": first,
        "second": second,
        **keep,
        "verdict": verdict,
        "preferred": preferred,
        "probs": (r.get("probs") or {}).get("winner"),
        "rationale": r.get("rationale"),
        "error": r.get("error"),
        "raw": r.get("raw") if r["status"] != "ok" else None,
    }


_PREAMBLE = re.compile(
    r"^\W*(?:here'?s|here is|sure\b|certainly\b|of course\b|as an ai\b|i'?d be happy|"
    r"below is|i can help|okay,? here)",
    re.I,
)


def meta_preamble(text: str) -> bool:
    """A reply that opens by talking about itself ("Here's a revised version...") instead of
    arguing: a style flag for the length- and style-controlled preference."""
    return bool(_PREAMBLE.match(text or ""))


def reply_flags(item: dict, variant: str) -> dict:
    return {
        "truncated": item.get("finish", {}).get(variant) == "length",
        "preamble": meta_preamble(item["replies"][variant]),
    }


def pairwise_row(comparison: str, item: dict, a: str, b: str, ab: dict, ba: dict, kind: str = "pairwise") -> dict:
    orders = [_order_result(ab, a, b), _order_result(ba, b, a)]
    row = {
        "kind": kind,
        "id": f"{kind}:{comparison}:{item['item_id']}",
        "comparison": comparison,
        "item_id": item["item_id"],
        "thread_id": item["thread_id"],
        "a": a,
        "b": b,
        "orders": orders,
        "status": "ok" if all(o["status"] == "ok" for o in orders) else "failed",
        "outcome": None,
        "consistent": None,
        "words": {"a": _words(item["replies"][a]), "b": _words(item["replies"][b])},
        "flags": {"a": reply_flags(item, a), "b": reply_flags(item, b)},
    }
    if row["status"] == "ok":
        prefs = {o["preferred"] for o in orders}
        row["consistent"] = len(prefs) == 1
        pref = prefs.pop() if row["consistent"] else "tie"
        row["outcome"] = "win" if pref == a else "loss" if pref == b else "tie"
    return row


def _length(pair: dict) -> dict:
    ww, lw_ = _words(pair["winner"]), _words(pair["loser"])
    return {"winner_words": ww, "loser_words": lw_, "score": 1.0 if ww > lw_ else 0.0 if ww < lw_ else 0.5}


def pair_tags(pair: dict) -> dict:
    """The split and period of a delta pair, kept on its judgment rows: the report's headline
    calibration uses the test pairs, the time-split view all of them."""
    return {"split": pair.get("split", "test"), "period": pair.get("period")}


def calibration_row(pair: dict, wl: dict, lw: dict, kind: str = "calibration", instrument: str | None = None) -> dict:
    orders = [_order_result(wl, "winner", "loser"), _order_result(lw, "loser", "winner")]
    for o in orders:
        o["correct"] = o["preferred"] == "winner" if o["status"] == "ok" else None
    ok = all(o["status"] == "ok" for o in orders)
    row = {
        "kind": kind,
        "id": f"{instrument or kind}:{pair['pair_id']}",
        "pair_id": pair["pair_id"],
        "thread_id": pair["thread_id"],
        "created_utc": pair.get("created_utc"),
        **pair_tags(pair),
        "orders": orders,
        "status": "ok" if ok else "failed",
        "consistent": (orders[0]["preferred"] == orders[1]["preferred"]) if ok else None,
        "length": _length(pair),
    }
    if instrument:
        row["instrument"] = instrument
        row["id"] = f"validation:{instrument}:{pair['pair_id']}"
    return row


def single_row(item: dict, variant: str, r: dict, criteria: list[str]) -> dict:
    ok = r["status"] == "ok"
    weighted = {c: expected_score(r["probs"][c]) for c in criteria} if ok else None
    return {
        "kind": "single",
        "id": f"single:{variant}:{item['item_id']}",
        "item_id": item["item_id"],
        "thread_id": item["thread_id"],
        "variant": variant,
        "truncated": item.get("finish", {}).get(variant) == "length",
        "status": r["status"],
        "scores": r["verdict"] if ok else None,
        "weighted_scores": weighted,
        "score_probs": r["probs"] if ok else None,
        "rationale": r.get("rationale"),
        "error": r.get("error"),
        "raw": r.get("raw") if not ok else None,
        **{k: r.get(k) for k in CALL_FIELDS if k != "status"},
    }


def validation_single_row(pair: dict, rw: dict, rl: dict, criteria: list[str]) -> dict:
    """The rubric run on the delta winner and on its matched loser (two calls, as ``orders``)."""
    grades = []
    for label, r in (("winner", rw), ("loser", rl)):
        ok = r["status"] == "ok"
        grades.append(
            {
                "reply": label,
                **{k: r.get(k) for k in CALL_FIELDS},
                "scores": r["verdict"] if ok else None,
                "weighted_scores": {c: expected_score(r["probs"][c]) for c in criteria} if ok else None,
                "error": r.get("error"),
                "raw": r.get("raw") if not ok else None,
            }
        )
    return {
        "kind": "validation",
        "instrument": "single",
        "id": f"validation:single:{pair['pair_id']}",
        "pair_id": pair["pair_id"],
        "thread_id": pair["thread_id"],
        "created_utc": pair.get("created_utc"),
        **pair_tags(pair),
        "orders": grades,
        "status": "ok" if all(g["status"] == "ok" for g in grades) else "failed",
        "length": _length(pair),
    }


def trimmed(text: str, keep: float = 0.6) -> str:
    """The first ``keep`` share of a reply's sentences (at least one, one fewer than all): the
    same content, shorter, for the length probe."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    if len(sentences) < 2:
        words = text.split()
        return " ".join(words[: max(1, int(len(words) * keep))])
    n = min(len(sentences) - 1, max(1, round(len(sentences) * keep)))
    return " ".join(sentences[:n])


def plan_calls(items: list[dict], pairs: list[dict], cfg: JudgeConfig) -> tuple[list, list, dict]:
    """Every judge call (messages, form) and how its results map back to judgment rows."""
    calls: list[tuple[list[dict], dict]] = []
    builders = []  # (kind, context, start, n) so results map back in order
    sform = single_form(cfg.criteria)
    skipped: dict[str, int] = {}

    def two(instructions, form, prompt, x, y):
        calls.append((two_reply_messages(instructions, form, prompt, x, y, cfg.max_text_chars), form))
        calls.append((two_reply_messages(instructions, form, prompt, y, x, cfg.max_text_chars), form))

    if cfg.single:
        variants = sorted({v for i in items for v in i["replies"] if not v.startswith(HUMAN) or cfg.grade_human})
        for variant in variants:
            for item in items:
                if variant in item["replies"]:
                    builders.append(("single", (item, variant), len(calls), 1))
                    calls.append(
                        (
                            single_messages(item["prompt"], item["replies"][variant], cfg.criteria, cfg.max_text_chars),
                            sform,
                        )
                    )
    if cfg.pairwise:
        present = {v for i in items for v in i["replies"]}
        for a, b in cfg.comparisons:
            comparison = f"{a}_vs_{b}"
            if a not in present or b not in present:
                log.info(
                    "pairwise %s: no replies of %s in the generations; comparison left out",
                    comparison,
                    " or ".join(v for v in (a, b) if v not in present),
                )
                continue
            for item in items:
                if a not in item["replies"] or b not in item["replies"]:
                    skipped[comparison] = skipped.get(comparison, 0) + 1
                    continue
                builders.append(("pairwise", (comparison, item, a, b), len(calls), 2))
                two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], item["replies"][a], item["replies"][b])
        # The length probe: a model's reply against its own trimmed version (same content, shorter).
        probe_variant = next((a for a, _ in cfg.comparisons if not a.startswith(HUMAN)), None)
        probed = [i for i in items if probe_variant in i["replies"]][: max(0, cfg.length_probe_items)]
        for item in probed:
            full = item["replies"][probe_variant]
            short = trimmed(full)
            if _words(short) >= _words(full):
                continue
            probe_item = {
                **item,
                "replies": {"full": full, "trimmed": short},
                "finish": {"full": item["finish"].get(probe_variant), "trimmed": "stop"},
            }
            builders.append(("length_probe", ("full_vs_trimmed", probe_item, "full", "trimmed"), len(calls), 2))
            two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], full, short)
    for pair in pairs:
        builders.append(("calibration", (pair,), len(calls), 2))
        two(CALIBRATION_INSTRUCTIONS, CALIBRATION_FORM, pair["prompt"], pair["winner"], pair["loser"])
    if cfg.validate_instruments:
        for pair in pairs:
            if cfg.pairwise:
                builders.append(("validation_pairwise", (pair,), len(calls), 2))
                two(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, pair["prompt"], pair["winner"], pair["loser"])
            if cfg.single:
                builders.append(("validation_single", (pair,), len(calls), 2))
                for text in (pair["winner"], pair["loser"]):
                    calls.append((single_messages(pair["prompt"], text, cfg.criteria, cfg.max_text_chars), sform))
    return calls, builders, skipped


def assemble_rows(builders: list, results: list[dict], cfg: JudgeConfig) -> list[dict]:
    rows = []
    for kind, ctx, start, n in builders:
        res = results[start : start + n]
        if kind == "single":
            rows.append(single_row(ctx[0], ctx[1], res[0], cfg.criteria))
        elif kind == "pairwise":
            rows.append(pairwise_row(*ctx, res[0], res[1]))
        elif kind == "length_probe":
            rows.append(pairwise_row(*ctx, res[0], res[1], kind="length_probe"))
        elif kind == "calibration":
            rows.append(calibration_row(ctx[0], res[0], res[1]))
        elif kind == "validation_pairwise":
            rows.append(calibration_row(ctx[0], res[0], res[1], kind="validation", instrument="pairwise"))
        else:
            rows.append(validation_single_row(ctx[0], res[0], res[1], cfg.criteria))
    return rows


def estimate_cost(
    calls: list[tuple[list[dict], dict]], cfg: JudgeConfig, cache: ResponseCache | None, params: dict
) -> dict:
    """Calls not in the cache, their estimated tokens (prompt: characters / 4; completion: up to
    max_tokens, estimated at a third) and cost at the configured price (batch price for the Batch
    backend). Re-asks after unparseable answers come on top."""
    new = [
        (m, f)
        for m, f in calls
        if cache is None or cache.get(cache_key(key_backend(cfg), cfg.model, m, f, params)) is None
    ]
    prompt = sum(len(json.dumps(m, ensure_ascii=False)) // 4 for m, _ in new)
    completion = len(new) * max(1, cfg.max_tokens // 3)
    price = cfg.prices.get(price_name(cfg))
    cost = None if price is None else (prompt * price["input"] + completion * price["output"]) / 1e6
    if cfg.backend == "local":
        cost = 0.0
    return {
        "calls": len(calls),
        "new_calls": len(new),
        "cached_calls": len(calls) - len(new),
        "est_prompt_tokens": prompt,
        "est_completion_tokens": completion,
        "est_cost_usd": cost,
        "price": price_name(cfg) if price else None,
    }


def plan_and_judge(
    items: list[dict], pairs: list[dict], cfg: JudgeConfig, backend, cache: ResponseCache
) -> tuple[list[dict], dict]:
    """Build every judge call, run them concurrently, and assemble judgment rows in a fixed order."""
    calls, builders, skipped = plan_calls(items, pairs, cfg)
    for comparison, n in skipped.items():
        log.warning("pairwise %s: %d prompt(s) skipped, a side has no reply", comparison, n)
    counts = {}
    for b in builders:
        counts[b[0]] = counts.get(b[0], 0) + 1
    log.info("judging: %d call(s) for %s", len(calls), ", ".join(f"{n} {k}" for k, n in counts.items()))
    if cfg.max_cost_usd is not None:
        est = estimate_cost(calls, cfg, cache, backend.params())
        if est["est_cost_usd"] is not None and est["est_cost_usd"] > cfg.max_cost_usd:
            raise JudgeBudgetError(
                f"the {est['new_calls']} new judge call(s) would cost about "
                f"${est['est_cost_usd']:.2f} > judge.max_cost_usd={cfg.max_cost_usd}; nothing "
                f"was sent (cmv judge --dry-run shows the plan)"
            )

    async def go():
        try:
            if hasattr(backend, "prefetch"):
                await backend.prefetch(calls, cache)
            return await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
        finally:
            await backend.aclose()

    results = asyncio.run(go())
    return assemble_rows(builders, results, cfg), {"calls": len(calls), "skipped_pairwise": skipped}


# ---------------------------------------------------------------- the stage


def _validate(cfg: JudgeConfig) -> None:
    unknown = [c for c in cfg.criteria if c not in CRITERIA]
    if unknown or not cfg.criteria:
        raise errors.InputError(f"judge.criteria: unknown {unknown}; known: {list(CRITERIA)}")
    if cfg.response_format not in ("json_schema", "json_object", "none"):
        raise errors.InputError(
            f"judge.response_format must be json_schema, json_object or none, got {cfg.response_format!r}"
        )
    for comp in cfg.comparisons:
        if len(comp) != 2 or comp[0] == comp[1]:
            raise errors.InputError(f"judge.comparisons: each entry is two different variants, got {comp!r}")
    if cfg.human_reference not in ("depth1", "all"):
        raise errors.InputError(f"judge.human_reference must be depth1 or all, got {cfg.human_reference!r}")
    if cfg.token_limit_param not in ("max_completion_tokens", "max_tokens"):
        raise errors.InputError(
            f"judge.token_limit_param must be max_completion_tokens or max_tokens, got {cfg.token_limit_param!r}"
        )


def load_inputs(generations: str, data: str, config: JudgeConfig) -> tuple[list[dict], list[dict]]:
    """The test prompts with every variant's reply (human references included) and the sampled
    calibration pairs."""
    instruction = instruction_prefix(data)
    generations_uri = _first_file(generations, ("generations.jsonl", "generations.jsonl.gz"))
    if generations_uri is None:
        raise InputError(f"{generations} has no generations.jsonl")
    test_uri = _first_file(data, ("test.jsonl", "test.jsonl.gz"))
    items = _sample(
        load_items(generations_uri, test_uri, instruction, config.human_reference), config.max_items, config.seed
    )
    pairs_uri = _first_file(data, ("pairs.jsonl", "pairs.jsonl.gz"))
    all_pairs = load_pairs(pairs_uri, instruction) if pairs_uri else []
    if config.nondelta_reference:
        add_nondelta_replies(items, all_pairs, config.human_reference)
    pairs: list[dict] = []
    before: list[dict] = []
    if config.calibration:
        if pairs_uri:
            pairs = _sample(all_pairs, config.max_calibration_pairs, config.seed)
        else:
            log.warning("%s has no pairs.jsonl: no calibration", data)
        # The format stage writes it under split: time (file name of cmv_core.format.stage.BEFORE_PAIRS).
        before_uri = _first_file(data, ("pairs_before.jsonl", "pairs_before.jsonl.gz"))
        if before_uri:
            before = _sample(
                load_pairs(before_uri, instruction, split="train"), before_pairs_cap(config, len(pairs)), config.seed
            )
    log.info(
        "loaded %d prompt(s) with variants %s, %d calibration pair(s)%s",
        len(items),
        sorted({v for i in items for v in i["replies"]}),
        len(pairs),
        f" and {len(before)} train-period pair(s) for the time split" if before else "",
    )
    return items, pairs + before


def before_pairs_cap(config: JudgeConfig, n_test_pairs: int) -> int:
    """How many train-period pairs to judge: judge.max_before_pairs, else the cap of the test pairs
    (judge.max_calibration_pairs applies per group), else as many as the test pairs judged (equal
    groups give the most power for the calls, and an uncapped run does not judge the whole
    training period)."""
    if config.max_before_pairs is not None:
        return max(0, config.max_before_pairs)
    if config.max_calibration_pairs is not None:
        return config.max_calibration_pairs
    return n_test_pairs


def time_split_utc(data: str, config: JudgeConfig) -> float | None:
    """The date of the time-split view: judge.validation_split_date, else the format stage's
    test_after when it split by time."""
    from cmv_core.config import parse_utc

    when = config.validation_split_date
    if when is None:
        fmt = storage.require_success(data).get("config") or {}
        fmt = fmt.get("format", fmt)
        if fmt.get("split") == "time":
            when = fmt.get("test_after")
    return parse_utc(str(when)) if when else None


def dry_run(generations: str, data: str, output: str, config: JudgeConfig) -> dict:
    """The plan without a single call: calls, how many are cached, estimated tokens and cost."""
    _validate(config)
    items, pairs = load_inputs(generations, data, config)
    calls, _, _ = plan_calls(items, pairs, config)
    cache_uri = config.cache or storage.join(output, "cache")
    # Reading the cache writes nothing (a cache file is only opened on the first put).
    cache = ResponseCache(cache_uri, config.cache_flush_every)
    return estimate_cost(calls, config, cache, planned_params(config))


def planned_params(cfg: JudgeConfig) -> dict:
    """The backend's params() without building a client (the dry run needs no key or model)."""
    if cfg.backend == "local":
        return {"rationale_tokens": cfg.local_rationale_tokens, "dtype": local_dtype(cfg.local_dtype)}
    base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    return {
        "temperature": cfg.temperature,
        cfg.token_limit_param: cfg.max_tokens,
        "response_format": cfg.response_format,
        "logprobs": cfg.logprobs,
        "top_logprobs": cfg.top_logprobs if cfg.logprobs else None,
        "seed": cfg.api_seed,
        "base_url": base_url.rstrip("/"),
    }


HUMAN_REFERENCE_TEXT = {
    "depth1": "only delta winners that reply to the post itself (depth 1) are used as the human reference, "
    "and only depth-1 non-delta replies as the ordinary-commenter reference, so the judge sees "
    "everything the human reply answered.",
    "all": "every delta winner is used as the human reference, including deep ones that answered OP "
    "follow-ups the judge does not see in the single view (unfair to the human side).",
}


def stage_seconds(manifest: dict) -> float | None:
    import datetime as dt

    try:
        return (
            dt.datetime.fromisoformat(manifest["finished_at"]) - dt.datetime.fromisoformat(manifest["started_at"])
        ).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def training_seconds(generations: str) -> float | None:
    """How long the training behind these generations ran, to print beside the judge's own time:
    the sum over the train-stage manifests among the generate stage's inputs (SFT, and DPO when its
    model was generated from too); None when none is found."""
    total = None
    try:
        for inp in storage.require_success(generations).get("inputs") or []:
            uri = inp.get("uri") if isinstance(inp, dict) else inp
            if uri and storage.exists(storage.join(uri, "_SUCCESS")):
                manifest = storage.require_success(uri)
                seconds = stage_seconds(manifest) if manifest.get("stage") == "train" else None
                if seconds is not None:
                    total = (total or 0.0) + seconds
    except Exception:  # noqa: BLE001 - a missing or foreign manifest only means "not known"
        return None
    return total


def provenance(rows: list[dict], cfg: JudgeConfig) -> dict:
    """The model snapshots and system fingerprints the endpoint reported, over every call."""
    calls = [c for r in rows for c in (r["orders"] if "orders" in r else [r])]
    return {
        "models": sorted({c["model"] for c in calls if c.get("model")}),
        "system_fingerprints": sorted({c["system_fingerprint"] for c in calls if c.get("system_fingerprint")}),
        "seed": cfg.api_seed if cfg.backend != "local" else None,
    }


def run_judge(
    generations: str, data: str, output: str, config: JudgeConfig, run_id: str | None = None, force: bool = False
) -> dict:
    """Judge the generate stage's replies; writes judgments.jsonl, report.json, report.md and plots."""
    from cmv_core import config as config_mod
    from cmv_core.report import build as report_mod

    _validate(config)
    # Begin (skipped when _SUCCESS matches inputs and config)
    run = storage.begin_stage(
        "judge", output, inputs=[generations, data], config=config_mod.to_dict(config), run_id=run_id, force=force
    )
    if run is None:
        return storage.require_success(output)
    started = time.monotonic()

    # Load
    items, pairs = load_inputs(generations, data, config)

    # Judge (through the cache)
    cache = ResponseCache(config.cache or storage.join(output, "cache"), config.cache_flush_every)
    try:
        backend = make_backend(config)
        rows, plan = plan_and_judge(items, pairs, config, backend, cache)
    finally:
        cache.close()

    # Write judgments, report and plots
    storage.write_jsonl(storage.join(output, "judgments.jsonl"), rows)
    meta = {
        "run_id": run.run_id,
        "rubric_version": RUBRIC_VERSION,
        "backend": config.backend,
        "judge_model": config.model,
        "n_prompts": len(items),
        "calls_planned": plan["calls"],
        "skipped_pairwise": plan["skipped_pairwise"],
        "prices_usd_per_mtok": config.prices.get(price_name(config)),
        "comparisons": [list(c) for c in config.comparisons],
        "base_variant": "base",
        "human_variant": HUMAN,
        "human_reference": HUMAN_REFERENCE_TEXT[config.human_reference]
        + (f" Every text passes the same cut rule: at most {config.max_text_chars} characters, marked '[...cut]'."),
        "time_split_utc": time_split_utc(data, config),
        "provenance": provenance(rows, config),
        "judge_seconds": round(time.monotonic() - started, 1),
        "train_seconds": training_seconds(generations),
    }
    report = report_mod.build_report(
        rows, criteria=config.criteria, meta=meta, n_boot=config.bootstrap_samples, seed=config.seed
    )
    plots = report_mod.render_plots(report)
    for name, png in plots.items():
        storage.write_bytes(storage.join(output, name), png)
    report["plots"] = sorted(plots)
    storage.write_json(storage.join(output, "report.json"), report)
    storage.write_text(storage.join(output, "report.md"), report_mod.render_markdown(report, sorted(plots)))

    usage, failures = report["usage"], report["failures"]
    log.info(
        "judge: %d judgment(s), %d call(s) (%d cached, %d new), %d failed call(s), %d+%d tokens, $%.4f "
        "this run, %.1f s",
        len(rows),
        usage["attempts"],
        usage["cached_calls"],
        usage["new_calls"],
        failures["failed_calls"],
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["cost_usd_this_run"],
        time.monotonic() - started,
    )
    train_s = meta["train_seconds"]
    print(
        f"judge time {meta['judge_seconds']:.0f} s" + (f" (training took {train_s:.0f} s)" if train_s else ""),
        flush=True,
    )
    total_calls = sum(len(r.get("orders", [r])) for r in rows)
    if total_calls and failures["failed_calls"] / total_calls > config.max_failed_fraction:
        raise JudgeFailed(
            f"{failures['failed_calls']} of {total_calls} judge calls failed "
            f"(> judge.max_failed_fraction={config.max_failed_fraction}); see "
            f"{storage.join(output, 'report.md')}. No _SUCCESS written; a rerun reuses the cache."
        )

    # Finish: _SUCCESS last
    summary = {
        "judgments": len(rows),
        "failed_calls": failures["failed_calls"],
        "judge_seconds": meta["judge_seconds"],
        "train_seconds": meta["train_seconds"],
        "excluded_judgments": failures["excluded_judgments"],
        "calls": usage["attempts"],
        "cached_calls": usage["cached_calls"],
        "new_calls": usage["new_calls"],
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cost_usd": usage["cost_usd"],
        "cost_usd_this_run": usage["cost_usd_this_run"],
    }
    if report["calibration"]:
        summary["calibration_accuracy"] = report["calibration"]["accuracy"]["rate"]
    return storage.finish_stage(run, summary, declared=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generations", required=True, help="generate stage output (dir or URI)")
    parser.add_argument("--data", required=True, help="format stage output (test.jsonl, pairs.jsonl)")
    parser.add_argument("--output", required=True, help="where judgments and the report go (dir or URI)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the number of judge calls, estimated tokens and cost, and exit (nothing is sent)",
    )


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core import config as config_mod

    recipe = config_mod.load_recipe(args.config, args.set)
    cfg = config_mod.section(recipe, "judge", JudgeConfig)
    if getattr(args, "dry_run", False):
        est = dry_run(args.generations, args.data, args.output, cfg)
        cost = "unpriced" if est["est_cost_usd"] is None else f"${est['est_cost_usd']:.4f}"
        print(
            f"dry run: {est['calls']} judge call(s), {est['new_calls']} new ({est['cached_calls']} cached); "
            f"estimated {est['est_prompt_tokens']} prompt + {est['est_completion_tokens']} completion tokens; "
            f"estimated cost {cost} (re-asks after unparseable answers not included)"
        )
        print(json.dumps(est))
        return 0
    manifest = run_judge(args.generations, args.data, args.output, cfg, run_id=args.run_id, force=args.force)
    print(f"report: {storage.join(args.output, 'report.md')}")
    summary = manifest.get("summary", {})
    print(
        json.dumps(
            {
                k: summary.get(k)
                for k in (
                    "judgments",
                    "failed_calls",
                    "new_calls",
                    "cached_calls",
                    "cost_usd_this_run",
                    "calibration_accuracy",
                )
            }
        )
    )
    return 0
