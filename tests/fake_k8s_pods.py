"""Pod failures for the fake Kubernetes API (tests/fake_k8s_api.py), judged by the Job's own rules.

A :class:`~fake_k8s_api.Script` with ``pods`` runs its Job one pod at a time, as the Job controller
does with ``podReplacementPolicy: Failed``: pod k runs ``run_s`` seconds, ends as ``pods[k]`` says
(pods past the list succeed), and the next one starts when it has ended. Each failed pod is judged by
the ``podFailurePolicy`` rules and the ``backoffLimit`` of the Job the submitter POSTed (the rendered
manifest), the way the Job controller judges it (first matching rule wins; no match counts):

- ``Ignore``: not counted against ``backoffLimit``, a replacement pod starts;
- ``FailJob``: the Job fails at once (reason ``PodFailurePolicy``), no replacement;
- ``Count`` or no rule: counted; the Job fails (``BackoffLimitExceeded``) once more than ``backoffLimit``
  pods have been counted.

So a test changes nothing here when the manifests change: the fake applies whatever rules they have.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PodRun:
    """How one pod of a Job ends: its main container's exit code, and whether the node was drained or
    preempted (the pod then carries a ``DisruptionTarget`` condition, as the eviction API sets it)."""

    exit_code: int = 0
    disrupted: bool = False
    log: list[str] | None = None  # None: the Job script's log

    @property
    def failed(self) -> bool:
        return self.disrupted or self.exit_code != 0


@dataclass
class Fate:
    """The Job's state at some moment: how many pods have started, which rule decided, its condition."""

    state: str  # running, succeeded, failed
    started: int  # pods created so far
    counted: int  # failed pods counted against backoffLimit
    ignored: int  # failed pods an Ignore rule let go
    reason: str = ""
    message: str = ""


def matching_rule(rules: list[dict], run: PodRun) -> tuple[int, str] | None:
    """(index, action) of the first podFailurePolicy rule that matches the failed pod, else None."""
    for index, rule in enumerate(rules):
        codes = rule.get("onExitCodes")
        if codes is not None:
            if codes.get("containerName") not in (None, "main"):
                continue
            values = set(codes.get("values") or [])
            if codes["operator"] == "In":
                hit = run.exit_code in values
            else:  # NotIn: exit 0 never matches
                hit = run.exit_code != 0 and run.exit_code not in values
        else:
            hit = run.disrupted and any(
                c.get("type") == "DisruptionTarget" and c.get("status", "True") == "True"
                for c in rule.get("onPodConditions") or []
            )
        if hit:
            return index, rule["action"]
    return None


def fate(spec: dict, pods: list[PodRun], finished: int, namespace: str, pod_names: list[str]) -> Fate:
    """The Job after its first ``finished`` pods have ended, under ``spec``'s backoffLimit and podFailurePolicy."""
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    limit = spec.get("backoffLimit", 6)  # the Kubernetes default
    counted = ignored = 0
    for k in range(finished):
        run = pods[k] if k < len(pods) else PodRun()
        if not run.failed:
            return Fate("succeeded", k + 1, counted, ignored)
        match = matching_rule(rules, run)
        action = match[1] if match else "Count"
        if action == "Ignore":
            ignored += 1
            continue
        if action == "FailJob":
            why = "with condition DisruptionTarget" if run.disrupted else f"with exit code {run.exit_code}"
            pod = f"{namespace}/{pod_names[k]}"
            message = f"Container main for pod {pod} failed {why} matching FailJob rule at index {match[0]}"
            return Fate("failed", k + 1, counted + 1, ignored, "PodFailurePolicy", message)
        counted += 1
        if counted > limit:
            return Fate(
                "failed", k + 1, counted, ignored, "BackoffLimitExceeded", "Job has reached the specified backoff limit"
            )
    return Fate("running", finished + 1, counted, ignored)


def job_status(fate_: Fate, start_time: str) -> dict:
    """The Job's ``status`` as the API returns it for ``fate_``."""
    status: dict = {"startTime": start_time, "failed": fate_.counted}
    if fate_.state == "running":
        return {**status, "active": 1, "ready": 1}
    if fate_.state == "succeeded":
        conditions = [
            {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
            {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
        ]
        return {**status, "succeeded": 1, "conditions": conditions}
    conditions = [
        {"type": t, "status": "True", "reason": fate_.reason, "message": fate_.message}
        for t in ("FailureTarget", "Failed")
    ]
    return {**status, "conditions": conditions}


def pod_status(run: PodRun, running: bool) -> tuple[str, dict, list[dict]]:
    """(phase, container state, pod conditions) of one pod of a Job with ``pods``."""
    if running:
        return "Running", {"running": {}}, []
    phase = "Failed" if run.failed else "Succeeded"
    state = {"terminated": {"exitCode": run.exit_code, "reason": "Error" if run.exit_code else "Completed"}}
    conditions = (
        [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}] if run.disrupted else []
    )
    return phase, state, conditions
