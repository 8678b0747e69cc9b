"""Whole directories in and out of the store: model folders and checkpoints that libraries read by path."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from cmv_core.storage import tracking
from cmv_core.storage.io import list_files, open_read_raw, publish_local
from cmv_core.storage.s3 import download_file, upload_file
from cmv_core.storage.streams import CHUNK, file_sha256
from cmv_core.storage.uris import SUCCESS, is_s3, join, local_path


def _copy_local(src: Path, target: Path) -> str:
    """Copy a file atomically; returns its sha256, hashed while copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    h = hashlib.sha256()
    with open(src, "rb") as f, open(tmp, "wb") as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    publish_local(tmp, target)
    return h.hexdigest()


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to a URI (S3 or another local directory)."""
    local_dir = Path(local_dir)
    # A copied stage folder must never show its _SUCCESS before the files it lists.
    files = sorted((p for p in local_dir.rglob("*") if p.is_file()), key=lambda p: (p.name == SUCCESS, str(p)))
    for p in files:
        rel = str(p.relative_to(local_dir))
        dest = join(uri, rel)
        if is_s3(dest):
            digest = file_sha256(p) if tracking.writer_of(dest) is not None else None
            upload_file(str(p), dest, tracking.s3_extra(dest))
            if digest is not None:
                tracking.record_written(dest, p.stat().st_size, digest)
        else:
            target = local_path(dest)
            if target.resolve() == p.resolve():
                continue
            digest = _copy_local(p, target)
            tracking.record_written(dest, target.stat().st_size, digest)


def download_dir(uri: str, local_dir: str | Path) -> str:
    """Copy every file under a URI into a local directory; returns its path."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    for rel in list_files(uri):
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = join(uri, rel)
        expected = tracking.expected(src)
        if is_s3(src) and expected is None:
            download_file(src, str(target))
        else:
            # a verified input is hashed as it is copied
            with open_read_raw(src) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, CHUNK)
    return str(local_dir)


def materialize_dir(uri: str, cache_dir: str | Path | None = None) -> str:
    """A local directory holding the files under ``uri`` (S3 is downloaded)."""
    if not is_s3(uri):
        # A verified input that a library will read by path (transformers, vLLM): hashed here, since
        # its reads do not pass through the store.
        for rel in list_files(uri):
            src = join(uri, rel)
            if tracking.expected(src) is not None:
                with open_read_raw(src) as f:
                    while f.read(CHUNK):
                        pass
        return str(local_path(uri))
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    base = Path(cache_dir or tempfile.mkdtemp(prefix="cmv-dl-"))
    return download_dir(uri, base / digest)
