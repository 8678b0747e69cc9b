"""The store's URIs: plain paths, ``file://`` URIs and ``s3://`` URIs, and the file names every layer shares."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from cmv_core.errors import InputError

SUCCESS = "_SUCCESS"  # a stage output's manifest, written last (docs/ARCHITECTURE.md)
LEASE = "_LEASE"  # who writes a stage output now (lease.py); never an artifact

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


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def file_key(uri: str) -> str:
    """One spelling per file: ``s3://bucket/key`` or an absolute normalized path."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return "s3://" + bucket + "/" + "/".join(p for p in key.split("/") if p)
    return os.path.normpath(os.path.abspath(local_path(uri)))


def under(key: str, root_key: str) -> str | None:
    """``key`` relative to ``root_key``, or None when it is not under it."""
    if key.startswith(root_key.rstrip("/") + "/"):
        return key[len(root_key.rstrip("/")) + 1 :]
    return None


def is_tmp(name: str) -> bool:
    """An in-flight atomic write (``.name.XXXX.tmp``): not a file yet."""
    return name.startswith(".") and name.endswith(".tmp")
