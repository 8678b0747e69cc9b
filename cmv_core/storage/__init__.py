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

The contract is checked, not just written:
- verified hand-off: ``begin_stage`` reads each input's ``_SUCCESS`` (refusing an
  empty, unparsable or wrong-stage one) and every later read of a file under that
  input (``open_read``, ``read_*``, ``download_dir``) is hashed while it streams and
  checked against the size and sha256 the manifest lists; a raw dump's fingerprint
  is its content (hashed while clean streams it, xxh3-128 per chunk; the ETag/checksum on S3);
- complete, exclusive outputs: ``begin_stage`` takes the output's lease (lease.py)
  and gives the attempt an id; every file written through this module under the
  output is recorded (size, sha256 computed while writing, the attempt id in its S3
  metadata); ``finish_stage`` writes ``_SUCCESS`` only when the output holds exactly
  the files the stage declares (``cmv_core.stages``) and each required one is the one
  this attempt wrote.
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
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from cmv_core import stages
from cmv_core.errors import InputError, IntegrityError, OutputError

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
_CHUNK = 8 * 1024 * 1024


LEASE = "_LEASE"

# What each stage's output must hold (required) and may hold (optional), as
# fnmatch patterns over the paths under the output ("*" also crosses "/").
# finish_stage refuses a _SUCCESS over anything else. A new stage or a new
# output file is one line here.
class MissingInputError(InputError):
    """An input stage directory has no ``_SUCCESS`` manifest."""


class ManifestError(InputError):
    """A ``_SUCCESS`` is empty, unparsable, of the wrong stage, or not a manifest."""


# ---------------------------------------------------------------- URIs


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
KNOWN_SCHEMES = ("file", "s3")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def check_uri(uri: str) -> str:
    """``uri`` itself, or an InputError for a scheme this store does not speak (``ftp://``)."""
    m = _SCHEME.match(str(uri))
    if m and m.group(1) not in KNOWN_SCHEMES:
        raise InputError(
            f"{uri}: unknown URI scheme {m.group(1)}://; use a path, file:///abs/path or s3://bucket/prefix"
        )
    return str(uri)


def check_run_id(run_id: str) -> str:
    """A run id names one folder under the root: letters, digits, '.', '_', '-'; no '..' or '/'."""
    if not RUN_ID_RE.match(str(run_id or "")) or ".." in str(run_id):
        raise InputError(
            f"run id {run_id!r} is not valid: use letters, digits, '.', '_' and '-' "
            f"(no '/' or '..'), at most 100 characters"
        )
    return str(run_id)


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or ``file://`` URI."""
    uri = check_uri(str(uri))
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


def s3_max_attempts(budget_s: float) -> int:
    """Attempts for botocore's standard/adaptive retries so that their backoff rides out an outage of
    ``budget_s`` seconds: the backoff before retry i is rand(0, 1) * min(0.05 * 2**i, 20) s, so keep adding
    attempts until the expected total wait is twice the budget (the minimum then rarely falls below it)."""
    waited, attempts = 0.0, 1
    while waited < 2 * budget_s:
        waited += min(0.05 * 2 ** (attempts - 1), 20.0) / 2
        attempts += 1
    return attempts


def _s3_client():
    import boto3
    from botocore.config import Config

    # botocore's own retry machinery (standard mode: exponential backoff with jitter on throttling, 5xx and
    # connection errors; "adaptive" adds client-side rate limiting) instead of a hand loop. The budget says
    # how long an outage a stage rides out before it gives up (CMV_S3_RETRY_BUDGET_S, default 60 s).
    budget = float(os.environ.get("CMV_S3_RETRY_BUDGET_S", "60"))
    attempts = int(os.environ.get("CMV_S3_MAX_ATTEMPTS") or s3_max_attempts(budget))
    mode = os.environ.get("CMV_S3_RETRY_MODE", "standard")
    cfg = Config(
        retries={"total_max_attempts": attempts, "mode": mode},
        connect_timeout=5,
        read_timeout=float(os.environ.get("CMV_S3_READ_TIMEOUT_S", "60")),
    )
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=cfg)


_client_cache: dict[tuple, Any] = {}


def s3_client():
    # One client per endpoint and process; clients are thread-safe.
    key = (
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("CMV_S3_MAX_ATTEMPTS"),
        os.environ.get("CMV_S3_RETRY_BUDGET_S"),
        os.environ.get("CMV_S3_RETRY_MODE"),
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


def _raw_get(uri: str) -> bytes:
    """The bytes of a file, never verified nor decompressed (manifests and leases)."""
    with _raw_reader(str(uri)) as f:
        return f.read()


# ---------------------------------------------------------------- verified hand-off


@dataclass(frozen=True)
class Expected:
    size: int
    sha256: str
    manifest: str


# file key -> what its upstream _SUCCESS lists; input root key -> its _SUCCESS uri
_EXPECTED: dict[str, Expected] = {}
_VERIFIED_ROOTS: dict[str, str] = {}


def _key(uri: str) -> str:
    """One spelling per file: ``s3://bucket/key`` or an absolute normalized path."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return "s3://" + bucket + "/" + "/".join(p for p in key.split("/") if p)
    return os.path.normpath(os.path.abspath(local_path(uri)))


def _under(key: str, root_key: str) -> str | None:
    """``key`` relative to ``root_key``, or None when it is not under it."""
    if key.startswith(root_key.rstrip("/") + "/"):
        return key[len(root_key.rstrip("/")) + 1 :]
    return None


def _expected(uri: str) -> Expected | None:
    """What a read of ``uri`` must give, when it lies under a verified input; a file there that its
    manifest does not list is refused (it is not part of the hand-off)."""
    if not _VERIFIED_ROOTS:
        return None
    key = _key(uri)
    found = _EXPECTED.get(key)
    if found is not None:
        return found
    for root, manifest in _VERIFIED_ROOTS.items():
        rel = _under(key, root)
        if rel is not None and rel not in (SUCCESS, LEASE):
            raise IntegrityError(
                f"{uri}: not listed in {manifest}; the input does not hold this file as its stage "
                f"wrote it (rerun the upstream stage)"
            )
    return None


class _HashingReader(io.RawIOBase):
    """Hashes and counts the bytes read through it; ``finish`` reads the rest, so the digest is the file's."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._raw.readinto(buf)
        if n:
            self.hash.update(memoryview(buf)[:n])
            self.size += n
        return n or 0

    def finish(self) -> None:
        buf = bytearray(_CHUNK)
        while self.readinto(buf):
            pass


def _check_digest(uri: str, hashed: _HashingReader, expected: Expected) -> None:
    actual = hashed.hash.hexdigest()
    if hashed.size != expected.size or actual != expected.sha256:
        raise IntegrityError(
            f"{uri}: content does not match {expected.manifest}: expected {expected.size} bytes sha256 "
            f"{expected.sha256}, read {hashed.size} bytes sha256 {actual}. The file changed after its stage "
            f"finished; rerun that stage (with --force)"
        )


@contextlib.contextmanager
def _verified_raw(uri: str) -> Iterator[IO[bytes]]:
    """The raw byte stream of ``uri``; hashed while read and checked at the end when it is a verified
    input file."""
    uri = str(uri)
    expected = _expected(uri)
    raw = _raw_reader(uri)
    if expected is None:
        try:
            yield raw
        finally:
            raw.close()
        return
    hashed = _HashingReader(raw)
    stream = io.BufferedReader(hashed, buffer_size=_CHUNK)
    try:
        yield stream
    except Exception as exc:
        # a reader that fails on a changed file (a parse error on the edited line) reports the change
        try:
            hashed.finish()
            _check_digest(uri, hashed, expected)
        except IntegrityError as changed:
            raise changed from exc
        except Exception:  # noqa: BLE001 - the reader's own error is the one to report
            pass
        finally:
            raw.close()
        raise
    except BaseException:
        raw.close()
        raise
    try:
        hashed.finish()
    finally:
        raw.close()
    _check_digest(uri, hashed, expected)


COMPRESSED = (".gz", ".bz2", ".zst")  # decompressed by open_read, by extension


class ZstdReader(io.RawIOBase):
    """A ``.zst`` stream as Pushshift's dumps are: several frames, windows up to 2 GiB (which the
    library refuses by default). Unlike zstandard's own stream reader it fails on a stream cut
    inside a frame (EOFError, like gzip and bz2) instead of ending quietly; corrupt data is an OSError."""

    def __init__(self, raw: IO[bytes], read_bytes: int = 1 << 20):
        import zstandard

        self._error = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._frame = None
        self._raw = raw
        self._read_bytes = read_bytes
        self._out = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while self._pos >= len(self._out) and not self._done:
            chunk = self._raw.read(self._read_bytes)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                self._done = True
                return
            out = []
            try:
                while chunk:
                    if self._frame is None or self._frame.eof:
                        self._frame = self._dctx.decompressobj()
                    out.append(self._frame.decompress(chunk))
                    chunk = self._frame.unused_data if self._frame.eof else b""
            except self._error as e:
                raise OSError(f"corrupt zstd stream: {e}") from e
            self._out, self._pos = b"".join(out), 0

    def readinto(self, buffer) -> int:
        self._fill()
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos : self._pos + n]
        self._pos += n
        return n


@contextlib.contextmanager
def open_read(uri: str, mode: str = "rb") -> Iterator[IO]:
    """Stream a file; ``.gz``, ``.bz2`` and ``.zst`` are decompressed by extension. A file of a verified input is
    checked against its manifest while it streams (IntegrityError at the end of the block on a mismatch)."""
    if mode not in ("rb", "rt", "r"):
        raise ValueError(f"open_read mode must be 'rb' or 'rt', got {mode!r}")
    with _verified_raw(str(uri)) as raw:
        name = str(uri)
        if name.endswith(".gz"):
            stream: IO = gzip.GzipFile(fileobj=raw, mode="rb")
        elif name.endswith(".bz2"):
            stream = bz2.BZ2File(raw, mode="rb")
        elif name.endswith(".zst"):
            stream = io.BufferedReader(ZstdReader(raw), buffer_size=1 << 20)
        else:
            stream = raw
        if mode in ("rt", "r"):
            stream = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        yield stream


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


class _HashingWriter(io.RawIOBase):
    """Hashes and counts the bytes written through it to ``raw``."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.hash.update(data)
        n = self._raw.write(data)
        self.size += len(data)
        return n if n is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()


def artifact_mode() -> int:
    """The mode of every artifact file: 0666 less the umask (mkstemp alone would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _s3_extra(uri: str) -> dict:
    run = _run_writing(uri)
    return {"Metadata": {"cmv-attempt": run.attempt}} if run is not None else {}


def _publish_local(tmp: str | Path, target: Path) -> None:
    os.chmod(tmp, artifact_mode())
    os.replace(tmp, target)


@contextlib.contextmanager
def open_write(uri: str, mode: str = "wb", compress: bool = True) -> Iterator[IO]:
    """Atomic write; the file appears only if the block exits without error.

    ``compress=False``: the caller writes the final bytes itself (say its own gzip stream) even for a
    ``.gz`` name. Under a running stage's output, the file's size and sha256 (hashed while written)
    and this attempt's id are recorded for ``finish_stage``."""
    if mode not in ("wb", "wt", "w"):
        raise ValueError(f"open_write mode must be 'wb' or 'wt', got {mode!r}")
    uri = check_uri(str(uri))
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
        with open(tmp_name, "wb") as file:
            raw = _HashingWriter(file)
            if not compress:
                stream: IO = raw
            elif uri.endswith(".gz"):
                # filename="" and mtime=0: the header carries no name or time,
                # so equal content gives byte-identical files.
                stream = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6)
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
            s3_client().upload_file(tmp_name, bucket, key, ExtraArgs=_s3_extra(uri) or None)
        else:
            _publish_local(tmp_name, local_path(uri))
        _record_written(uri, raw.size, raw.hash.hexdigest())
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
            yield {**obj, "Rel": obj["Key"][len(prefix) :]}


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under a directory or prefix, sorted."""
    uri = str(uri)
    if is_s3(uri):
        return sorted(o["Rel"] for o in _s3_objects(uri) if o["Rel"] and o["Rel"].rsplit("/", 1)[-1] != LEASE)
    root = local_path(uri)
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        # in-flight atomic writes (".name.XXXX.tmp") are not files yet; a lease is not an artifact
        if p.is_file() and not _is_tmp(p.name) and p.name != LEASE
    )


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def sweep_tmp(uri: str) -> int:
    """Delete the hidden ``.*.tmp`` files a dead attempt left under a local output (the caller holds its
    lease, so none is in flight); returns how many."""
    if is_s3(uri) or not local_path(uri).is_dir():
        return 0
    n = 0
    for p in local_path(uri).rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


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
    with _verified_raw(str(uri)) as raw:
        yield raw


def delete(uri: str) -> None:
    uri = str(uri)
    _forget_written(uri, prefix=False)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        with contextlib.suppress(FileNotFoundError):
            local_path(uri).unlink()


def delete_prefix(uri: str) -> None:
    uri = str(uri)
    _forget_written(uri, prefix=True)
    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        keys = [o["Key"] for o in _s3_objects(uri)]
        for i in range(0, len(keys), 1000):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
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
            digest = _file_sha256(p) if _run_writing(dest) is not None else None
            s3_client().upload_file(str(p), bucket, key, ExtraArgs=_s3_extra(dest) or None)
            if digest is not None:
                _record_written(dest, p.stat().st_size, digest)
        else:
            target = local_path(dest)
            if target.resolve() == p.resolve():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            h = hashlib.sha256()
            with open(p, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            _publish_local(tmp, target)
            _record_written(dest, target.stat().st_size, h.hexdigest())


def download_dir(uri: str, local_dir: str | Path) -> str:
    """Copy every file under a URI into a local directory; returns its path."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel in list_files(uri):
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = join(uri, rel)
        expected = _expected(src)
        if is_s3(src) and expected is None:
            bucket, key = _split_s3(src)
            s3_client().download_file(bucket, key, str(target))
        else:
            # a verified input is hashed as it is copied
            with open_read_raw(src) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, _CHUNK)
    return str(local_dir)


def materialize_dir(uri: str, cache_dir: str | Path | None = None) -> str:
    """A local directory holding the files under ``uri`` (S3 is downloaded)."""
    if not is_s3(uri):
        # A verified input that a library will read by path (transformers, vLLM): hashed here, since
        # its reads do not pass through this module.
        for rel in list_files(uri):
            src = join(uri, rel)
            if _expected(src) is not None:
                with open_read_raw(src) as f:
                    while f.read(_CHUNK):
                        pass
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


def parse_manifest(data: bytes, uri: str, stage: str | tuple[str, ...] | None = None) -> dict:
    """A ``_SUCCESS``'s content, checked: JSON, a stage manifest (stage, files with size and sha256), of
    the expected stage; anything else is a ManifestError in one line."""
    if not data.strip():
        raise ManifestError(
            f"{uri} is empty: not a stage manifest (the stage that wrote it did not finish); rerun that stage"
        )
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ManifestError(
            f"{uri} is not valid JSON{where}: not a stage manifest; rerun the stage that writes it"
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("stage"), str)
        or not isinstance(files, list)
        or not all(
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str)
            for f in files
        )
    ):
        raise ManifestError(f"{uri} is not a stage manifest (needs stage and files with path, size and sha256)")
    allowed = (stage,) if isinstance(stage, str) else stage
    if allowed and manifest["stage"] not in allowed:
        raise ManifestError(
            f"{uri} is the manifest of stage {manifest['stage']!r}, expected "
            f"{' or '.join(repr(a) for a in allowed)}: wrong input folder?"
        )
    return manifest


def require_success(stage_uri: str, stage: str | tuple[str, ...] | None = None) -> dict:
    """The parsed, checked ``_SUCCESS`` of a stage directory, or a clear error."""
    uri = join(stage_uri, SUCCESS)
    try:
        data = _raw_get(uri)
    except FileNotFoundError:
        raise MissingInputError(
            f"{stage_uri} has no {SUCCESS}: the stage that writes it has not finished (or failed). "
            f"Run that stage first, or wait for it."
        ) from None
    return parse_manifest(data, uri, stage)


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


def _verify_input(uri: str, manifest: dict) -> None:
    """Every later read of a file under ``uri`` is checked against ``manifest``."""
    root = _key(uri)
    for k in [k for k in _EXPECTED if _under(k, root) is not None]:
        del _EXPECTED[k]
    manifest_uri = join(uri, SUCCESS)
    _VERIFIED_ROOTS[root] = manifest_uri
    for f in manifest["files"]:
        _EXPECTED[_key(join(uri, f["path"]))] = Expected(f["size"], f["sha256"], manifest_uri)


def _unverify(uri: str) -> None:
    """``uri`` is being (re)written in this process: forget what an older manifest said of it."""
    root = _key(uri)
    for k in [k for k in _VERIFIED_ROOTS if k == root or _under(k, root) is not None]:
        del _VERIFIED_ROOTS[k]
    for k in [k for k in _EXPECTED if _under(k, root) is not None]:
        del _EXPECTED[k]


def _input_digest(uri: str, stage: str) -> str:
    """A stage input's digest: the sha256 of its checked manifest (which lists every file's sha256)."""
    manifest_uri = join(uri, SUCCESS)
    try:
        data = _raw_get(manifest_uri)
    except FileNotFoundError:
        raise MissingInputError(
            f"input {uri} has no {SUCCESS}: the stage that writes it has not finished (or failed)"
        ) from None
    manifest = parse_manifest(data, manifest_uri, stages.accepted_inputs(stage) or None)
    _check_listing(uri, manifest)
    _verify_input(uri, manifest)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sizes(uri: str) -> dict[str, int]:
    """rel path -> size of every file under a stage directory, from one listing."""
    if is_s3(uri):
        return {
            o["Rel"]: int(o["Size"])
            for o in _s3_objects(uri)
            if o["Rel"] and o["Rel"].rsplit("/", 1)[-1] not in (SUCCESS, LEASE)
        }
    root = local_path(uri)
    return {rel: (root / rel).stat().st_size for rel in list_files(uri) if rel != SUCCESS}


def _check_listing(uri: str, manifest: dict) -> None:
    """The input holds exactly the files its manifest lists, at the listed sizes (one listing, no reads)."""
    listed = {f["path"]: f["size"] for f in manifest["files"]}
    there = _sizes(uri)
    manifest_uri = join(uri, SUCCESS)
    problems = []
    missing = sorted(set(listed) - set(there))
    if missing:
        problems.append(f"listed but not there: {', '.join(missing[:5])}")
    extra = sorted(set(there) - set(listed))
    if extra:
        problems.append(f"there but not listed: {', '.join(extra[:5])}")
    resized = sorted(r for r in set(listed) & set(there) if listed[r] != there[r])
    if resized:
        problems.append(
            "size differs from the manifest: "
            + ", ".join(f"{r} ({there[r]} bytes, listed {listed[r]})" for r in resized[:5])
        )
    if problems:
        raise IntegrityError(
            f"{uri} does not match {manifest_uri}: {'; '.join(problems)}. "
            f"The output changed after its stage finished; rerun that stage (with --force)"
        )


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _raw_files(uri: str) -> list[str]:
    """The keys of a raw input's files (itself, or every file under the directory)."""
    p = local_path(uri)
    if not p.exists():
        raise InputError(f"input {uri} does not exist")
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and not _is_tmp(q.name))
    return [_key(str(q)) for q in files]


RAW_CHUNK_BYTES = 4 << 20


def chunk_hash():
    """The hash of one chunk of a raw dump. xxh3-128, not sha256: the raw fingerprint only tells
    whether the dump's content changed since the last run (skip or rerun), not who wrote it, and
    sha256 runs at ~1.2 GB/s here, about 8% of clean's wall time on 2 cores for a plain dump,
    against ~2% for xxh3 (6 GB/s). Hand-off files between stages keep sha256 (their manifests)."""
    import xxhash

    return xxhash.xxh3_128()


class RawDigest:
    """A raw dump file's content digest: sha256 over the chunk_hash of each chunk of its (decompressed)
    lines, a chunk ending at the first line end at or past RAW_CHUNK_BYTES. Chunks can be hashed
    anywhere (clean hashes them in its workers, as they parse) and are combined here in order."""

    def __init__(self) -> None:
        self._outer = hashlib.sha256()
        self.size = 0
        self.broken = False  # the stream broke: no digest from the stream

    def add(self, n: int, chunk_sha256: bytes) -> None:
        self._outer.update(chunk_sha256)
        self.size += n

    def hexdigest(self) -> str:
        return f"xxh3-chunks{RAW_CHUNK_BYTES}:" + self._outer.hexdigest()


def plain_local(uri: str) -> bool:
    """A local regular file read as it is stored (not .gz/.bz2/.zst, not a verified hand-off file): its
    bytes can be read by offset (raw_chunks, read_range), so clean's workers read their own parts of it."""
    uri = str(uri)
    return not is_s3(uri) and not uri.endswith(COMPRESSED) and local_path(uri).is_file() and _expected(uri) is None


def raw_chunks(uri: str) -> Iterator[tuple[int, int]]:
    """(start, end) byte offsets of a plain local file's RawDigest chunks, in order: each ends at the
    first line end at or past RAW_CHUNK_BYTES from its start, the last at the end of the file, exactly
    where the streamed lines cut them, so chunk_hash() of read_range(uri, start, end) is a chunk's digest.
    Found by seeking: only the bytes from a chunk's RAW_CHUNK_BYTES-th to its line end are read here."""
    with open(local_path(uri), "rb", buffering=0) as f:
        total = os.fstat(f.fileno()).st_size
        start = 0
        while start < total:
            end, pos = total, start + RAW_CHUNK_BYTES - 1  # the chunk's line end is at pos or after
            while pos < total:
                block = os.pread(f.fileno(), 64 << 10, pos)
                if not block:
                    break
                newline = block.find(b"\n")
                if newline >= 0:
                    end = pos + newline + 1
                    break
                pos += len(block)
            yield start, end
            start = end


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a local file; OSError when fewer are there (the file shrank)."""
    with open(local_path(uri), "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise OSError(f"{uri}: {len(data)} bytes at offset {start}, expected {end - start} (the file changed)")
    return data


def raw_file_digest(uri: str) -> tuple[int, str]:
    """(size, RawDigest) of one raw file, read here (a skip check; a run hashes while it streams)."""
    digest, chunk, n = RawDigest(), chunk_hash(), 0
    try:
        if plain_local(uri):  # by chunk: no line splitting
            for start, end in raw_chunks(uri):
                h = chunk_hash()
                h.update(read_range(uri, start, end))
                digest.add(end - start, h.digest())
            return digest.size, digest.hexdigest()
        with open_read(uri, "rb") as f:
            for line in f:
                chunk.update(line)
                n += len(line)
                if n >= RAW_CHUNK_BYTES:
                    digest.add(n, chunk.digest())
                    chunk, n = chunk_hash(), 0
    except Exception as exc:  # noqa: BLE001 - a broken stream: a digest no streamed run gives, so it reruns
        return os.path.getsize(local_path(uri)), f"unreadable:{type(exc).__name__}:{_file_sha256(local_path(uri))}"
    if n:
        digest.add(n, chunk.digest())
    return digest.size, digest.hexdigest()


def record_raw_digest(run: StageRun, uri: str, digest: RawDigest) -> None:
    """A raw input file's digest, hashed by the stage while it streamed it (taken by finish_stage)."""
    if not digest.broken and not is_s3(uri):
        run.read_digests[_key(uri)] = (digest.size, digest.hexdigest())


def _combine(uri: str, digests: dict[str, tuple[int, str]]) -> str:
    """One digest for a raw input from its files' (size, digest)."""
    keys = _raw_files(uri)
    if len(keys) == 1 and keys[0] == _key(uri):
        return "content:" + digests[keys[0]][1]
    root = _key(uri)
    h = hashlib.sha256()
    for k in keys:
        h.update(f"{_under(k, root)}:{digests[k][0]}:{digests[k][1]}\n".encode())
    return "content:" + h.hexdigest()


def raw_fingerprint(uri: str, streamed: dict[str, tuple[int, str]] | None = None) -> str:
    """A raw dump's fingerprint from its content: the RawDigest of a local file (of each file of a directory),
    taken from ``streamed`` where a stage already hashed it while reading; on S3 the store's own checksum
    (ChecksumSHA256, else the ETag, which is a content MD5 or a digest of part digests)."""
    uri = str(uri)
    if is_s3(uri):
        h = hashlib.sha256()
        bucket, key = _split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            h.update(f"{key}:{head['ContentLength']}:{head.get('ChecksumSHA256') or head.get('ETag')}".encode())
        except Exception:
            objs = list(_s3_objects(uri))
            if not objs:
                raise InputError(f"input {uri} does not exist") from None
            for o in objs:
                h.update(f"{o['Rel']}:{o['Size']}:{o.get('ETag')}".encode())
        return "etag:" + h.hexdigest()
    digests = dict(streamed or {})
    for k in _raw_files(uri):
        if k not in digests:
            digests[k] = raw_file_digest(k)
    return _combine(uri, digests)


@dataclass
class StageRun:
    stage: str
    run_id: str
    output: str
    inputs: dict[str, str | None]  # uri -> digest; None: a raw input fingerprinted while it streams
    config: dict
    started_at: str = field(default_factory=_now)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # rel path -> size, sha256 and (local) the file's identity right after this attempt published it
    written: dict[str, dict] = field(default_factory=dict)
    read_digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    lease: Any = None


_RUNS: dict[str, StageRun] = {}  # output key -> the attempt writing it in this process


def _run_writing(uri: str) -> StageRun | None:
    if not _RUNS:
        return None
    key = _key(uri)
    for root, run in _RUNS.items():
        if _under(key, root) is not None:
            return run
    return None


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _record_written(uri: str, n: int, digest: str) -> None:
    run = _run_writing(uri)
    if run is None:
        return
    rel = _under(_key(uri), _key(run.output))
    entry = {"size": n, "sha256": digest}
    if not is_s3(uri):
        path = local_path(uri)
        with contextlib.suppress(OSError):  # where the filesystem keeps user xattrs, the attempt rides along
            os.setxattr(path, "user.cmv.attempt", run.attempt.encode())
        entry["identity"] = _identity(path)
    run.written[rel] = entry


def _forget_written(uri: str, prefix: bool) -> None:
    run = _run_writing(uri)
    if run is None:
        return
    rel = _under(_key(uri), _key(run.output))
    for r in [r for r in run.written if r == rel or (prefix and (rel is None or r.startswith(rel.rstrip("/") + "/")))]:
        del run.written[r]


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
    """Check inputs, take the output's lease, and decide whether the stage must run.

    Input manifests are checked (non-empty, parsable, of the upstream stage) and every file they list
    is verified when it is read later. Returns ``None`` when ``output`` already holds a ``_SUCCESS`` for
    the same stage, inputs and config (an idempotent rerun is skipped), else a :class:`StageRun` to pass
    to :func:`finish_stage`. A stale manifest and a dead attempt's temp files are removed first, so a run
    killed midway never leaves one behind.
    """
    from cmv_core.storage import lease as lease_mod

    output = check_uri(str(output))
    if run_id is not None:
        check_run_id(run_id)
    for u in inputs:
        check_uri(str(u))
    digests: dict[str, str | None] = {
        str(u): (
            None
            if raw_inputs and not is_s3(str(u))
            else raw_fingerprint(str(u))
            if raw_inputs
            else _input_digest(str(u), stage)
        )
        for u in inputs
    }
    config = json.loads(json.dumps(config, default=str))
    run = StageRun(stage=stage, run_id=run_id or infer_run_id(output), output=output, inputs=digests, config=config)
    run.lease = lease_mod.acquire(output, run.attempt)
    try:
        _unverify(output)
        success_uri = join(output, SUCCESS)
        try:
            existing = parse_manifest(_raw_get(success_uri), success_uri, stage)
        except FileNotFoundError:
            existing = None
        except ManifestError as exc:
            log.warning("%s: %s; rerunning", stage, exc)
            existing = {}
        if existing is not None:
            # Only a skip needs the raw inputs' fingerprints now (reading the whole dump once more); a run
            # takes them while it streams. So none with --force, nor once the stage or config differ.
            same = not force and existing.get("stage") == stage and existing.get("config") == config
            if same:
                now = {u: d if d is not None else raw_fingerprint(u) for u, d in digests.items()}
                same = {i["uri"]: i["digest"] for i in existing.get("inputs", [])} == now
            if same:
                log.info("%s: skipped, %s matches its inputs and config (use --force to rerun)", stage, success_uri)
                run.lease.release()
                return None
            log.info("%s: %s", stage, "forced rerun" if force else "inputs or config changed, rerunning")
            delete(success_uri)
        swept = sweep_tmp(output)
        if swept:
            log.info("%s: removed %d temp file(s) a dead attempt left in %s", stage, swept, output)
    except BaseException:
        run.lease.release()
        raise
    _RUNS[_key(output)] = run
    log.info("%s: attempt %s writes %s", stage, run.attempt, output)
    return run


def abort_stage(run: StageRun) -> None:
    """Give up an attempt: release its lease (no _SUCCESS is written)."""
    _RUNS.pop(_key(run.output), None)
    if run.lease is not None:
        run.lease.release()


def release_all() -> None:
    """Release every lease this process still holds (the CLI calls it on the way out)."""
    for run in list(_RUNS.values()):
        abort_stage(run)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(rel, p) for p in patterns)


def _still_ours(run: StageRun, rel: str, entry: dict) -> str | None:
    """Why the file at ``rel`` is not the one this attempt wrote, or None."""
    uri = join(run.output, rel)
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return "written by this attempt but no longer in the store"
            raise
        owner = (head.get("Metadata") or {}).get("cmv-attempt")
        if owner != run.attempt or int(head["ContentLength"]) != entry["size"]:
            return f"replaced after this attempt wrote it (now attempt {owner}, {head['ContentLength']} bytes)"
        return None
    try:
        if _identity(local_path(uri)) != entry["identity"]:
            return "replaced or changed after this attempt wrote it"
    except FileNotFoundError:
        return "written by this attempt but no longer there"
    return None


def finish_stage(
    run: StageRun,
    summary: dict,
    required: Iterable[str] | None = None,
    optional: Iterable[str] = (),
    *,
    declared: bool = False,
) -> dict:
    """Write the ``_SUCCESS`` manifest last, listing every output file.

    With ``declared=True`` (``stages.outputs(run.stage)``) or explicit ``required``/``optional``
    patterns, the output must hold exactly those files: a required one missing, or a file no pattern
    declares, and no ``_SUCCESS`` is written (OutputError). A file this attempt wrote is listed with the
    size and sha256 hashed while it was written, after checking it is still that file (S3: the attempt
    id in its metadata); only an optional file may be carried over from an earlier attempt (a cache,
    checkpoints), and it is hashed here. Without a declaration (test fixtures) whatever is there is listed."""
    if declared:
        required, optional = stages.outputs(run.stage)
    strict = required is not None
    required, optional = tuple(required or ()), tuple(optional)
    present = [rel for rel in list_files(run.output) if rel != SUCCESS]
    problems = []
    if strict:
        missing = [p for p in required if not any(fnmatchcase(rel, p) for rel in present)]
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        foreign = [rel for rel in present if not _matches(rel, required + optional)]
        if foreign:
            problems.append(
                f"not declared by stage {run.stage}: {', '.join(foreign[:10])}"
                + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            )
    files = []
    for rel in present:
        entry = run.written.get(rel)
        if entry is None:
            if strict and not _matches(rel, optional):
                problems.append(f"{rel} was not written by this attempt ({run.attempt})")
                continue
            uri = join(run.output, rel)
            files.append({"path": rel, "size": size(uri), "sha256": sha256(uri)})
            continue
        why = _still_ours(run, rel, entry)
        if why:
            problems.append(f"{rel} {why}")
            continue
        files.append({"path": rel, "size": entry["size"], "sha256": entry["sha256"], "attempt": run.attempt})
    for rel in run.written:
        if rel not in present and (not strict or _matches(rel, required + optional)):
            if not any(p.startswith(rel + " ") for p in problems):
                problems.append(f"{rel} was written by this attempt but is not in the store any more")
    if problems:
        abort_stage(run)
        raise OutputError(
            f"{run.output}: no {SUCCESS} written, the output is not exactly what attempt "
            f"{run.attempt} of stage {run.stage} wrote: {'; '.join(problems)}. Rerun the stage"
        )
    if run.lease is not None:
        run.lease.check()
    # raw inputs: the fingerprint taken while the stage streamed them (files it did not read are hashed now)
    inputs = {u: d if d is not None else raw_fingerprint(u, run.read_digests) for u, d in run.inputs.items()}
    manifest = {
        "stage": run.stage,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "inputs": [{"uri": u, "digest": d} for u, d in inputs.items()],
        "config": run.config,
        "package_version": _package_version(),
        "git_revision": _git_revision(),
        "started_at": run.started_at,
        "finished_at": _now(),
        "files": files,
        "summary": summary,
    }
    _RUNS.pop(_key(run.output), None)
    try:
        write_json(join(run.output, SUCCESS), manifest)
    finally:
        abort_stage(run)
    return manifest
