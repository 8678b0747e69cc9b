"""``_SUCCESS`` manifests: reading and checking a stage's manifest, waiting for one, verifying an input by it.

A stage writes its files, then last a ``_SUCCESS`` JSON manifest listing each with its size and sha256
(docs/ARCHITECTURE.md, "Artifacts and the hand-off contract"); handoff.py writes it."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path

from cmv_core import stages
from cmv_core.errors import InputError, IntegrityError
from cmv_core.storage import tracking
from cmv_core.storage.io import list_files, raw_get
from cmv_core.storage.s3 import s3_objects
from cmv_core.storage.uris import LEASE, SUCCESS, is_s3, join, local_path

log = logging.getLogger(__name__)


class MissingInputError(InputError):
    """An input stage directory has no ``_SUCCESS`` manifest."""


class ManifestError(InputError):
    """A ``_SUCCESS`` is empty, unparsable, of the wrong stage, or not a manifest."""


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_revision() -> str | None:
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


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("cmv-persuasion")
    except Exception:
        return "unknown"


def _is_manifest(manifest: object) -> bool:
    """A stage manifest's shape: a stage name and files, each with path, size and sha256."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return (
        isinstance(manifest, dict)
        and isinstance(manifest.get("stage"), str)
        and isinstance(files, list)
        and all(
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str)
            for f in files
        )
    )


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
    if not _is_manifest(manifest):
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
        data = raw_get(uri)
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


def input_digest(uri: str, stage: str) -> str:
    """A stage input's digest: the sha256 of its checked manifest (which lists every file's sha256). Every
    later read of a file under ``uri`` is checked against that manifest."""
    manifest_uri = join(uri, SUCCESS)
    try:
        data = raw_get(manifest_uri)
    except FileNotFoundError:
        raise MissingInputError(
            f"input {uri} has no {SUCCESS}: the stage that writes it has not finished (or failed)"
        ) from None
    manifest = parse_manifest(data, manifest_uri, stages.accepted_inputs(stage) or None)
    _check_listing(uri, manifest)
    tracking.expect_files(uri, manifest_uri, ((f["path"], f["size"], f["sha256"]) for f in manifest["files"]))
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sizes(uri: str) -> dict[str, int]:
    """rel path -> size of every file under a stage directory, from one listing."""
    if is_s3(uri):
        return {
            o["Rel"]: int(o["Size"])
            for o in s3_objects(uri)
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
