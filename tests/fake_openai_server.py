"""A scriptable OpenAI-compatible chat server on loopback, for judge tests and the judge benchmark.

A real HTTP server (``http.server.ThreadingHTTPServer``, HTTP/1.1 keep-alive) that speaks
``POST /v1/chat/completions``. A test decides each answer with a ``handler(body, n)``
function (``n`` counts requests from 1) returning a :class:`Reply`: a normal completion
(optionally with log-probabilities), an HTTP error (429, 500...), a delay, or a body that is not
JSON. Every request body is recorded in ``server.requests``, so tests can assert what the
client really sent (retries, position swaps, response_format, logprobs).

The Batch API too: ``POST /v1/files`` (multipart upload), ``POST /v1/batches``,
``GET /v1/batches/{id}`` and ``GET /v1/files/{id}/content``. A batch runs every line of its
input file through the same handler as the synchronous endpoint once it has been polled
``batch_polls`` times (``hold_batches = True`` keeps it running until released); every created
batch is in ``server.batches``. As the real API does, answers with status 200 go to the batch's
output file and every other line (the handler's non-200 reply) to its error file
(``failed_lines_to = "output"`` puts them in the output file instead). ``batch_script`` scripts
how the n-th created batch ends (a list, consumed in order; past its end a batch completes):
``{"status": "failed", "errors": {...}}`` (no file, as when the input is refused),
``{"status": "expired", "answered": k}`` (the first k lines answered, every other line in the
error file with code ``batch_expired``) or ``{"status": "cancelled", "answered": k}``.

A server of limited throughput, as a real one (``tokens_per_s``): every answer's completion tokens
are generated at that rate shared among the answers in progress (processor sharing, as a batching
engine), and an answer whose client hung up is dropped (vLLM aborts it), so a client that times out
and sends again pays for both. ``max_active``: more answers in progress than that are refused with
``overload_status`` (429 or 503) and a Retry-After. ``reject_params``: a request that carries one of
these parameters gets a 400 naming it, as an older server answers ``max_completion_tokens``.
``version`` (and ``models_owner``): ``GET /version`` and ``GET /v1/models`` answer as vLLM's do.

Run as a script for the benchmark: ``python tests/fake_openai_server.py --latency-ms 100``
prints ``PORT <n>`` and answers every request with a valid verdict after the latency.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    status: int = 200
    body: dict | None = None  # JSON body
    raw: bytes | None = None  # or raw bytes (e.g. a body that is not JSON)
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0


def split_tokens(text: str) -> list[str]:
    """A toy tokenizer: digits alone, words, spaces and punctuation runs, so score digits are
    single tokens as in real BPE vocabularies."""
    return re.findall(r"\d|[A-Za-z_]+|\s+|[^\w\s]+", text)


def completion(
    content: str,
    *,
    model: str = "fake-judge",
    prompt_tokens: int = 100,
    completion_tokens: int | None = None,
    logprobs: list[dict] | None = None,
    finish_reason: str = "stop",
) -> dict:
    """A chat.completion body."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": finish_reason,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
    ctoks = completion_tokens if completion_tokens is not None else len(split_tokens(content))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ctoks, "total_tokens": prompt_tokens + ctoks},
    }


def token_logprobs(content: str, distributions: dict[str, dict[str, float]]) -> list[dict]:
    """Log-probabilities for ``content``: the token holding field F's value gets the alternatives
    ``distributions[F]`` (value -> probability); every other token is certain."""
    tokens = split_tokens(content)
    out, pos = [], 0
    value_at = {}
    for name, dist in distributions.items():
        m = list(re.finditer(rf'"{re.escape(name)}"\s*:\s*"?', content))[-1]
        value_at[m.end()] = dist
    for tok in tokens:
        dist = value_at.get(pos)
        if dist:
            top = [
                {"token": k, "logprob": math.log(p), "bytes": list(k.encode())}
                for k, p in sorted(dist.items(), key=lambda kv: -kv[1])
            ]
            out.append(
                {
                    "token": tok,
                    "logprob": math.log(dist.get(tok, 1e-9)),
                    "bytes": list(tok.encode()),
                    "top_logprobs": top,
                }
            )
        else:
            out.append(
                {
                    "token": tok,
                    "logprob": 0.0,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [{"token": tok, "logprob": 0.0, "bytes": list(tok.encode())}],
                }
            )
        pos += len(tok)
    return out


def verdict_fields(body: dict) -> dict:
    """Field name -> allowed values, from the request's json_schema (or guessed from the prompt)."""
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    if schema:
        return {k: v["enum"] for k, v in schema["properties"].items() if "enum" in v}
    system = body["messages"][0]["content"]
    if '"winner"' in system:
        return {"winner": ["A", "B"]}
    return {k: list(range(1, 8)) for k in ("persuasiveness", "relevance", "civility", "fluency") if f'"{k}"' in system}


def verdict_json(fields: dict, rationale: str = "Fine.") -> str:
    return json.dumps({"rationale": rationale, **fields})


def default_answer(body: dict) -> dict:
    """A valid verdict for whatever the request asks: score 5 everywhere, or winner "A"."""
    fields = {k: (5 if isinstance(v[0], int) else "A") for k, v in verdict_fields(body).items()}
    return completion(verdict_json(fields), model=body.get("model", "fake-judge"))


def user_text(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")


class FakeOpenAI:
    """``with FakeOpenAI(handler) as srv: ... srv.base_url ... srv.requests``."""

    def __init__(
        self, handler: Callable[[dict, int], Reply] | None = None, latency_s: float = 0.0, record: bool = True
    ):
        self.handler = handler or (lambda body, n: Reply(body=default_answer(body)))
        self.latency_s = latency_s
        self.record = record
        self.requests: list[dict] = []
        self.count = 0
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.batch_polls = 1
        self.hold_batches = False
        self.batch_script: list[dict] = []
        self.failed_lines_to = "error_file"
        self.tokens_per_s: float | None = None
        self.max_active: int | None = None
        self.overload_status = 503
        self.reject_params: set[str] = set()
        self.version: str | None = None
        self.models_owner = "vllm"
        self.active = 0  # answers in progress (tokens_per_s)
        self.peak_active = 0
        self.aborted = 0  # answers dropped because their client hung up
        self.refused = 0  # overload and parameter refusals
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.count = 0

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers
            # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
            # client's delayed ACK add ~40 ms to every response (real servers set it too).
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def _send(self, reply: Reply, content_type: str = "application/json") -> None:
                data = reply.raw if reply.raw is not None else json.dumps(reply.body or {}).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_GET(self):
                path = self.path.split("?")[0].rstrip("/")
                if path.endswith("/version") and fake.version:
                    return self._send(Reply(body={"version": fake.version}))
                if path.endswith("/models") and fake.version:
                    model = {"id": "fake-judge", "object": "model", "owned_by": fake.models_owner}
                    return self._send(Reply(body={"object": "list", "data": [model]}))
                m = re.search(r"/files/([^/]+)/content$", path)
                if m and m.group(1) in fake.files:
                    return self._send(Reply(raw=fake.files[m.group(1)]), "application/octet-stream")
                m = re.search(r"/batches/([^/]+)$", path)
                if m and m.group(1) in fake.batches:
                    return self._send(Reply(body=fake._poll_batch(m.group(1))))
                self._send(Reply(status=404, body={"error": {"message": f"no route {self.path}"}}))

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw_body = self.rfile.read(length)
                path = self.path.split("?")[0].rstrip("/")
                if path.endswith("/files"):
                    return self._send(Reply(body=fake._upload(self.headers.get("Content-Type", ""), raw_body)))
                if path.endswith("/batches"):
                    return self._send(Reply(body=fake._create_batch(json.loads(raw_body))))
                body = json.loads(raw_body or b"{}")
                with fake._lock:
                    fake.count += 1
                    n = fake.count
                    if fake.record:
                        fake.requests.append(body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                else:
                    try:
                        reply = fake.handler(body, n)
                    except Exception as exc:  # a broken test handler shows up as a 500 with the reason
                        reply = Reply(
                            status=500,
                            body={"error": {"message": f"handler failed: {exc!r}"}},
                            headers={"x-should-retry": "false"},
                        )
                refusal = fake._refusal(body)
                if refusal is not None:
                    return self._send(refusal)
                delay = fake.latency_s + reply.delay_s
                if delay:
                    time.sleep(delay)
                if fake.tokens_per_s and reply.status == 200 and reply.body and not fake._generate(self, reply.body):
                    return  # the client hung up: nothing to answer
                self._send(reply)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                # A client that hangs up (a timeout, a stage that stopped) is normal here: no traceback.
                if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                    super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    # ------------------------------------------------------------ a server of limited throughput

    def _refusal(self, body: dict) -> Reply | None:
        bad = sorted(p for p in self.reject_params if p in body)
        if bad:
            with self._lock:
                self.refused += 1
            message = f"Unrecognized request argument supplied: {bad[0]}"
            return Reply(
                status=400, body={"error": {"message": message, "type": "invalid_request_error", "param": bad[0]}}
            )
        if self.max_active is not None and self.active >= self.max_active:
            with self._lock:
                self.refused += 1
            return Reply(
                status=self.overload_status,
                body={"error": {"message": "the server is overloaded", "type": "overloaded"}},
                headers={"retry-after-ms": "50"},
            )
        return None

    def _generate(self, handler, body: dict) -> bool:
        """Hold the answer while its completion tokens are generated at ``tokens_per_s`` shared by every
        answer in progress; False (dropped) when its client hung up first."""
        tick = 0.02
        left = float((body.get("usage") or {}).get("completion_tokens") or 1)
        with self._lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        try:
            while left > 0:
                time.sleep(tick)
                left -= self.tokens_per_s * tick / max(1, self.active)
                if _hung_up(handler.connection):
                    with self._lock:
                        self.aborted += 1
                    return False
            return True
        finally:
            with self._lock:
                self.active -= 1

    # ------------------------------------------------------------ Batch API

    def _upload(self, content_type: str, raw: bytes) -> dict:
        from email.parser import BytesParser
        from email.policy import HTTP

        msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        data, purpose, name = b"", None, "upload.jsonl"
        for part in msg.iter_parts():
            field_name = part.get_param("name", header="content-disposition")
            if field_name == "file":
                data = part.get_payload(decode=True)
                name = part.get_filename() or name
            elif field_name == "purpose":
                purpose = part.get_payload(decode=True).decode()
        with self._lock:
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = data
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }

    def _create_batch(self, body: dict) -> dict:
        with self._lock:
            batch_id = f"batch_{len(self.batches) + 1}"
            lines = [json.loads(x) for x in self.files[body["input_file_id"]].decode().splitlines() if x.strip()]
            self.batches[batch_id] = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "completion_window": body["completion_window"],
                "input_file_id": body["input_file_id"],
                "status": "in_progress",
                "created_at": int(time.time()),
                "output_file_id": None,
                "error_file_id": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": body.get("metadata"),
                "_lines": lines,
                "_polls": 0,
            }
            return self._public(batch_id)

    def _public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def _poll_batch(self, batch_id: str) -> dict:
        with self._lock:
            batch = self.batches[batch_id]
            batch["_polls"] += 1
            ready = batch["status"] == "in_progress" and batch["_polls"] >= self.batch_polls and not self.hold_batches
            script = self.batch_script[int(batch_id.split("_")[1]) - 1 : int(batch_id.split("_")[1])]
        if ready:
            self._end_batch(batch, script[0] if script else {"status": "completed"})
        with self._lock:
            return self._public(batch_id)

    def _run_line(self, n: int, line: dict) -> dict:
        """One input line through the handler: its output-file entry."""
        with self._lock:
            self.count += 1
            count = self.count
            if self.record:
                self.requests.append(line["body"])
        reply = self.handler(line["body"], count)
        status = reply.status if reply.raw is None else 500
        return {
            "id": f"batch_req_{n}",
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{n}", "body": reply.body or {}},
            "error": None,
        }

    def _end_batch(self, batch: dict, outcome: dict) -> None:
        """Run the batch's lines (all, or the first ``answered`` of them) and end it as scripted."""
        status = outcome.get("status", "completed")
        if status == "failed":
            with self._lock:
                batch.update(status="failed", errors=outcome.get("errors") or {"object": "list", "data": []})
            return
        lines = batch["_lines"][: outcome.get("answered", len(batch["_lines"]))]
        out = [self._run_line(n, line) for n, line in enumerate(lines, 1)]
        ok = [o for o in out if o["response"]["status_code"] == 200]
        bad = [o for o in out if o["response"]["status_code"] != 200]
        for n, line in enumerate(batch["_lines"][len(lines) :], len(lines) + 1):
            code = "batch_expired" if status == "expired" else "batch_cancelled"
            bad.append(
                {
                    "id": f"batch_req_{n}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {
                        "code": code,
                        "message": f"This request could not be executed before the batch {status}.",
                    },
                }
            )
        if self.failed_lines_to == "output":
            ok, bad = out, bad[len(out) - len(ok) :]
        with self._lock:
            files = {}
            for name, entries in (("output_file_id", ok), ("error_file_id", bad)):
                if entries:
                    file_id = f"file-{len(self.files) + 1}"
                    self.files[file_id] = ("\n".join(json.dumps(o) for o in entries) + "\n").encode()
                    files[name] = file_id
            failed = len(batch["_lines"]) - sum(1 for o in out if o["response"]["status_code"] == 200)
            batch.update(
                status=status,
                **files,
                request_counts={
                    "total": len(batch["_lines"]),
                    "completed": len(batch["_lines"]) - failed,
                    "failed": failed,
                },
            )

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client closed its connection (it sends nothing while it waits for an answer)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# Reusable replies for tests.
def rate_limited(retry_after_ms: int = 10) -> Reply:
    return Reply(
        status=429,
        body={"error": {"message": "Rate limit reached", "type": "requests"}},
        headers={"retry-after-ms": str(retry_after_ms)},
    )


def server_error(retry_after_ms: int = 10) -> Reply:
    return Reply(
        status=500,
        body={"error": {"message": "The server had an error"}},
        headers={"retry-after-ms": str(retry_after_ms)},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    server = FakeOpenAI(latency_s=args.latency_ms / 1000.0, record=False).start()
    print(f"PORT {server._httpd.server_address[1]}", flush=True)
    try:
        sys.stdin.read()  # serve until the parent closes our stdin
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
