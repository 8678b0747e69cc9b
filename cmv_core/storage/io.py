"""Reading and writing files of the store, the same on local paths, ``file://`` and ``s3://``.

Writes are atomic: a file becomes visible only when its ``with`` block exits cleanly (local: temp file +
``os.replace``; S3: the object is uploaded on close). ``.gz`` files are written with ``mtime=0`` so that
equal content gives byte-identical files wherever they are stored. A read of a file under a verified
root is hashed while it streams and checked against its listing, and a write under a tracked root is
recorded (tracking.py holds both, registered by the hand-off layer).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from cmv_core.errors import IntegrityError
from cmv_core.storage import tracking
from cmv_core.storage.s3 import abort_uploads, s3_client, s3_objects, s3_reader, upload_file
from cmv_core.storage.streams import CHUNK, HashingReader, HashingWriter, ZstdReader
from cmv_core.storage.uris import LEASE, check_uri, is_s3, is_tmp, local_path, split_s3

# ---------------------------------------------------------------- reading


def _raw_reader(uri: str) -> IO[bytes]:
    if is_s3(uri):
        return io.BufferedReader(s3_reader(uri), buffer_size=CHUNK)
    return open(local_path(uri), "rb", buffering=CHUNK)


def raw_get(uri: str) -> bytes:
    """The bytes of a file, never verified nor decompressed (manifests and leases)."""
    with _raw_reader(str(uri)) as f:
        return f.read()


def _check_digest(uri: str, hashed: HashingReader, expected: tracking.Expected) -> None:
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
    expected = tracking.expected(uri)
    raw = _raw_reader(uri)
    if expected is None:
        try:
            yield raw
        finally:
            raw.close()
        return
    hashed = HashingReader(raw)
    stream = io.BufferedReader(hashed, buffer_size=CHUNK)
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


@contextlib.contextmanager
def open_read_raw(uri: str) -> Iterator[IO[bytes]]:
    """Like open_read but never decompresses (for digests and copies)."""
    with _verified_raw(str(uri)) as raw:
        yield raw


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


def artifact_mode() -> int:
    """The mode of every artifact file: 0666 less the umask (mkstemp alone would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish_local(tmp: str | Path, target: Path) -> None:
    os.chmod(tmp, artifact_mode())
    os.replace(tmp, target)


def _temp_file(uri: str) -> str:
    """A new empty temp file for a write to ``uri``: next to a local target (the same filesystem, so the
    publishing rename is atomic), in the system temp dir for an upload."""
    if is_s3(uri):
        fd, tmp_name = tempfile.mkstemp(prefix="cmv-upload-")
    else:
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return tmp_name


def _encoder(raw: HashingWriter, uri: str, compress: bool) -> IO:
    if not compress:
        return raw
    if uri.endswith(".gz"):
        # filename="" and mtime=0: the header carries no name or time,
        # so equal content gives byte-identical files.
        return gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=6)
    if uri.endswith(".bz2"):
        return bz2.BZ2File(raw, mode="wb")
    return raw


@contextlib.contextmanager
def open_write(uri: str, mode: str = "wb", compress: bool = True) -> Iterator[IO]:
    """Atomic write; the file appears only if the block exits without error.

    ``compress=False``: the caller writes the final bytes itself (say its own gzip stream) even for a
    ``.gz`` name. Under a tracked output (a running stage's, tracking.py), the file's size and sha256
    (hashed while written) and the writer's id are recorded for ``finish_stage``."""
    if mode not in ("wb", "wt", "w"):
        raise ValueError(f"open_write mode must be 'wb' or 'wt', got {mode!r}")
    uri = check_uri(str(uri))
    tmp_name = _temp_file(uri)
    ok = False
    try:
        with open(tmp_name, "wb") as file:
            raw = HashingWriter(file)
            stream = _encoder(raw, uri, compress)
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
            upload_file(tmp_name, uri, tracking.s3_extra(uri))
        else:
            publish_local(tmp_name, local_path(uri))
        tracking.record_written(uri, raw.size, raw.hash.hexdigest())
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


# ---------------------------------------------------------------- files and listings


def exists(uri: str) -> bool:
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        from botocore.exceptions import ClientError

        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return local_path(uri).exists()


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under a directory or prefix, sorted."""
    uri = str(uri)
    if is_s3(uri):
        return sorted(o["Rel"] for o in s3_objects(uri) if o["Rel"] and o["Rel"].rsplit("/", 1)[-1] != LEASE)
    root = local_path(uri)
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        # in-flight atomic writes (".name.XXXX.tmp") are not files yet; a lease is not an artifact
        if p.is_file() and not is_tmp(p.name) and p.name != LEASE
    )


def sweep_tmp(uri: str) -> int:
    """Delete the hidden ``.*.tmp`` files a dead attempt left under a local output, or abort the
    incomplete multipart uploads it left under an S3 one (the caller holds its lease, so none is in
    flight); returns how many."""
    if is_s3(uri):
        return abort_uploads(uri)
    if not local_path(uri).is_dir():
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
        bucket, key = split_s3(uri)
        return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return local_path(uri).stat().st_size


def sha256(uri: str) -> str:
    h = hashlib.sha256()
    with open_read_raw(uri) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def delete(uri: str) -> None:
    uri = str(uri)
    tracking.forget_written(uri, prefix=False)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        with contextlib.suppress(FileNotFoundError):
            local_path(uri).unlink()


def delete_prefix(uri: str) -> None:
    uri = str(uri)
    tracking.forget_written(uri, prefix=True)
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        keys = [o["Key"] for o in s3_objects(uri)]
        for i in range(0, len(keys), 1000):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)
