"""The hand-off contract between stages (docs/ARCHITECTURE.md, "Artifacts and the hand-off contract").

The contract is checked, not just written:
- verified hand-off: ``begin_stage`` reads each input's ``_SUCCESS`` (refusing an empty, unparsable or
  wrong-stage one) and every later read of a file under that input (``open_read``, ``read_*``,
  ``download_dir``) is hashed while it streams and checked against the size and sha256 the manifest lists;
  a raw dump's fingerprint is its content (digests.py);
- complete, exclusive outputs: ``begin_stage`` takes the output's lease (lease.py) and gives the attempt an
  id; every file written through the store under the output is recorded (size, sha256 computed while
  writing, the attempt id in its S3 metadata); ``finish_stage`` writes ``_SUCCESS`` only when the output
  holds exactly the files the stage declares (``cmv_core.stages``) and each required one is the one this
  attempt wrote.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from cmv_core import stages
from cmv_core.errors import OutputError
from cmv_core.storage import digests, lease, tracking
from cmv_core.storage.digests import RawDigest
from cmv_core.storage.io import delete, list_files, raw_get, sha256, size, sweep_tmp, write_json
from cmv_core.storage.manifests import (
    ManifestError,
    git_revision,
    input_digest,
    now,
    package_version,
    parse_manifest,
)
from cmv_core.storage.s3 import s3_client
from cmv_core.storage.uris import SUCCESS, check_run_id, check_uri, file_key, is_s3, join, local_path, split_s3

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    stage: str
    run_id: str
    output: str
    inputs: dict[str, str | None]  # uri -> digest; None: a raw input fingerprinted while it streams
    config: dict
    started_at: str = field(default_factory=now)
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    # rel path -> size, sha256 and (local) the file's identity right after this attempt published it
    written: dict[str, dict] = field(default_factory=dict)
    read_digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    lease: Any = None


_RUNS: dict[str, StageRun] = {}  # output key -> the attempt writing it in this process


def infer_run_id(output: str) -> str:
    """``<root>/<run_id>/<stage>`` -> ``run_id``."""
    parts = [p for p in str(output).rstrip("/").split("/") if p]
    return parts[-2] if len(parts) >= 2 else "local"


def record_raw_digest(run: StageRun, uri: str, digest: RawDigest) -> None:
    """A raw input file's digest, hashed by the stage while it streamed it (taken by finish_stage)."""
    if not digest.broken and not is_s3(uri):
        run.read_digests[file_key(uri)] = (digest.size, digest.hexdigest())


# ---------------------------------------------------------------- begin


def _input_digests(stage: str, inputs: list[str], raw_inputs: bool) -> dict[str, str | None]:
    """uri -> its digest: a stage input's manifest digest (verifying it), a raw input's fingerprint on S3,
    None for a local raw input (fingerprinted while the stage streams it)."""
    return {
        str(u): (
            None
            if raw_inputs and not is_s3(str(u))
            else digests.raw_fingerprint(str(u))
            if raw_inputs
            else input_digest(str(u), stage)
        )
        for u in inputs
    }


def _done_already(run: StageRun, force: bool) -> bool:
    """True when the output holds a ``_SUCCESS`` for the same stage, inputs and config (skip the run);
    otherwise any ``_SUCCESS`` there is deleted."""
    stage = run.stage
    success_uri = join(run.output, SUCCESS)
    try:
        existing = parse_manifest(raw_get(success_uri), success_uri, stage)
    except FileNotFoundError:
        return False
    except ManifestError as exc:
        log.warning("%s: %s; rerunning", stage, exc)
        existing = {}
    # Only a skip needs the raw inputs' fingerprints now (reading the whole dump once more); a run
    # takes them while it streams. So none with --force, nor once the stage or config differ.
    same = not force and existing.get("stage") == stage and existing.get("config") == run.config
    if same:
        current = {u: d if d is not None else digests.raw_fingerprint(u) for u, d in run.inputs.items()}
        same = {i["uri"]: i["digest"] for i in existing.get("inputs", [])} == current
    if same:
        log.info("%s: skipped, %s matches its inputs and config (use --force to rerun)", stage, success_uri)
        return True
    log.info("%s: %s", stage, "forced rerun" if force else "inputs or config changed, rerunning")
    delete(success_uri)
    return False


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
    output = check_uri(str(output))
    if run_id is not None:
        check_run_id(run_id)
    for u in inputs:
        check_uri(str(u))
    input_digests = _input_digests(stage, inputs, raw_inputs)
    config = json.loads(json.dumps(config, default=str))
    run = StageRun(
        stage=stage, run_id=run_id or infer_run_id(output), output=output, inputs=input_digests, config=config
    )
    run.lease = lease.acquire(output, run.attempt)
    try:
        tracking.forget_expected(output)
        if _done_already(run, force):
            run.lease.release()
            return None
        swept = sweep_tmp(output)
        if swept:
            log.info("%s: removed %d temp file(s) a dead attempt left in %s", stage, swept, output)
    except BaseException:
        run.lease.release()
        raise
    _RUNS[file_key(output)] = run
    tracking.track_writes(output, run.attempt, run.written)
    log.info("%s: attempt %s writes %s", stage, run.attempt, output)
    return run


# ---------------------------------------------------------------- abort


def _stop_tracking(run: StageRun) -> None:
    """Files written under the output from now on are not this attempt's (its ``_SUCCESS``, a later run's)."""
    _RUNS.pop(file_key(run.output), None)
    tracking.untrack_writes(run.output)


def abort_stage(run: StageRun, failed: bool = False) -> None:
    """Give up an attempt: release its lease (no _SUCCESS is written). A failed attempt's incomplete
    multipart uploads are aborted first (boto3 aborts its own when a part fails, but that call may have
    failed in the same outage); each call rides out the retry budget, so a store that comes back within
    it is left clean and its lease free for the rerun (README, "Inputs and outputs")."""
    _stop_tracking(run)
    if failed and is_s3(run.output):
        try:
            n = sweep_tmp(run.output)
            if n:
                log.info("%s: aborted %d incomplete multipart upload(s) under %s", run.stage, n, run.output)
        except Exception as exc:  # noqa: BLE001 - the store is still away; the next attempt sweeps them
            log.warning("%s: could not abort the incomplete uploads under %s: %s", run.stage, run.output, exc)
    if run.lease is not None:
        run.lease.release()


def release_all() -> None:
    """Release every lease this process still holds (the CLI calls it on the way out: each is a failed
    or stopped attempt's, since a finished one released its own)."""
    for run in list(_RUNS.values()):
        abort_stage(run, failed=True)


# ---------------------------------------------------------------- finish


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(rel, p) for p in patterns)


def _still_ours(run: StageRun, rel: str, entry: dict) -> str | None:
    """Why the file at ``rel`` is not the one this attempt wrote, or None."""
    uri = join(run.output, rel)
    if is_s3(uri):
        bucket, key = split_s3(uri)
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
        if tracking.identity(local_path(uri)) != entry["identity"]:
            return "replaced or changed after this attempt wrote it"
    except FileNotFoundError:
        return "written by this attempt but no longer there"
    return None


def _undeclared(run: StageRun, present: list[str], required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    """What the output lacks of the stage's declared files, and what it holds that none declares."""
    problems = []
    missing = [p for p in required if not any(fnmatchcase(rel, p) for rel in present)]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    foreign = [rel for rel in present if not _matches(rel, required + optional)]
    if foreign:
        problems.append(
            f"not declared by stage {run.stage}: {', '.join(foreign[:10])}"
            + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        )
    return problems


def _output_files(
    run: StageRun, required: tuple[str, ...], optional: tuple[str, ...], strict: bool
) -> tuple[list[dict], list[str]]:
    """The manifest's file list, and why the output is not exactly what this attempt wrote (if it is not)."""
    present = [rel for rel in list_files(run.output) if rel != SUCCESS]
    problems = _undeclared(run, present, required, optional) if strict else []
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
    return files, problems


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
    files, problems = _output_files(run, tuple(required or ()), tuple(optional), strict)
    if problems:
        abort_stage(run, failed=True)
        raise OutputError(
            f"{run.output}: no {SUCCESS} written, the output is not exactly what attempt "
            f"{run.attempt} of stage {run.stage} wrote: {'; '.join(problems)}. Rerun the stage"
        )
    if run.lease is not None:
        run.lease.check()
    # raw inputs: the fingerprint taken while the stage streamed them (files it did not read are hashed now)
    inputs = {u: d if d is not None else digests.raw_fingerprint(u, run.read_digests) for u, d in run.inputs.items()}
    manifest = {
        "stage": run.stage,
        "run_id": run.run_id,
        "attempt": run.attempt,
        "inputs": [{"uri": u, "digest": d} for u, d in inputs.items()],
        "config": run.config,
        "package_version": package_version(),
        "git_revision": git_revision(),
        "started_at": run.started_at,
        "finished_at": now(),
        "files": files,
        "summary": summary,
    }
    _stop_tracking(run)
    try:
        write_json(join(run.output, SUCCESS), manifest)
    finally:
        abort_stage(run)
    return manifest
