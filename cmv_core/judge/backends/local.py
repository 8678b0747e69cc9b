"""The judge backend of an in-process causal LM: it writes the verdict JSON itself and reads each
value from next-token probabilities."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

from cmv_core.judge.config import JudgeConfig


def _messages_text(messages: list[dict]) -> str:
    return "\n".join(m.get("content") or "" for m in messages)


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


@dataclass
class _BatchRows:
    """The rows of calls answered together (``LocalBackend._complete_batch``): the model's state
    over them (KV cache, attention mask, real tokens so far, last logits) and each row's answer."""

    torch: Any
    model: Any
    kv: Any  # the KV cache of every row
    pad: int
    mask: Any  # (rows, tokens fed): 1 where the token is real
    count: Any  # real tokens per row so far (position ids count only these)
    texts: list[list[str]]
    tokens: list[list[dict]]
    n_out: list[int]
    logits: Any = None  # each row's logits after its last real token

    def feed(self, rows: list[list[int]], active: list[bool]) -> None:
        """One forward pass over the next ids of every active row (right-aligned, left-padded)."""
        torch = self.torch
        B = len(rows)
        k = max(len(r) for r in rows)
        ids = torch.full((B, k), self.pad, dtype=torch.long)
        new_mask = torch.zeros((B, k), dtype=torch.long)
        for i, r in enumerate(rows):
            if r and active[i]:
                ids[i, k - len(r) :] = torch.tensor(r)  # right-aligned: the last column is real
                new_mask[i, k - len(r) :] = 1
        pos = self.count[:, None] + torch.cumsum(new_mask, dim=1) - 1
        pos = torch.where(new_mask.bool(), pos, torch.zeros_like(pos))
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        # only the last position's logits: the vocabulary projection of every prompt token
        # would cost about as much as the rest of this small model
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=pos, cache=self.kv, use_cache=True, logits_to_keep=1
        )
        logits = out.logits[:, -1]
        if self.logits is None:
            self.logits = logits.clone()
        else:
            upd = torch.tensor(active) & new_mask.any(dim=1)
            self.logits[upd] = logits[upd]
        self.count = self.count + new_mask.sum(dim=1)

    def emit(self, i: int, text: str, n_ids: int, top=None) -> None:
        self.texts[i].append(text)
        self.tokens[i].append({"token": text, "top": top or []})
        self.n_out[i] += n_ids

    def completions(self, prompts: list[list[int]]) -> list[dict]:
        """Each row's answer, closed, as ``LocalBackend._complete`` returns it."""
        out = []
        for i in range(len(prompts)):
            self.tokens[i].append({"token": "}", "top": []})
            out.append(
                {
                    "text": "".join(self.texts[i]) + "}",
                    "finish_reason": "stop",
                    "tokens": self.tokens[i],
                    "prompt_tokens": len(prompts[i]),
                    "completion_tokens": self.n_out[i] + 1,
                }
            )
        return out


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

        form = batch[0][1]
        prompts = [self._prompt_ids(m) for m, _ in batch]
        prefixes = {self._system_prefix(m, ids) for (m, _), ids in zip(batch, prompts)}
        prefix = prefixes.pop() if len(prefixes) == 1 else ()
        if len(batch) == 1 or not prefix:
            # Without a shared unmasked prefix a left-padded row would start with no key to attend
            # to: one at a time instead.
            return [self._complete(m, f) for m, f in batch]
        with self._lock, self.torch.inference_mode():
            rows, rests = self._start_rows(prompts, prefix)
            pending = self._batch_rationales(rows, rests)
            self._batch_fields(rows, form, pending)
            return rows.completions(prompts)

    def _start_rows(self, prompts: list[list[int]], prefix: tuple[int, ...]) -> tuple[_BatchRows, list[list[int]]]:
        """The batch's rows after the prompt part they all share, and what each row has left of its prompt."""
        torch = self.torch
        # Beyond the system prompt, the rows may share more (the same post, different replies): that
        # part is encoded once, in a batch of one, and repeated. Each row keeps at least one token.
        shared = min(len(os.path.commonprefix(prompts)), min(len(ids) for ids in prompts) - 1)
        B = len(prompts)
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
        rows = _BatchRows(
            torch=torch,
            model=self.model,
            kv=kv,
            pad=pad,
            mask=torch.ones((B, shared), dtype=torch.long),
            count=torch.full((B,), shared, dtype=torch.long),
            texts=[[] for _ in range(B)],
            tokens=[[] for _ in range(B)],
            n_out=[0] * B,
        )
        return rows, [ids[shared:] for ids in prompts]

    def _batch_rationales(self, rows: _BatchRows, rests: list[list[int]]) -> list[list[int]]:
        """Each row's greedy rationale (up to local_rationale_tokens); returns what each row still
        has to feed before its next step."""
        # A decode step costs about the same for one token as for a few (reading the weights is
        # the work), so the tokens the backend writes itself go in with the next step that needs
        # logits: `pending` is what each row still has to feed before it.
        head0 = self._ids('{"rationale": "')
        pending = [list(r) + head0 for r in rests]
        B = len(pending)
        for i in range(B):
            rows.emit(i, '{"rationale": "', len(head0))
        active = [True] * B
        for _ in range(self.cfg.local_rationale_tokens):
            rows.feed(pending, [bool(p) for p in pending])
            for i in range(B):
                pending[i] = []
                if not active[i]:
                    continue
                next_id = int(rows.logits[i].argmax())
                piece = self.tokenizer.decode([next_id])
                if self._ends_rationale(next_id, piece):
                    active[i] = False
                    continue
                rows.emit(i, piece, 1)
                pending[i] = [next_id]
            if not any(active):
                break
        return pending

    def _batch_fields(self, rows: _BatchRows, form: dict, pending: list[list[int]]) -> None:
        """Each field of the form, in every row: the allowed value with the highest next-token probability."""
        B = len(pending)
        for f, (name, allowed) in enumerate(form.items()):
            quoted = isinstance(allowed[0], str)
            head = (f'", "{name}": ' if f == 0 else f', "{name}": ') + ('"' if quoted else "")
            head_ids = self._ids(head)
            rows.feed([p + head_ids for p in pending], [True] * B)
            first_ids = self._value_first_ids(allowed)
            logprobs = self.torch.log_softmax(rows.logits.float(), dim=-1)
            q = self._ids('"') if quoted else []
            for i in range(B):
                rows.emit(i, head, len(head_ids))
                scores = [float(logprobs[i, t]) for t in first_ids]
                best = allowed[max(range(len(allowed)), key=lambda k: scores[k])]
                value = self._ids(str(best))
                rows.emit(i, str(best), len(value), top=[[str(a), sc] for a, sc in zip(allowed, scores)])
                if quoted:
                    rows.emit(i, '"', len(q))
                pending[i] = value + q

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _ends_rationale(self, next_id: int, piece: str) -> bool:
        """A greedy rationale ends at the end of text, or at a character the JSON string would have to escape."""
        return (
            next_id == self.tokenizer.eos_token_id
            or any(ch in piece for ch in '"\\')
            or any(ord(ch) < 32 for ch in piece)
        )

    def _value_first_ids(self, allowed: list) -> list[int]:
        """The first token of each allowed value: the model chooses among these."""
        first_ids = [self._ids(str(a))[0] for a in allowed]
        if len(set(first_ids)) != len(first_ids):
            raise RuntimeError(f"{self.cfg.model}: values {allowed} share a first token")
        return first_ids

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
        """One call: the verdict JSON written piece by piece, each value chosen from the logits."""
        torch = self.torch
        with self._lock, torch.inference_mode():
            prompt_ids = self._prompt_ids(messages)
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
                if self._ends_rationale(next_id, piece):
                    break
                feed([next_id], piece)
            for i, (name, allowed) in enumerate(form.items()):
                quoted = isinstance(allowed[0], str)
                head = f'", "{name}": ' if i == 0 else f', "{name}": '
                head += '"' if quoted else ""
                feed(self._ids(head), head)
                first_ids = self._value_first_ids(allowed)
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
