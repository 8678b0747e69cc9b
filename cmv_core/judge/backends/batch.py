"""The judge backend of OpenAI's Batch API: the synchronous requests, sent as batches."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

from cmv_core import storage
from cmv_core.judge.backends.openai import OpenAIBackend, completion_record, request_body
from cmv_core.judge.cache import ResponseCache, cache_key, key_backend
from cmv_core.judge.calls import next_uncached
from cmv_core.judge.config import JudgeBatchPending, JudgeCallError, JudgeConfig, JudgeConfigError

log = logging.getLogger(__name__)


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
                if self.cfg.batch_runner == "files":
                    await self._files_round(todo, cache)
                    continue
                lines = [batch_line(key, body) for key, body in todo.items()]
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
        answered: set[str] = set()
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                answered |= await self._load(file_id, cache)
        if batch.status in ("failed", "cancelled"):
            # Every request the batch did not answer is a failed call, counted against
            # max_failed_fraction as the online path counts a call its retries did not cure (and,
            # not cached, asked again by a rerun). Not an exception for the whole stage: that left
            # the state behind, so every rerun polled the same failed batch again and never recovered.
            why = self._redact(
                f"batch {batch.id} {batch.status}: {json.dumps(_plain(getattr(batch, 'errors', None)))[:300]}"
            )
            for key in await self._input_keys(state["input_file_id"]):
                if key not in answered:
                    self.errors[key] = why
        # An expired batch's unanswered requests are neither answered nor errors: the next round
        # asks them again in a new batch (after the last round they are failed calls).
        storage.delete(self._state_uri(cache))
        log.info(
            "batch %s %s: answers loaded into the cache (%d failed request(s) so far)",
            batch.id,
            batch.status,
            len(self.errors),
        )

    async def _files_round(self, todo: dict[str, dict], cache: ResponseCache) -> None:
        """judge.batch_runner=files: the round's output file, when a runner has written it beside the
        input file, is loaded; else the input file is written and the stage stops, saying what to run.
        Files are named by the round's requests, so a rerun finds the output of exactly this round."""
        name = hashlib.sha256("\n".join(sorted(todo)).encode()).hexdigest()[:16]
        inp, out = (storage.join(cache.uri, "batch", f"{name}.{kind}.jsonl") for kind in ("input", "output"))
        if storage.exists(out):
            settled = self._load_lines(storage.read_bytes(out).decode("utf-8"), cache)
            for key in set(todo) - settled:
                self.errors[key] = f"no line for this request in {out}"
            self.stats["rounds"] += 1
            log.info("batch output %s: %d answer(s) loaded into the cache", out, len(settled))
            return
        storage.write_text(inp, "".join(batch_line(key, body) + "\n" for key, body in todo.items()))
        self.stats["requests"] += len(todo)
        raise JudgeBatchPending(
            f"{len(todo)} request(s) written to {inp}; run them with a batch runner, e.g. vLLM's "
            f"`python -m vllm.entrypoints.openai.run_batch -i {inp} -o {out} --model <model dir> "
            f"--served-model-name {self.cfg.model}`, then run cmv judge again (it reads {out})"
        )

    async def _load(self, file_id: str, cache: ResponseCache) -> set[str]:
        """Load one output or error file (see _load_lines)."""
        content = await self.client.files.content(file_id)
        return self._load_lines(content.content.decode("utf-8"), cache)

    def _load_lines(self, text: str, cache: ResponseCache) -> set[str]:
        """Answers into the cache, failed lines into the errors; the keys it settled (a
        ``batch_expired`` line settles nothing: it is asked again)."""
        settled = set()
        for line in text.splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            key, response, error = entry.get("custom_id"), entry.get("response") or {}, entry.get("error")
            if response.get("status_code") == 200 and not error:
                record = completion_record(response["body"], self.cfg, redact=self._redact)
                cache.put_loaded(key, record, persist=self.cfg.batch_runner != "files")
            elif (error or {}).get("code") == "batch_expired":
                continue
            else:
                err = error or (response.get("body") or {}).get("error") or response
                status = response.get("status_code")
                self.errors[key] = self._redact(f"batch request failed ({status}): {json.dumps(err)[:300]}")
            settled.add(key)
        return settled

    async def _input_keys(self, input_file_id: str) -> list[str]:
        """The custom_ids of a batch's input file (a resumed run has only the state, not the plan)."""
        content = await self.client.files.content(input_file_id)
        return [json.loads(x)["custom_id"] for x in content.content.decode("utf-8").splitlines() if x.strip()]


def batch_line(key: str, body: dict) -> str:
    """One line of a batch input file: the cache key as custom_id, the synchronous request as body."""
    return json.dumps(
        {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}, ensure_ascii=False
    )


def _plain(obj):
    """The batch's ``errors`` (a pydantic object or None) as JSON-able data for the message."""
    return obj.model_dump() if hasattr(obj, "model_dump") else obj
