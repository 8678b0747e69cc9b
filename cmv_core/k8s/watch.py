"""Watching a run: following its pods' logs, waiting for a stage's Job, and whether each stage is done.

A stage is done only when its ``_SUCCESS`` is the output of this run's settings and of its upstream outputs
as they are now (:func:`manifest_mismatch`), or, when the store cannot be reached from here, when its Job
completed with the same settings hash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cmv_core.k8s.api import Cluster, job_pods, job_state, read_job
from cmv_core.k8s.names import K8sError
from cmv_core.k8s.render import Plan
from cmv_core.k8s.settings import job_settings_hash, json_safe

log = logging.getLogger(__name__)


def _parse_log_line(raw: str) -> tuple[str, str]:
    """``<RFC3339Nano timestamp> <text>`` (timestamps=true) -> (timestamp, text)."""
    stamp, _, text = raw.partition(" ")
    return stamp, text


class LogStreamer:
    """Follows the logs of a Job's pods, one thread each, printing lines prefixed with the pod's name.

    A stream that breaks while the pod still runs (API server restart, load balancer idle timeout) is
    opened again from ``sinceTime`` = the last line's second; the lines of that second already printed
    (same timestamp and text) are dropped, so no line is lost or printed twice.
    """

    def __init__(
        self,
        cluster: Cluster,
        out: Callable[[str], None],
        container: str = "main",
        reconnects: int = 20,
        retry_s: float = 1.0,
    ):
        self.cluster, self.out, self.container = cluster, out, container
        self.reconnects, self.retry_s = reconnects, retry_s
        self.threads: dict[str, threading.Thread] = {}

    def follow(self, pods: list[Any]) -> None:
        for pod in pods:
            name = pod.metadata.name
            started = pod.status.phase in ("Running", "Succeeded", "Failed")
            if started and name not in self.threads:
                thread = threading.Thread(target=self._stream, args=(name,), daemon=True)
                self.threads[name] = thread
                thread.start()

    def _open(self, pod: str, since: str | None) -> Any:
        query = [("container", self.container), ("follow", "true"), ("timestamps", "true")]
        if since:
            query.append(("sinceTime", since))  # not a parameter of the generated read_namespaced_pod_log
        return self.cluster.core.api_client.call_api(
            "/api/v1/namespaces/{namespace}/pods/{name}/log",
            "GET",
            path_params={"namespace": self.cluster.namespace, "name": pod},
            query_params=query,
            header_params={"Accept": "*/*"},
            auth_settings=["BearerToken"],
            _preload_content=False,
        )

    def _pod_running(self, pod: str) -> bool:
        try:
            phase = self.cluster.core.read_namespaced_pod(pod, self.cluster.namespace).status.phase
        except Exception:
            return False
        return phase in ("Pending", "Running")

    def _stream(self, pod: str) -> None:
        since: str | None = None
        seen: set[tuple[str, str]] = set()  # lines of the second `since` (sent again after a reconnect)
        for attempt in range(self.reconnects + 1):
            ended = False
            try:
                resp = self._open(pod, since)
                pending = b""
                for chunk in resp.stream(amt=65536, decode_content=True):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        stamp, text = _parse_log_line(raw.decode("utf-8", errors="replace"))
                        if (stamp, text) in seen:
                            continue
                        second = stamp[:19]
                        if since is None or second != since[:19]:
                            seen = set()
                            since = second + "Z"
                        seen.add((stamp, text))
                        self.out(f"[{pod}] {text}")
                ended = True
            except Exception as exc:  # a broken stream: reconnect below while the pod runs
                log.warning(
                    "log stream of %s broke (%s: %s); reconnecting from %s",
                    pod,
                    type(exc).__name__,
                    exc,
                    since or "the start",
                )
            if ended and not self._pod_running(pod):
                return
            if attempt < self.reconnects:
                time.sleep(self.retry_s)
        log.warning("gave up following the log of %s after %d reconnects", pod, self.reconnects)

    def join(self, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def tail_logs(cluster: Cluster, pod: str, lines: int, container: str = "main") -> str:
    try:
        # Raw bytes: the client's own decoding of a text/plain body is unreliable across versions.
        resp = cluster.core.read_namespaced_pod_log(
            pod, cluster.namespace, container=container, tail_lines=lines, _preload_content=False
        )
        return resp.data.decode("utf-8", errors="replace")
    except Exception as exc:
        return f"(no log: {exc})"


def wait_for_job(
    cluster: Cluster,
    name: str,
    *,
    poll_s: float = 5,
    timeout_s: float = 0,
    streamer: LogStreamer | None = None,
    kind: str = "Job",
) -> Any:
    """Wait until the Job succeeds or fails (or timeout_s, when > 0); stream its pods' logs meanwhile."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    last = None
    while True:
        job = read_job(cluster, name, kind)
        if job is None:
            raise K8sError(f"{kind} {name} disappeared while waiting for it (deleted by someone?)")
        state = job_state(job)
        if streamer is not None:
            streamer.follow(job_pods(cluster, name, kind))
        if state != last:
            log.info("%s %s: %s", kind, name, state)
            last = state
        if state in ("succeeded", "failed"):
            if streamer is not None:
                streamer.join()
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise K8sError(f"Job {name} still {state} after {timeout_s:.0f} s (left running)")
        time.sleep(poll_s)


# ---------------------------------------------------------------- stage status


def read_manifest(uri: str) -> tuple[bool | None, dict | None]:
    """(whether ``uri/_SUCCESS`` exists, its content); (None, None) when the store cannot be reached from here."""
    import json

    from cmv_core import storage

    try:
        return True, json.loads(storage.read_bytes(storage.join(uri, storage.SUCCESS)))
    except FileNotFoundError:
        return False, None
    except Exception as exc:
        log.warning("cannot check %s from here (%s: %s); relying on the Jobs' status", uri, type(exc).__name__, exc)
        return None, None


def _config_differences(wanted: Any, recorded: Any, where: str) -> list[str]:
    """The keys the recipe sets whose value the manifest's resolved config does not have."""
    if isinstance(wanted, dict) and isinstance(recorded, dict):
        out = []
        for key, value in wanted.items():
            if key in recorded:
                out += _config_differences(value, recorded[key], f"{where}.{key}" if where else str(key))
        return out
    if isinstance(recorded, dict):  # a name the stage resolved into a structure (train.deepspeed: zero2)
        return []
    wanted, recorded = json_safe(wanted), json_safe(recorded)
    same = wanted == recorded or (isinstance(wanted, list) and isinstance(recorded, list) and wanted == recorded)
    return [] if same else [f"{where}: {recorded!r} -> {wanted!r}"]


def manifest_mismatch(run: Plan, stage: str, manifest: dict, recipe: dict | None = None) -> str | None:
    """Why the stage's ``_SUCCESS`` manifest is not the output of this run's settings; None when it is.

    Its inputs must be this run's upstream outputs as they are now (the digest of each upstream
    ``_SUCCESS``), and every value the recipe sets for the stage (and the model) must be the resolved config
    it recorded. A raw input is compared by URI only (its fingerprint needs a listing of the dump).
    """
    import hashlib

    from cmv_core import storage

    written_as = "train" if stage == "dpo" else stage  # `cmv train --method dpo` writes a train manifest
    if manifest.get("stage") not in (None, written_as):
        return f"it is the manifest of stage {manifest.get('stage')!r}"
    config = manifest.get("config") or {}
    if stage == "dpo" and config.get("method") != "dpo":
        return "it is not a DPO output (its config has no method: dpo)"
    recorded = {i.get("uri"): i.get("digest", "") for i in manifest.get("inputs") or []}
    expected = [run.stage_uri(u) for u in run.upstream(stage)] or [run.settings.get("RAW_INPUT", "")]
    for uri in expected:
        if uri not in recorded:
            return f"it was made from {', '.join(sorted(map(str, recorded))) or 'no inputs'}, not {uri}"
    for uri, digest in recorded.items():
        if str(digest).startswith("sha256:"):
            try:
                now = "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(uri, storage.SUCCESS))).hexdigest()
            except FileNotFoundError:
                return f"its input {uri} has no {storage.SUCCESS} any more"
            if now != digest:
                return f"its input {uri} changed since (another {storage.SUCCESS} there now)"
    model = run.settings.get("CMV_MODEL")
    # {"<stage>": {...}, "model": base model} (format, train); a flat config's "model" is the stage's own (judge);
    # dpo: {"train": {...}, "model": the SFT model it trained on, "base_model": the base model}
    nested = isinstance(config.get(written_as), dict)
    base = config.get("base_model" if stage == "dpo" else "model")
    if model and nested and isinstance(base, str) and base != model:
        return f"config changed: model: {base!r} -> {model!r}"
    wanted = recipe.get(stage) if recipe is not None else None
    if stage == "dpo" and isinstance(wanted, dict):
        from cmv_core.stages import dpo_over_train

        wanted = dpo_over_train(recipe)
    if isinstance(wanted, dict):
        section = config[written_as] if nested else config
        diffs = _config_differences(wanted, section, stage)
        if diffs:
            return "config changed: " + "; ".join(diffs[:4]) + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else "")
    return None


@dataclass
class StageStatus:
    stage: str
    job: str
    state: str  # absent, pending, running, succeeded, failed
    success: bool | None  # _SUCCESS in the artifact store (None: not checked / unreachable)
    pods: str = ""
    stale: str | None = None  # why the _SUCCESS (or the completed Job) is not this run's settings' output
    same_settings: bool | None = None  # the existing Job's settings hash is ours (None: no Job)

    @property
    def done(self) -> bool:
        if self.stale:
            return False
        if self.success is not None:
            return self.success
        return self.state == "succeeded" and bool(self.same_settings)


def stage_status(cluster: Cluster, run: Plan, stage: str, check_store: bool = True) -> StageStatus:
    wanted = run.job(stage)
    name = wanted["metadata"]["name"]
    job = read_job(cluster, name, wanted["kind"])
    pods, same = "", None
    if job is not None:
        s = job.status
        pods = f"active {s.active or 0}, succeeded {s.succeeded or 0}, failed {s.failed or 0}"
        same = job_settings_hash(job) == job_settings_hash(wanted)
    success, manifest = read_manifest(run.stage_uri(stage)) if check_store else (None, None)
    stale = None
    if manifest is not None:
        try:
            stale = manifest_mismatch(run, stage, manifest, run.recipe)
        except Exception as exc:  # an upstream unreadable from here: the stage's own check decides
            stale = f"its inputs cannot be compared from here ({type(exc).__name__}: {exc})"
    elif success is None and job is not None and job_state(job) == "succeeded" and not same:
        stale = "its Job completed with other settings"
    return StageStatus(stage, name, job_state(job), success, pods, stale, same)
