"""A fault-injecting HTTP proxy between boto3 and the loopback S3 server, for tests.

It relays each HTTP/1.1 request to the upstream server on a fresh connection and its response back
(keep-alive towards the client), and on command:

- ``outage(seconds)``: closes every open connection and resets new ones for that long (a store that
  went away, a node drained, a load balancer restarted); the upstream keeps its state;
- ``slowdown(fraction)``: answers that fraction of requests with S3's ``503 SlowDown`` (its XML error
  body), without forwarding them;
- ``latency(seconds)``: delays every request by that much;
- ``cut_next_body(method, path_part)``: the next matching response is cut midway (half its body,
  then the connection closes);
- ``stall_next_body(seconds, method, path_part)``: the next matching response pauses midway;
- ``outage_at(seconds, method, path_part)``: an outage that starts when the next matching request
  arrives (say the first part of a multipart upload, ``partNumber=1``), that request reset with it;
- ``set_upstream(host, port)``: relay to another server from now on (a store restarted elsewhere);
- ``end_outage()``: the store is back now (ends an outage given as open-ended).

Every request is counted (``requests``, ``faults``), so a test can assert what happened, not how long.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class _Cut:
    method: str
    path_part: str
    stall_s: float = 0.0  # 0: cut the body; > 0: pause that long midway, then go on


@dataclass
class Counters:
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of each request received
    faults: dict[str, int] = field(default_factory=dict)  # fault kind -> times injected

    def add(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str]) -> bytes:
    """The raw bytes of a message body, chunked framing included (relayed as is)."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = await reader.readuntil(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return bytes(out)
            out += await reader.readexactly(size + 2)
    return await reader.readexactly(int(fields.get("content-length", "0")))


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._down_until = 0.0
        self._slowdown = 0.0
        self._latency = 0.0
        self._cuts: list[_Cut] = []
        self._outage_at: list[tuple[str, str, float]] = []
        self.outage_started: float | None = None  # time.monotonic() of the last outage's start
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    # ---------------------------------------------------------------- control (any thread)

    def start(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage(self, seconds: float) -> None:
        self.outage_started = time.monotonic()
        self._down_until = self.outage_started + seconds
        self.counters.add("outage")
        self._loop.call_soon_threadsafe(self._drop_all)

    def end_outage(self) -> None:
        """The store is back now: a test ends an open-ended outage once it has seen the stage fail."""
        self._down_until = 0.0

    def is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def slowdown(self, fraction: float) -> None:
        self._slowdown = fraction

    def latency(self, seconds: float) -> None:
        self._latency = seconds

    def cut_next_body(self, method: str = "GET", path_part: str = "") -> None:
        self._cuts.append(_Cut(method, path_part))

    def stall_next_body(self, seconds: float, method: str = "GET", path_part: str = "") -> None:
        self._cuts.append(_Cut(method, path_part, stall_s=seconds))

    def outage_at(self, seconds: float, method: str = "PUT", path_part: str = "partNumber=1") -> None:
        self._outage_at.append((method, path_part, seconds))

    def set_upstream(self, host: str, port: int) -> None:
        self.upstream = (host, port)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ---------------------------------------------------------------- the proxy (its own loop)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        # stopped: end the connections still open, so no task outlives the loop
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        server.close()
        self._loop.close()

    def _drop_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()  # RST to the client, mid-request or mid-body
        self._writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_down():
            self.counters.add("refused")
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            while await self._one_exchange(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _one_exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Relay one request and its response; False when the client connection is done."""
        try:
            head = await _read_head(reader)
        except asyncio.IncompleteReadError:
            return False
        request_line, fields = _headers(head)
        method, path = request_line.split(" ")[:2]
        if fields.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await _read_body(reader, fields)
        self.counters.requests.append((method, path))
        trigger = next((t for t in self._outage_at if t[0] == method and t[1] in path), None)
        if trigger is not None:
            self._outage_at.remove(trigger)
            self.outage(trigger[2])
        if self._latency:
            await asyncio.sleep(self._latency)
        if self.is_down():
            self.counters.add("reset")
            return False
        if self._slowdown and self._rng.random() < self._slowdown:
            self.counters.add("slowdown")
            writer.write(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n\r\n".encode()
                + SLOWDOWN_BODY
            )
            await writer.drain()
            return True
        return await self._forward(method, path, head, body, writer)

    async def _forward(self, method: str, path: str, head: bytes, body: bytes, writer: asyncio.StreamWriter) -> bool:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            # One request per upstream connection: the response then ends at its length or at EOF.
            request_line, _ = head.split(b"\r\n", 1)
            kept = [
                line
                for line in head.split(b"\r\n")[1:]
                if line and not line.lower().startswith((b"connection:", b"expect:"))
            ]
            up_writer.write(b"\r\n".join([request_line, *kept, b"Connection: close", b"", b""]) + body)
            await up_writer.drain()
            response_head = await _read_head(up_reader)
            status_line, fields = _headers(response_head)
            length = fields.get("content-length")
            if method == "HEAD" or status_line.split(" ")[1] in ("204", "304"):
                response_body = b""
            elif length is not None:
                response_body = await up_reader.readexactly(int(length))
            else:
                response_body = await up_reader.read()
        finally:
            up_writer.close()
        cut = next((c for c in self._cuts if c.method == method and c.path_part in path), None)
        if cut is not None and len(response_body) > 1:
            self._cuts.remove(cut)
            half = len(response_body) // 2
            writer.write(response_head + response_body[:half])
            await writer.drain()
            if not cut.stall_s:
                self.counters.add("cut")
                return False
            self.counters.add("stall")
            await asyncio.sleep(cut.stall_s)
            writer.write(response_body[half:])
        else:
            writer.write(response_head + response_body)
        await writer.drain()
        return length is not None
