"""What the store's reads are checked against and its writes are recorded into, per registered root.

The readers and writers (io.py) consult this state on every file they open, and know nothing else of
stages; the hand-off layer (handoff.py) registers the roots:
- expected files: every file under a verified root must be one its listing (the root's ``_SUCCESS``
  manifest) gives, with that size and sha256; a file there that the listing leaves out is refused;
- write logs: every file written under a tracked root is logged (size, sha256 hashed while written, local
  identity) into the writer's own dict, and tagged with the writer's id (S3 metadata, a local xattr).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cmv_core.errors import IntegrityError
from cmv_core.storage.uris import LEASE, SUCCESS, file_key, is_s3, join, local_path, under


@dataclass(frozen=True)
class Expected:
    size: int
    sha256: str
    manifest: str


# file key -> what its root's listing says; verified root key -> that listing's uri
_EXPECTED: dict[str, Expected] = {}
_VERIFIED_ROOTS: dict[str, str] = {}


def expect_files(root: str, manifest: str, files: Iterable[tuple[str, int, str]]) -> None:
    """Every later read of a file under ``root`` is checked against ``files`` (path, size, sha256), the
    listing of ``manifest``; what an earlier listing said of ``root`` is forgotten."""
    root_key = file_key(root)
    for k in [k for k in _EXPECTED if under(k, root_key) is not None]:
        del _EXPECTED[k]
    _VERIFIED_ROOTS[root_key] = manifest
    for rel, size, sha256 in files:
        _EXPECTED[file_key(join(root, rel))] = Expected(size, sha256, manifest)


def forget_expected(uri: str) -> None:
    """``uri`` is being (re)written in this process: forget what an older listing said of it."""
    root = file_key(uri)
    for k in [k for k in _VERIFIED_ROOTS if k == root or under(k, root) is not None]:
        del _VERIFIED_ROOTS[k]
    for k in [k for k in _EXPECTED if under(k, root) is not None]:
        del _EXPECTED[k]


def expected(uri: str) -> Expected | None:
    """What a read of ``uri`` must give, when it lies under a verified input; a file there that its
    manifest does not list is refused (it is not part of the hand-off)."""
    if not _VERIFIED_ROOTS:
        return None
    key = file_key(uri)
    found = _EXPECTED.get(key)
    if found is not None:
        return found
    for root, manifest in _VERIFIED_ROOTS.items():
        rel = under(key, root)
        if rel is not None and rel not in (SUCCESS, LEASE):
            raise IntegrityError(
                f"{uri}: not listed in {manifest}; the input does not hold this file as its stage "
                f"wrote it (rerun the upstream stage)"
            )
    return None


@dataclass
class WriteLog:
    root: str  # the tracked output
    tag: str  # the writer's id, carried by each file it writes
    files: dict[str, dict]  # rel path -> size, sha256 and (local) identity; the writer's own dict


_WRITERS: dict[str, WriteLog] = {}  # root key -> the writer of that output in this process


def track_writes(root: str, tag: str, files: dict[str, dict]) -> None:
    """Log every file written under ``root`` from now on into ``files``, tagged ``tag``."""
    _WRITERS[file_key(root)] = WriteLog(root, tag, files)


def untrack_writes(root: str) -> None:
    _WRITERS.pop(file_key(root), None)


def writer_of(uri: str) -> WriteLog | None:
    if not _WRITERS:
        return None
    key = file_key(uri)
    for root, writer in _WRITERS.items():
        if under(key, root) is not None:
            return writer
    return None


def identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def record_written(uri: str, n: int, digest: str) -> None:
    writer = writer_of(uri)
    if writer is None:
        return
    rel = under(file_key(uri), file_key(writer.root))
    entry = {"size": n, "sha256": digest}
    if not is_s3(uri):
        path = local_path(uri)
        with contextlib.suppress(OSError):  # where the filesystem keeps user xattrs, the attempt rides along
            os.setxattr(path, "user.cmv.attempt", writer.tag.encode())
        entry["identity"] = identity(path)
    writer.files[rel] = entry


def forget_written(uri: str, prefix: bool) -> None:
    writer = writer_of(uri)
    if writer is None:
        return
    rel = under(file_key(uri), file_key(writer.root))
    for r in [r for r in writer.files if r == rel or (prefix and (rel is None or r.startswith(rel.rstrip("/") + "/")))]:
        del writer.files[r]


def s3_extra(uri: str) -> dict:
    """The upload's ExtraArgs: the writer's tag in the object's metadata, under a tracked root."""
    writer = writer_of(uri)
    return {"Metadata": {"cmv-attempt": writer.tag}} if writer is not None else {}
