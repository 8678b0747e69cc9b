"""The artifact store: same behaviour on local paths, file:// and s3:// (moto server on loopback)."""

from __future__ import annotations

import gzip
import http.client
import http.server
import json
import os
import threading

import pytest

from cmv_core import storage


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return "file://" + str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_roundtrip_and_listing(root):
    storage.write_text(storage.join(root, "a.txt"), "hello\n")
    storage.write_jsonl(storage.join(root, "sub", "b.jsonl.gz"), [{"x": 1}, {"x": 2}])
    storage.write_bytes(storage.join(root, "c.bz2"), b"")
    assert storage.read_text(storage.join(root, "a.txt")) == "hello\n"
    assert list(storage.read_jsonl(storage.join(root, "sub", "b.jsonl.gz"))) == [{"x": 1}, {"x": 2}]
    assert storage.list_files(root) == ["a.txt", "c.bz2", "sub/b.jsonl.gz"]
    assert storage.exists(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "nope.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope.txt"))


def test_gzip_is_byte_identical_across_backends(tmp_path, s3_bucket):
    rows = [{"i": i, "text": "∆ delta " * 3} for i in range(100)]
    local = str(tmp_path / "x.jsonl.gz")
    remote = s3_bucket + "/x.jsonl.gz"
    storage.write_jsonl(local, rows)
    storage.write_jsonl(remote, rows)
    assert storage.read_bytes.__name__  # sanity: API exists
    with storage.open_read_raw(local) as f:
        local_bytes = f.read()
    with storage.open_read_raw(remote) as f:
        remote_bytes = f.read()
    assert local_bytes == remote_bytes
    assert gzip.decompress(local_bytes).count(b"\n") == 100
    assert storage.sha256(local) == storage.sha256(remote)


def test_failed_write_leaves_nothing_and_keeps_old_file(root):
    target = storage.join(root, "keep.json")
    storage.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with storage.open_write(target, "wt") as f:
            f.write('{"v": 2, "trunc')
            raise RuntimeError("killed midway")
    assert storage.read_json(target) == {"v": 1}
    assert storage.list_files(root) == ["keep.json"]


def test_manifest_written_last_and_rerun_skipped(root):
    upstream = storage.join(root, "run1", "clean")
    with pytest.raises(storage.MissingInputError, match="_SUCCESS"):
        storage.require_success(upstream)
    run = storage.begin_stage("clean", upstream, inputs=[], config={"a": 1})
    storage.write_text(storage.join(upstream, "out.txt"), "data")
    manifest = storage.finish_stage(run, {"threads": 3}, required=["out.txt"])
    assert manifest["run_id"] == "run1"
    assert manifest["files"] == [
        {
            "path": "out.txt",
            "size": 4,
            "sha256": storage.sha256(storage.join(upstream, "out.txt")),
            "attempt": run.attempt,
        }
    ]
    assert manifest["attempt"] == run.attempt
    assert storage.require_success(upstream)["summary"] == {"threads": 3}

    out = storage.join(root, "run1", "format")
    run = storage.begin_stage("format", out, inputs=[upstream], config={"seed": 1})
    assert run is not None
    storage.finish_stage(run, {}, required=[])
    # Same inputs and config: skipped. Forced, or config changed: runs, stale manifest removed first.
    assert storage.begin_stage("format", out, inputs=[upstream], config={"seed": 1}) is None
    assert storage.begin_stage("format", out, inputs=[upstream], config={"seed": 1}, force=True) is not None
    assert not storage.exists(storage.join(out, storage.SUCCESS))
    storage.finish_stage(storage.begin_stage("format", out, inputs=[upstream], config={"seed": 1}), {}, required=[])
    assert storage.begin_stage("format", out, inputs=[upstream], config={"seed": 2}) is not None
    assert not storage.exists(storage.join(out, storage.SUCCESS))


def test_downstream_refuses_input_without_success(root):
    with pytest.raises(storage.MissingInputError, match="no _SUCCESS"):
        storage.begin_stage(
            "format", storage.join(root, "r", "format"), inputs=[storage.join(root, "r", "clean")], config={}
        )


def test_upstream_change_invalidates_downstream(root):
    up = storage.join(root, "r", "clean")
    storage.finish_stage(storage.begin_stage("clean", up, inputs=[], config={}), {"n": 1}, required=[])
    down = storage.join(root, "r", "format")
    storage.finish_stage(storage.begin_stage("format", down, inputs=[up], config={}), {}, required=[])
    assert storage.begin_stage("format", down, inputs=[up], config={}) is None
    storage.finish_stage(storage.begin_stage("clean", up, inputs=[], config={}, force=True), {"n": 2}, required=[])
    assert storage.begin_stage("format", down, inputs=[up], config={}) is not None


def test_wait_for_success_is_bounded(root):
    with pytest.raises(storage.MissingInputError, match="gave up after"):
        storage.wait_for_success(storage.join(root, "never"), timeout_s=0.3, poll_s=0.1)


def test_upload_download_dir(tmp_path, s3_bucket):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "deep" / "w.bin").write_bytes(b"\x00" * 1000)
    (src / "cfg.json").write_text(json.dumps({"a": 1}))
    storage.upload_dir(src, s3_bucket + "/m")
    assert storage.list_files(s3_bucket + "/m") == ["cfg.json", "deep/w.bin"]
    dest = storage.download_dir(s3_bucket + "/m", tmp_path / "dst")
    assert (tmp_path / "dst" / "deep" / "w.bin").read_bytes() == b"\x00" * 1000
    assert dest == str(tmp_path / "dst")


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers 503 SlowDown to the first ``failures`` requests, then forwards to the real S3 server."""

    failures = 0
    seen = 0
    upstream = ""

    def _handle(self):
        cls = type(self)
        cls.seen += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if cls.seen <= cls.failures:
            payload = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        host, port = cls.upstream.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port))
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


def test_transient_s3_errors_are_retried(s3_bucket, monkeypatch):
    _FlakyProxy.upstream = os.environ["AWS_ENDPOINT_URL"]
    storage.write_text(s3_bucket + "/x.txt", "payload")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("CMV_S3_MAX_ATTEMPTS", "5")
        _FlakyProxy.failures, _FlakyProxy.seen = 2, 0
        assert storage.read_text(s3_bucket + "/x.txt") == "payload"
        assert _FlakyProxy.seen == 3  # two 503s, retried by botocore, then success
        monkeypatch.setenv("CMV_S3_MAX_ATTEMPTS", "2")
        _FlakyProxy.failures, _FlakyProxy.seen = 5, 0
        with pytest.raises(Exception, match="SlowDown|503"):
            storage.read_text(s3_bucket + "/x.txt")
        assert _FlakyProxy.seen == 2
    finally:
        server.shutdown()


def test_upload_dir_writes_success_last(tmp_path, s3_bucket, monkeypatch):
    src = tmp_path / "stage"
    src.mkdir()
    for name in ("_SUCCESS", "a.jsonl", "z.jsonl"):
        (src / name).write_text(name)
    order = []
    client = storage.s3_client()
    real = client.upload_file
    monkeypatch.setattr(
        client, "upload_file", lambda f, b, k, **kw: (order.append(k.rsplit("/", 1)[1]), real(f, b, k, **kw))
    )
    storage.upload_dir(src, s3_bucket + "/copy")
    assert order == ["a.jsonl", "z.jsonl", "_SUCCESS"]
