"""The judge stage: score generated replies with an LLM judge and write the report.

Three kinds of judgment, all from one rubric version:

- single: each reply (every generated variant, and the human reply that won the delta) graded
  1-7 on each criterion of ``CRITERIA`` with a short rationale;
- pairwise: the fine-tuned reply against the base model's and against the human winner,
  each pair judged in both orders; when the orders disagree the pair is a tie and is
  counted as inconsistent;
- calibration: on the format stage's ``pairs.jsonl`` the judge picks which of two human
  replies won the delta (both orders), reported beside a length baseline on the same pairs.

Backends: any OpenAI-compatible chat endpoint (``openai.AsyncOpenAI``: its own retries with
backoff on 429/5xx/timeouts, bounded concurrency here) and a local in-process model that
fills the verdict JSON itself and reads the score digit from next-token probabilities.
Every judge call goes through a persistent cache under the output, so a rerun or a resumed
run repeats no call. A verdict that cannot be parsed is asked again, then recorded as a
failure and excluded from every score.
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
from dataclasses import dataclass, field
from typing import Any

from cmv_core import errors, storage

log = logging.getLogger(__name__)

# Bump when a prompt, rubric or form changes: it is part of every cache key and of the report.
RUBRIC_VERSION = "cmv-likert7-v1"
LIKERT = [1, 2, 3, 4, 5, 6, 7]
HUMAN = "human"  # the variant name of the human reply that won the delta (from test.jsonl)

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
    "prefer one. Answer \"tie\" only if neither is more persuasive.\n\n"
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
}


@dataclass
class JudgeConfig:
    backend: str = "openai"                  # "openai" (any OpenAI-compatible endpoint) or "local"
    model: str = "gpt-4o-mini"               # judge model name, or a model spec for the local backend
    base_url: str | None = None              # default: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str = "OPENAI_API_KEY"      # the key is read from this variable, never from config
    concurrency: int = 16                    # judge calls in flight at once
    max_retries: int = 6                     # the openai client's own retries (429/5xx/timeouts)
    timeout_s: float = 60.0                  # per request
    parse_retries: int = 2                   # extra asks after an unparseable verdict
    temperature: float = 0.0
    max_tokens: int = 400
    response_format: str = "json_schema"     # json_schema | json_object | none
    logprobs: bool = True                    # ask for top log-probabilities (weighted Likert score)
    top_logprobs: int = 10
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    single: bool = True
    grade_human: bool = True                 # also grade the human delta-winning reply
    pairwise: bool = True
    # "finetuned" is the SFT model; "dpo" (when generated) the DPO model trained from it. A comparison whose
    # variant no item has (no DPO in this run) is left out.
    comparisons: list[list[str]] = field(default_factory=lambda: [["finetuned", "base"],
                                                                   ["finetuned", HUMAN],
                                                                   ["dpo", "finetuned"], ["dpo", "base"],
                                                                   ["dpo", HUMAN]])
    calibration: bool = True
    max_items: int | None = None             # cap on test prompts judged (seeded sample)
    max_calibration_pairs: int | None = None  # cap on calibration pairs (seeded sample)
    max_text_chars: int = 6000               # longer post/reply texts are cut (and marked) in prompts
    local_rationale_tokens: int = 0          # local backend: greedy rationale tokens before scores
    max_failed_fraction: float = 0.2         # more failed calls than this fails the stage
    cache: str | None = None                 # cache URI (default: <output>/cache)
    cache_flush_every: int = 50              # S3 cache: entries per uploaded shard
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
        obj = json.loads(text[start:end + 1])
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


def choice_probabilities(tokens: list[dict] | None, name: str, allowed: list,
                         chosen: Any) -> dict[str, float] | None:
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


def single_messages(prompt_messages: list[dict], reply: str, criteria: list[str],
                    max_chars: int) -> list[dict]:
    rubric = "\n".join(f"- {c}: {CRITERIA[c]}" for c in criteria)
    system = CMV_INTRO + "\n\n" + SINGLE_INSTRUCTIONS.format(rubric=rubric,
                                                            shape=form_shape(single_form(criteria)))
    user = render_context(prompt_messages, max_chars) + "\n\n## Reply to evaluate\n" + _cut(reply, max_chars)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def two_reply_messages(instructions: str, form: dict, prompt_messages: list[dict], first: str,
                       second: str, max_chars: int) -> list[dict]:
    system = CMV_INTRO + "\n\n" + instructions.format(shape=form_shape(form))
    user = (render_context(prompt_messages, max_chars) + "\n\n## Reply A\n" + _cut(first, max_chars)
            + "\n\n## Reply B\n" + _cut(second, max_chars))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- cache

def cache_key(backend: str, model: str, messages: list[dict], form: dict, params: dict) -> str:
    """sha256 over everything that decides the answer: judge, full prompt (replies included),
    form, sampling parameters and the rubric version."""
    blob = json.dumps({"rubric": RUBRIC_VERSION, "backend": backend, "model": model,
                       "messages": messages, "form": form, "params": params},
                      sort_keys=True, ensure_ascii=False)
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
        from openai import AsyncOpenAI

        base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            if base_url is None:
                raise JudgeCallError(f"${cfg.api_key_env} is not set (needed for the OpenAI judge); "
                                     "set it, or point judge.base_url / $OPENAI_BASE_URL at another server, "
                                     "or use judge.backend=local")
            api_key = "EMPTY"  # self-hosted servers (vLLM) often need no key
        self.cfg = cfg
        self._secret = api_key if api_key != "EMPTY" else None
        self.client = AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=cfg.max_retries,
                                  timeout=cfg.timeout_s)

    def _redact(self, text: str) -> str:
        """An error text without the API key (a server or proxy may echo it back)."""
        return text.replace(self._secret, "***") if self._secret else text

    def params(self) -> dict:
        c = self.cfg
        return {"temperature": c.temperature, "max_tokens": c.max_tokens, "response_format": c.response_format,
                "logprobs": c.logprobs, "top_logprobs": c.top_logprobs if c.logprobs else None}

    async def complete(self, messages: list[dict], form: dict) -> dict:
        import openai

        c = self.cfg
        kwargs: dict[str, Any] = {"model": c.model, "messages": messages, "temperature": c.temperature,
                                  "max_tokens": c.max_tokens}
        if c.response_format == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "verdict", "strict": True, "schema": json_schema(form)}}
        elif c.response_format == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        if c.logprobs:
            kwargs.update(logprobs=True, top_logprobs=c.top_logprobs)
        try:
            resp = await self.client.chat.completions.create(**kwargs)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as exc:
            # Configuration errors: every call would fail the same way, so stop the stage. The
            # message is redacted and the original exception (which holds it verbatim) not chained.
            raise JudgeConfigError(self._redact(f"judge endpoint refused the call: {type(exc).__name__}: {exc}")) \
                from None
        except (openai.APIError, ValueError) as exc:
            raise JudgeCallError(self._redact(f"{type(exc).__name__}: {exc}")) from None
        if not resp.choices:
            raise JudgeCallError("the response has no choices")
        choice = resp.choices[0]
        tokens = None
        if choice.logprobs is not None and choice.logprobs.content:
            tokens = [{"token": t.token, "top": [[a.token, a.logprob] for a in (t.top_logprobs or [])]}
                      for t in choice.logprobs.content]
        usage = resp.usage
        # redacted before anything stores it (cache, judgments, report): a server may echo the key
        return {"text": self._redact(choice.message.content or ""), "finish_reason": choice.finish_reason, "tokens": tokens,
                "prompt_tokens": usage.prompt_tokens if usage else 0,
                "completion_tokens": usage.completion_tokens if usage else 0}

    async def aclose(self) -> None:
        await self.client.close()


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
        self.model = load_causal_lm(cfg.model, dtype=torch.float32)
        self.model.eval()
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses every core
        self._prefixes: dict[tuple[int, ...], Any] = {}  # KV cache of each system prompt (one per kind)

    def params(self) -> dict:
        return {"rationale_tokens": self.cfg.local_rationale_tokens}

    async def complete(self, messages: list[dict], form: dict) -> dict:
        return await asyncio.to_thread(self._complete, messages, form)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _system_prefix(self, messages: list[dict], prompt_ids: list[int]) -> tuple[int, ...]:
        """The token ids of the rendered system turn when they are a clean prefix of the prompt."""
        if not messages or messages[0]["role"] != "system" or len(self._prefixes) > 8:
            return ()
        text = self.tokenizer.apply_chat_template(messages[:1], tokenize=False)
        ids = self._ids(text)
        return tuple(ids) if 0 < len(ids) < len(prompt_ids) and prompt_ids[:len(ids)] == ids else ()

    def _complete(self, messages: list[dict], form: dict) -> dict:
        from transformers import DynamicCache

        torch = self.torch
        with self._lock, torch.inference_mode():
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            # One KV cache per answer: the prompt is encoded once, each piece after it costs a few
            # tokens. The system prompt (the rubric, most of the prompt) is shared by every call of
            # a kind, so its KV cache is computed once and copied.
            prefix = self._system_prefix(messages, prompt_ids)
            if prefix:
                if prefix not in self._prefixes:
                    self._prefixes[prefix] = DynamicCache(config=self.model.config)
                    self.model(input_ids=torch.tensor([list(prefix)]), cache=self._prefixes[prefix], use_cache=True)
                kv = copy.deepcopy(self._prefixes[prefix])
            else:
                kv = DynamicCache(config=self.model.config)
            state: dict[str, Any] = {"logits": None, "n": 0}
            pieces: list[dict] = []

            def feed(ids: list[int], text: str | None = None, top=None) -> None:
                out = self.model(input_ids=torch.tensor([ids]), cache=kv, use_cache=True)
                state["logits"] = out.logits[0, -1]
                if text is not None:
                    pieces.append({"token": text, "top": top or []})
                    state["n"] += len(ids)

            feed(prompt_ids[len(prefix):])
            feed(self._ids('{"rationale": "'), '{"rationale": "')
            for _ in range(self.cfg.local_rationale_tokens):
                next_id = int(state["logits"].argmax())
                piece = self.tokenizer.decode([next_id])
                if next_id == self.tokenizer.eos_token_id or any(ch in piece for ch in '"\\') or \
                        any(ord(ch) < 32 for ch in piece):
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
            return {"text": "".join(p["token"] for p in pieces), "finish_reason": "stop", "tokens": pieces,
                    "prompt_tokens": len(prompt_ids), "completion_tokens": state["n"] + 1}

    async def aclose(self) -> None:
        return None


def make_backend(cfg: JudgeConfig):
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "local":
        return LocalBackend(cfg)
    raise ValueError(f"judge.backend must be 'openai' or 'local', got {cfg.backend!r}")


# ---------------------------------------------------------------- one judgment, many judgments

def call_cost(cfg: JudgeConfig, prompt_tokens: int, completion_tokens: int) -> float:
    if cfg.backend == "local":
        return 0.0
    price = cfg.prices.get(cfg.model)
    if price is None:
        return 0.0
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6


async def judge_call(messages: list[dict], form: dict, *, backend, cache: ResponseCache,
                     cfg: JudgeConfig) -> dict:
    """Ask until the verdict parses (at most 1 + parse_retries asks), through the cache.

    A re-ask shows the judge its unusable answer and why, so it is a different prompt with its
    own cache key: a rerun replays the same sequence from the cache and asks nothing new."""
    result: dict[str, Any] = {"status": None, "attempts": 0, "cached_calls": 0, "new_calls": 0,
                              "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0,
                              "cost_usd_this_run": 0.0}
    convo = list(messages)
    raw = error = None
    for attempt in range(1, cfg.parse_retries + 2):
        key = cache_key(cfg.backend, cfg.model, convo, form, backend.params())
        completion = cache.get(key)
        cached = completion is not None
        if not cached:
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
        try:
            verdict = parse_verdict(raw, form)
        except VerdictError as exc:
            error = str(exc)
            if completion.get("finish_reason") == "length":
                error += " (the answer hit max_tokens)"
            convo = list(messages) + [
                {"role": "assistant", "content": raw},
                # The attempt number keeps each re-ask (and its cache key) distinct from the last.
                {"role": "user", "content": f"Attempt {attempt} could not be used: {error}. Answer again "
                                            f"with only the JSON object, of this form: {form_shape(form)}"}]
            continue
        probs = {name: choice_probabilities(completion.get("tokens"), name, allowed, verdict[name])
                 for name, allowed in form.items()}
        return {**result, "status": "ok", "verdict": {k: verdict[k] for k in form},
                "rationale": verdict["rationale"], "probs": probs}
    return {**result, "status": "unparseable", "error": error, "raw": raw}


async def run_calls(calls: list[tuple[list[dict], dict]], *, backend, cache: ResponseCache,
                    cfg: JudgeConfig) -> list[dict]:
    """All calls, at most ``concurrency`` in flight; results in the order of ``calls``."""
    from tqdm import tqdm

    sem = asyncio.Semaphore(max(1, cfg.concurrency))
    bar = tqdm(total=len(calls), desc="judge", unit="call", mininterval=2.0)

    async def one(messages, form):
        async with sem:
            out = await judge_call(messages, form, backend=backend, cache=cache, cfg=cfg)
        bar.update(1)
        return out

    try:
        return list(await asyncio.gather(*(one(m, f) for m, f in calls)))
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
    cfg = storage.require_success(data).get("config") or {}
    if cfg.get("instruction_role", "user") == "user" and cfg.get("instruction"):
        return str(cfg["instruction"]).strip()
    return None


def strip_instruction(prompt: list[dict], instruction: str | None) -> list[dict]:
    out = [dict(m) for m in prompt]
    first_user = next((m for m in out if m.get("role") == "user"), None)
    if instruction and first_user and first_user["content"].startswith(instruction):
        first_user["content"] = first_user["content"][len(instruction):].lstrip()
    return out


def load_items(generations_uri: str, test_uri: str | None, instruction: str | None = None) -> list[dict]:
    """One item per test prompt: its prompt and the reply of every variant, including the human
    delta winner (variant ``human``: the first assistant turn of the test example, the one that
    answers the same prompt). Joined on the example id that the generate stage copies."""
    items: dict[str, dict] = {}
    for row in _rows(generations_uri, ("thread_id", "model", "messages", "response")):
        item_id = str(row.get("id") or row["thread_id"])
        item = items.setdefault(item_id, {"item_id": item_id, "thread_id": str(row["thread_id"]),
                                          "prompt": strip_instruction(row["messages"], instruction),
                                          "replies": {}})
        item["replies"][row["model"]] = row["response"]
    if test_uri:
        for lineno, row in enumerate(_rows(test_uri, ("thread_id", "messages")), 1):
            reply = next((m.get("content") for m in row["messages"] if m.get("role") == "assistant"), None)
            if reply is None:
                raise InputError(f"{test_uri}: line {lineno}: no assistant (human reply) turn")
            item = items.get(str(row.get("id") or row["thread_id"]))
            if item is not None:
                item["replies"][HUMAN] = reply
    return sorted(items.values(), key=lambda i: i["item_id"])


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


def load_pairs(pairs_uri: str, instruction: str | None = None) -> list[dict]:
    out = []
    for lineno, row in enumerate(_rows(pairs_uri, ("prompt",)), 1):
        winner = row.get("winner", row.get("winning_reply", row.get("positive")))
        loser = row.get("loser", row.get("losing_reply", row.get("negative")))
        if winner is None or loser is None:
            raise InputError(f"{pairs_uri}: line {lineno}: needs a winning and a losing reply")
        out.append({"pair_id": str(row.get("pair_id", row.get("id", lineno))), "thread_id": row.get("thread_id"),
                    "prompt": strip_instruction(_pair_prompt(row), instruction), "winner": _text(winner), "loser": _text(loser)})
    return out


def _sample(rows: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _words(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------- assembling judgments

def _order_result(r: dict, first: str, second: str) -> dict:
    verdict = (r.get("verdict") or {}).get("winner")
    preferred = {"A": first, "B": second, "tie": "tie"}.get(verdict)
    keep = {k: r[k] for k in ("status", "attempts", "cached_calls", "new_calls", "prompt_tokens",
                              "completion_tokens", "cost_usd", "cost_usd_this_run")}
    return {"first": first, "second": second, **keep, "verdict": verdict, "preferred": preferred,
            "probs": (r.get("probs") or {}).get("winner"), "rationale": r.get("rationale"),
            "error": r.get("error"), "raw": r.get("raw") if r["status"] != "ok" else None}


def pairwise_row(comparison: str, item: dict, a: str, b: str, ab: dict, ba: dict) -> dict:
    orders = [_order_result(ab, a, b), _order_result(ba, b, a)]
    row = {"kind": "pairwise", "id": f"pairwise:{comparison}:{item['item_id']}", "comparison": comparison,
           "item_id": item["item_id"], "thread_id": item["thread_id"], "a": a, "b": b, "orders": orders,
           "status": "ok" if all(o["status"] == "ok" for o in orders) else "failed",
           "outcome": None, "consistent": None}
    if row["status"] == "ok":
        prefs = {o["preferred"] for o in orders}
        row["consistent"] = len(prefs) == 1
        pref = prefs.pop() if row["consistent"] else "tie"
        row["outcome"] = "win" if pref == a else "loss" if pref == b else "tie"
    return row


def calibration_row(pair: dict, wl: dict, lw: dict) -> dict:
    orders = [_order_result(wl, "winner", "loser"), _order_result(lw, "loser", "winner")]
    for o in orders:
        o["correct"] = o["preferred"] == "winner" if o["status"] == "ok" else None
    ww, lw_ = _words(pair["winner"]), _words(pair["loser"])
    ok = all(o["status"] == "ok" for o in orders)
    return {"kind": "calibration", "id": f"calibration:{pair['pair_id']}", "pair_id": pair["pair_id"],
            "thread_id": pair["thread_id"], "orders": orders, "status": "ok" if ok else "failed",
            "consistent": (orders[0]["preferred"] == orders[1]["preferred"]) if ok else None,
            "length": {"winner_words": ww, "loser_words": lw_,
                       "score": 1.0 if ww > lw_ else 0.0 if ww < lw_ else 0.5}}


def single_row(item: dict, variant: str, r: dict, criteria: list[str]) -> dict:
    ok = r["status"] == "ok"
    weighted = {c: expected_score(r["probs"][c]) for c in criteria} if ok else None
    return {"kind": "single", "id": f"single:{variant}:{item['item_id']}", "item_id": item["item_id"],
            "thread_id": item["thread_id"], "variant": variant,
            "status": r["status"], "scores": r["verdict"] if ok else None, "weighted_scores": weighted,
            "score_probs": r["probs"] if ok else None, "rationale": r.get("rationale"),
            "error": r.get("error"), "raw": r.get("raw") if not ok else None,
            **{k: r[k] for k in ("attempts", "cached_calls", "new_calls", "prompt_tokens", "completion_tokens",
                                 "cost_usd", "cost_usd_this_run")}}


def plan_and_judge(items: list[dict], pairs: list[dict], cfg: JudgeConfig, backend,
                   cache: ResponseCache) -> tuple[list[dict], dict]:
    """Build every judge call, run them concurrently, and assemble judgment rows in a fixed order."""
    calls: list[tuple[list[dict], dict]] = []
    builders = []  # (kind, context, slice of calls) so results map back in order
    sform = single_form(cfg.criteria)
    skipped: dict[str, int] = {}

    if cfg.single:
        variants = sorted({v for i in items for v in i["replies"] if v != HUMAN or cfg.grade_human})
        for variant in variants:
            for item in items:
                if variant in item["replies"]:
                    builders.append(("single", (item, variant), len(calls), 1))
                    calls.append((single_messages(item["prompt"], item["replies"][variant], cfg.criteria,
                                                  cfg.max_text_chars), sform))
    if cfg.pairwise:
        present = {v for i in items for v in i["replies"]}
        for a, b in cfg.comparisons:
            comparison = f"{a}_vs_{b}"
            if a not in present or b not in present:
                log.info("pairwise %s: no replies of %s in the generations; comparison left out", comparison,
                         " or ".join(v for v in (a, b) if v not in present))
                continue
            for item in items:
                if a not in item["replies"] or b not in item["replies"]:
                    skipped[comparison] = skipped.get(comparison, 0) + 1
                    continue
                ra, rb = item["replies"][a], item["replies"][b]
                builders.append(("pairwise", (comparison, item, a, b), len(calls), 2))
                calls.append((two_reply_messages(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], ra, rb,
                                                 cfg.max_text_chars), PAIRWISE_FORM))
                calls.append((two_reply_messages(PAIRWISE_INSTRUCTIONS, PAIRWISE_FORM, item["prompt"], rb, ra,
                                                 cfg.max_text_chars), PAIRWISE_FORM))
    for pair in pairs:
        builders.append(("calibration", (pair,), len(calls), 2))
        calls.append((two_reply_messages(CALIBRATION_INSTRUCTIONS, CALIBRATION_FORM, pair["prompt"], pair["winner"],
                                         pair["loser"], cfg.max_text_chars), CALIBRATION_FORM))
        calls.append((two_reply_messages(CALIBRATION_INSTRUCTIONS, CALIBRATION_FORM, pair["prompt"], pair["loser"],
                                         pair["winner"], cfg.max_text_chars), CALIBRATION_FORM))
    for comparison, n in skipped.items():
        log.warning("pairwise %s: %d prompt(s) skipped, a side has no reply", comparison, n)

    log.info("judging: %d call(s) for %d single, %d pairwise, %d calibration judgment(s)", len(calls),
             sum(b[0] == "single" for b in builders), sum(b[0] == "pairwise" for b in builders),
             sum(b[0] == "calibration" for b in builders))

    async def go():
        try:
            return await run_calls(calls, backend=backend, cache=cache, cfg=cfg)
        finally:
            await backend.aclose()

    results = asyncio.run(go())
    rows = []
    for kind, ctx, start, n in builders:
        res = results[start:start + n]
        if kind == "single":
            rows.append(single_row(ctx[0], ctx[1], res[0], cfg.criteria))
        elif kind == "pairwise":
            rows.append(pairwise_row(*ctx, res[0], res[1]))
        else:
            rows.append(calibration_row(ctx[0], res[0], res[1]))
    return rows, {"calls": len(calls), "skipped_pairwise": skipped}


# ---------------------------------------------------------------- the stage

def _validate(cfg: JudgeConfig) -> None:
    unknown = [c for c in cfg.criteria if c not in CRITERIA]
    if unknown or not cfg.criteria:
        raise ValueError(f"judge.criteria: unknown {unknown}; known: {list(CRITERIA)}")
    if cfg.response_format not in ("json_schema", "json_object", "none"):
        raise ValueError(f"judge.response_format must be json_schema, json_object or none, got {cfg.response_format!r}")
    for comp in cfg.comparisons:
        if len(comp) != 2 or comp[0] == comp[1]:
            raise ValueError(f"judge.comparisons: each entry is two different variants, got {comp!r}")


def run_judge(generations: str, data: str, output: str, config: JudgeConfig, run_id: str | None = None,
              force: bool = False) -> dict:
    """Judge the generate stage's replies; writes judgments.jsonl, report.json, report.md and plots."""
    from cmv_core import config as config_mod
    from cmv_core import report as report_mod

    _validate(config)
    # Begin (skipped when _SUCCESS matches inputs and config)
    run = storage.begin_stage("judge", output, inputs=[generations, data], config=config_mod.to_dict(config),
                              run_id=run_id, force=force)
    if run is None:
        return storage.require_success(output)
    started = time.monotonic()

    # Load
    instruction = instruction_prefix(data)
    generations_uri = _first_file(generations, ("generations.jsonl", "generations.jsonl.gz"))
    if generations_uri is None:
        raise InputError(f"{generations} has no generations.jsonl")
    test_uri = _first_file(data, ("test.jsonl", "test.jsonl.gz"))
    items = _sample(load_items(generations_uri, test_uri, instruction), config.max_items, config.seed)
    pairs: list[dict] = []
    if config.calibration:
        pairs_uri = _first_file(data, ("pairs.jsonl", "pairs.jsonl.gz"))
        if pairs_uri:
            pairs = _sample(load_pairs(pairs_uri, instruction), config.max_calibration_pairs, config.seed)
        else:
            log.warning("%s has no pairs.jsonl: no calibration", data)
    log.info("loaded %d prompt(s) with variants %s, %d calibration pair(s)", len(items),
             sorted({v for i in items for v in i["replies"]}), len(pairs))

    # Judge (through the cache)
    cache = ResponseCache(config.cache or storage.join(output, "cache"), config.cache_flush_every)
    try:
        backend = make_backend(config)
        rows, plan = plan_and_judge(items, pairs, config, backend, cache)
    finally:
        cache.close()

    # Write judgments, report and plots
    storage.write_jsonl(storage.join(output, "judgments.jsonl"), rows)
    meta = {"run_id": run.run_id, "rubric_version": RUBRIC_VERSION, "backend": config.backend,
            "judge_model": config.model, "n_prompts": len(items), "calls_planned": plan["calls"],
            "skipped_pairwise": plan["skipped_pairwise"], "prices_usd_per_mtok": config.prices.get(config.model)}
    report = report_mod.build_report(rows, criteria=config.criteria, meta=meta,
                                     n_boot=config.bootstrap_samples, seed=config.seed)
    plots = report_mod.render_plots(report)
    for name, png in plots.items():
        storage.write_bytes(storage.join(output, name), png)
    report["plots"] = sorted(plots)
    storage.write_json(storage.join(output, "report.json"), report)
    storage.write_text(storage.join(output, "report.md"), report_mod.render_markdown(report, sorted(plots)))

    usage, failures = report["usage"], report["failures"]
    log.info("judge: %d judgment(s), %d call(s) (%d cached, %d new), %d failed call(s), %d+%d tokens, $%.4f "
             "this run, %.1f s", len(rows), usage["attempts"], usage["cached_calls"], usage["new_calls"],
             failures["failed_calls"], usage["prompt_tokens"], usage["completion_tokens"],
             usage["cost_usd_this_run"], time.monotonic() - started)
    total_calls = sum(len(r.get("orders", [r])) for r in rows)
    if total_calls and failures["failed_calls"] / total_calls > config.max_failed_fraction:
        raise JudgeFailed(f"{failures['failed_calls']} of {total_calls} judge calls failed "
                          f"(> judge.max_failed_fraction={config.max_failed_fraction}); see "
                          f"{storage.join(output, 'report.md')}. No _SUCCESS written; a rerun reuses the cache.")

    # Finish: _SUCCESS last
    summary = {"judgments": len(rows), "failed_calls": failures["failed_calls"],
               "excluded_judgments": failures["excluded_judgments"], "calls": usage["attempts"],
               "cached_calls": usage["cached_calls"], "new_calls": usage["new_calls"],
               "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
               "cost_usd": usage["cost_usd"], "cost_usd_this_run": usage["cost_usd_this_run"]}
    if report["calibration"]:
        summary["calibration_accuracy"] = report["calibration"]["accuracy"]["rate"]
    return storage.finish_stage(run, summary, declared=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generations", required=True, help="generate stage output (dir or URI)")
    parser.add_argument("--data", required=True, help="format stage output (test.jsonl, pairs.jsonl)")
    parser.add_argument("--output", required=True, help="where judgments and the report go (dir or URI)")


def cli_main(args: argparse.Namespace) -> int:
    from cmv_core import config as config_mod

    recipe = config_mod.load_recipe(args.config, args.set)
    cfg = config_mod.section(recipe, "judge", JudgeConfig)
    manifest = run_judge(args.generations, args.data, args.output, cfg, run_id=args.run_id, force=args.force)
    print(f"report: {storage.join(args.output, 'report.md')}")
    summary = manifest.get("summary", {})
    print(json.dumps({k: summary.get(k) for k in ("judgments", "failed_calls", "new_calls", "cached_calls",
                                                  "cost_usd_this_run", "calibration_accuracy")}))
    return 0

