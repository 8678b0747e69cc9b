"""Artifact store: one API for plain paths, ``file://`` URIs and ``s3://`` URIs.

Every stage reads its inputs and writes its outputs through this module, so the
same stage code runs on a laptop (local paths) and in a cluster (S3 or any
S3-compatible store reached through ``AWS_ENDPOINT_URL``).

Writes are atomic: a file becomes visible only when its ``with`` block exits
cleanly (local: temp file + ``os.replace``; S3: the object is uploaded on
close). ``.gz`` files are written with ``mtime=0`` so that equal content gives
byte-identical files wherever they are stored.

Manifests: a stage writes its files, then last a ``_SUCCESS`` JSON manifest
(DESIGN.md "Artifacts and the hand-off contract").
"""

from __future__ import annotations

import bz2
import contextlib
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator
from urllib.parse import urlparse

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
_CHUNK = 8 * 1024 * 1024


class MissingInputError(RuntimeError):
    """An input stage directory has no ``_SUCCESS`` manifest."""


# ---------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URI."""
    uri = str(uri)
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if is_s3(uri):
        raise ValueError(f"{uri} is an S3 URI, not a local path")
    return Path(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        uri = uri.rstrip("/") + "/" + part
    return uri


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _s3_client():
    import boto3
    from botocore.config import Config

    # botocore's own retry machinery (standard mode: exponential backoff with
    # jitter on throttling, 5xx and connection errors) instead of a hand loop.
    cfg = Config(retries={"total_max_attempts": int(os.environ.get("CMV_S3_MAX_ATTEMPTS", "8")), "mode": "standard"})
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=cfg)


_client_cache: dict[tuple, Any] = {}


def s3_client():
    # One client per endpoint and process; clients are thread-safe.
    key = (
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("CMV_S3_MAX_ATTEMPTS"),
        os.getpid(),
    )
    if key not in _client_cache:
        _client_cache[key] = _s3_client()
    return _client_cache[key]


# ---------------------------------------------------------------- reading


class _S3Reader(io.RawIOBase):
    """Streaming, read-only raw file over an S3 GetObject body."""

    def __init__(self, body):
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self._body.read(len(buf))
        n = len(data)
        buf[:n] = data
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def _raw_reader(uri: str) -> IO[bytes]:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # botocore raises NoSuchKey as a ClientError subclass
            if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc) or "404" in str(exc):
                raise FileNotFoundError(uri) from exc
            raise
        return io.BufferedReader(_S3Reader(body), buffer_size=_CHUNK)
    return open(local_path(uri), "rb", buffering=_CHUNK)


@contextlib.contextmanager
def open_read(uri: str, mode: str = "rb") -> Iterator[IO]:
    """Stream a file; ``.gz`` and ``.bz2`` are decompressed by extension."""
    if mode not in ("rb", "rt", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'rt', got {mode!r}")
    raw = _raw_reader(str(uri))
    try:
        name = str(uri)
        if name.endswith(".gz"):
            stream: IO = gzip.GzipFile(fileobj=raw, mode="rb")
        elif name.endswith(".bz2"):
            stream = bz2.BZ2File(raw, mode="rb")
        else:
            stream = raw
        if mode in ("rt", "r"):
            stream = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        yield stream
    finally:
        raw.close()


def read_bytes(uri: str) -> bytes:
    with open_read(uri, "rb") as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def read_jsonl(uri: str) -> Iterator[dict]:
    with open_read(uri, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri}:{lineno}: not valid JSON ({exc.msg})") from exc


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def open_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Atomic write; the file appears only if the block exits without error."""
    if mode not in ("wb", "wt", "w"):
        raise ValueError(f"open_write mode must be 'wb' or 'wt', got {mode!r}")
    uri = str(uri)
    if is_s3(uri):
        tmp_dir = None
        fd, tmp_name = tempfile.mkstemp(prefix="cmv-upload-")
    else:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = target.parent
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=tmp_dir)
    os.close(fd)
    ok = False
    try:
        with open(tmp_name, "wb") as raw:
            if uri.endswith(".gz"):
                # filename="" and mtime=0: the header carries no name or time,
                # so equal content gives byte-identical files.
                stream: IO = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6)
            elif uri.endswith(".bz2"):
                stream = bz2.BZ2File(raw, mode="wb")
            else:
                stream = raw
            text = None
            if mode in ("wt", "w"):
                text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
                yield text
                text.flush()
                text.detach()
            else:
                yield stream
            if stream is not raw:
                stream.close()
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            s3_client().upload_file(tmp_name, bucket, key)
        else:
            # mkstemp creates 0600 files; give the artifact the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)
            os.replace(tmp_name, local_path(uri))
        ok = True
    finally:
        if not ok or is_s3(uri):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def write_bytes(uri: str, data: bytes) -> None:
    with open_write(uri, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, dumps_json(obj))


def write_jsonl(uri: str, rows: Iterable[dict]) -> int:
    n = 0
    with open_write(uri, "wb") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False).encode("utf-8") + b"\n")
            n += 1
    return n


# ---------------------------------------------------------------- listing, copying


def exists(uri: str) -> bool:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return local_path(uri).exists()


def _s3_objects(uri: str) -> Iterator[dict]:
    bucket, prefix = _split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield {**obj, "Rel": obj["Key"][len(prefix):]}


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under a directory or prefix, sorted."""
    uri = str(uri)
    if is_s3(uri):
        return sorted(o["Rel"] for o in _s3_objects(uri) if o["Rel"])
    root = local_path(uri)
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        # in-flight atomic writes (".name.XXXX.tmp") are not files yet
        if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    )


def size(uri: str) -> int:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return local_path(uri).stat().st_size


def sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_read_raw(uri) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def open_read_raw(uri: str) -> Iterator[IO[bytes]]:
    """Like open_read but never decompresses (for digests and copies)."""
    raw = _raw_reader(str(uri))
    try:
        yield raw
    finally:
        raw.close()


def delete(uri: str) -> None:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        with contextlib.suppress(FileNotFoundError):
            local_path(uri).unlink()


def delete_prefix(uri: str) -> None:
    uri = str(uri)
    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        keys = [o["Key"] for o in _s3_objects(uri)]
        for i in range(0, len(keys), 1000):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to a URI (S3 or another local directory)."""
    local_dir = Path(local_dir)
    # A copied stage folder must never show its _SUCCESS before the files it lists.
    files = sorted((p for p in local_dir.rglob("*") if p.is_file()), key=lambda p: (p.name == SUCCESS, str(p)))
    for p in files:
        rel = str(p.relative_to(local_dir))
        dest = join(uri, rel)
        if is_s3(dest):
            bucket, key = _split_s3(dest)
            s3_client().upload_file(str(p), bucket, key)
        else:
            target = local_path(dest)
            if target.resolve() == p.resolve():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, target)


def download_dir(uri: str, local_dir: str | Path) -> str:
    """Copy every file under a URI into a local directory; returns its path."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel in list_files(uri):
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = join(uri, rel)
        if is_s3(src):
            bucket, key = _split_s3(src)
            s3_client().download_file(bucket, key, str(target))
        else:
            shutil.copyfile(local_path(src), target)
    return str(local_dir)


def materialize_dir(uri: str, cache_dir: str | Path | None = None) -> str:
    """A local directory holding the files under ``uri`` (S3 is downloaded)."""
    if not is_s3(uri):
        return str(local_path(uri))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = Path(cache_dir or tempfile.mkdtemp(prefix="cmv-dl-"))
    return download_dir(uri, base / digest)


# ---------------------------------------------------------------- manifests


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git_revision() -> str | None:
    env = os.environ.get("CMV_GIT_REVISION")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:
        return None


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cmv-persuasion")
    except Exception:
        return "unknown"


def require_success(stage_uri: str) -> dict:
    """The parsed ``_SUCCESS`` of a stage directory, or a clear error."""
    uri = join(stage_uri, SUCCESS)
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise MissingInputError(
            f"{stage_uri} has no {SUCCESS}: the stage that writes it has not finished (or failed). "
            f"Run that stage first, or wait for it."
        ) from None


def wait_for_success(stage_uri: str, timeout_s: float, poll_s: float = 10) -> dict:
    """Wait (bounded) for an upstream stage's ``_SUCCESS``."""
    deadline = time.monotonic() + timeout_s
    first = True
    while True:
        try:
            return require_success(stage_uri)
        except MissingInputError:
            if time.monotonic() >= deadline:
                raise MissingInputError(
                    f"gave up after {timeout_s:.0f} s waiting for {join(stage_uri, SUCCESS)}"
                ) from None
            if first:
                log.info("waiting up to %.0f s for %s", timeout_s, join(stage_uri, SUCCESS))
                first = False
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def _input_digest(uri: str, raw: bool) -> str:
    """Digest of a stage input: its manifest's sha256, or a cheap fingerprint of a raw file/dir."""
    if not raw:
        manifest_uri = join(uri, SUCCESS)
        try:
            return "sha256:" + hashlib.sha256(read_bytes(manifest_uri)).hexdigest()
        except FileNotFoundError:
            raise MissingInputError(
                f"input {uri} has no {SUCCESS}: the stage that writes it has not finished (or failed)"
            ) from None
    # Raw dumps are large: fingerprint by name, size and modification time/ETag
    # instead of hashing gigabytes on every run.
    h = hashlib.sha256()
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
            h.update(f"{key}:{head['ContentLength']}:{head.get('ETag')}".encode())
        except Exception:
            for o in _s3_objects(uri):
                h.update(f"{o['Rel']}:{o['Size']}:{o.get('ETag')}".encode())
    else:
        p = local_path(uri)
        if not p.exists():
            raise FileNotFoundError(f"input {uri} does not exist")
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for q in files:
            st = q.stat()
            h.update(f"{q.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return "fingerprint:" + h.hexdigest()


@dataclass
class StageRun:
    stage: str
    run_id: str
    output: str
    inputs: dict[str, str]
    config: dict
    started_at: str = field(default_factory=_now)


def infer_run_id(output: str) -> str:
    """``<root>/<run_id>/<stage>`` -> ``run_id``."""
    parts = [p for p in str(output).rstrip("/").split("/") if p]
    return parts[-2] if len(parts) >= 2 else "local"


def begin_stage(
    stage: str,
    output: str,
    *,
    inputs: list[str],
    config: dict,
    run_id: str | None = None,
    force: bool = False,
    raw_inputs: bool = False,
) -> StageRun | None:
    """Check inputs and decide whether the stage must run.

    Returns ``None`` when ``output`` already holds a ``_SUCCESS`` for the same
    stage, inputs and config (an idempotent rerun is skipped), else a
    :class:`StageRun` to pass to :func:`finish_stage`. A stale manifest is
    removed first, so a run killed midway never leaves one behind.
    """
    digests = {str(u): _input_digest(str(u), raw_inputs) for u in inputs}
    config = json.loads(json.dumps(config, default=str))
    run = StageRun(stage=stage, run_id=run_id or infer_run_id(output), output=str(output), inputs=digests, config=config)
    success_uri = join(output, SUCCESS)
    try:
        existing = json.loads(read_bytes(success_uri))
    except FileNotFoundError:
        existing = None
    if existing is not None:
        same = (
            existing.get("stage") == stage
            and {i["uri"]: i["digest"] for i in existing.get("inputs", [])} == digests
            and existing.get("config") == config
        )
        if same and not force:
            log.info("%s: skipped, %s matches its inputs and config (use --force to rerun)", stage, success_uri)
            return None
        log.info("%s: %s", stage, "forced rerun" if same else "inputs or config changed, rerunning")
        delete(success_uri)
    return run


def finish_stage(run: StageRun, summary: dict) -> dict:
    """Write the ``_SUCCESS`` manifest last, listing every output file."""
    files = []
    for rel in list_files(run.output):
        if rel == SUCCESS:
            continue
        uri = join(run.output, rel)
        files.append({"path": rel, "size": size(uri), "sha256": sha256(uri)})
    manifest = {
        "stage": run.stage,
        "run_id": run.run_id,
        "inputs": [{"uri": u, "digest": d} for u, d in run.inputs.items()],
        "config": run.config,
        "package_version": _package_version(),
        "git_revision": _git_revision(),
        "started_at": run.started_at,
        "finished_at": _now(),
        "files": files,
        "summary": summary,
    }
    write_json(join(run.output, SUCCESS), manifest)
    return manifest
