"""A small fake Kubernetes API server on loopback, for testing ``cmv k8s submit|status``.

It implements only what the submitter uses, with real HTTP and JSON so that the
real ``kubernetes`` client (pointed at it through a kubeconfig) talks to it:

- POST   /api/v1/namespaces/{ns}/configmaps | services        create (409 if the name exists)
- POST   /apis/batch/v1/namespaces/{ns}/jobs                    create a Job, and its pods
- GET    /apis/batch/v1/namespaces/{ns}/jobs/{name}             the Job with a status that follows its script
- DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}             delete it and its pods
- GET    /api/v1/namespaces/{ns}/pods?labelSelector=k=v         list pods by label
- GET    /api/v1/namespaces/{ns}/pods/{name}                     one pod
- GET    /api/v1/namespaces/{ns}/pods/{name}/log                 the pod's log (tailLines, timestamps, sinceTime;
                                                                  follow waits for the end)
- GET    /version

Fault injection, the way real API servers fail:

- ``faults``: a list of :class:`Fault` (method, path pattern, status, times): the next matching requests
  answer that status (503, 429, 500...) instead of being served;
- ``drop_log_after``: a pod log stream with ``follow`` sends that many lines, then the connection breaks
  (once per pod); the rest is only had by reconnecting (``sinceTime``);
- Foreground deletion: the Job stays (with ``deletionTimestamp``) until its pods are gone,
  ``delete_delay_s`` later, as the garbage collector does.

Each Job runs a script chosen by its ``cmv.io/stage`` label (:class:`Script`):
its pods are Running for ``run_s`` seconds, then Succeeded (exit 0) or Failed,
and print ``log`` lines (``{index}`` becomes the pod's completion index). A script with ``pods`` (a list of
:class:`fake_k8s_pods.PodRun`) instead runs one pod after another, each failed pod judged by the Job's own
``podFailurePolicy`` and ``backoffLimit`` (tests/fake_k8s_pods.py). ``on_success(job)`` lets a test
write the stage's ``_SUCCESS`` the way the real stage would. Every request is recorded in
``calls`` with a monotonic timestamp, for order and waiting assertions.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import fake_k8s_pods


@dataclass
class Script:
    succeed: bool = True
    run_s: float = 0.3
    log: list[str] = field(default_factory=lambda: ["working", "done"])
    exit_code: int = 1
    # One pod at a time, each ending as listed (then success), judged by the Job's podFailurePolicy (one completion).
    pods: list[fake_k8s_pods.PodRun] | None = None
    # A Job applied by hand before the submitter looks: its run starts at the first GET of it, so the
    # submitter finds it running however long its own rendering took on a loaded machine.
    start_when_read: bool = False


@dataclass
class Fault:
    method: str
    path: str  # a regular expression searched in the request path
    status: int = 503
    times: int = 1


@dataclass
class Call:
    t: float
    method: str
    path: str
    kind: str = ""
    name: str = ""


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeK8s:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.on_success: Callable[[dict], None] | None = None
        self.objects: dict[tuple[str, str, str], dict] = {}  # (kind, namespace, name) -> object
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod record
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.injected: list[tuple[str, str, int]] = []  # (method, path, status) of every fault served
        self.drop_log_after: int | None = None
        self.dropped: list[str] = []  # pods whose log stream was broken
        self.delete_delay_s = 0.3
        self.delete_bodies: list[dict] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------ queries for tests

    def created(self, kind: str | None = None) -> list[tuple[str, str]]:
        return [(c.kind, c.name) for c in self.calls if c.method == "POST" and (kind is None or c.kind == kind)]

    def created_at(self, kind: str, name: str) -> float:
        return next(c.t for c in self.calls if c.method == "POST" and c.kind == kind and c.name == name)

    def deleted(self) -> list[str]:
        return [c.name for c in self.calls if c.method == "DELETE"]

    def job_pods_of(self, job_name: str) -> list[str]:
        return [name for (_, name), p in self.pods.items() if p["_job"]["metadata"]["name"] == job_name]

    def finished_at(self, job_name: str) -> float:
        job = self.objects[("Job", "cmv-test", job_name)]
        return job["_created"] + self._script(job).run_s

    # ------------------------------------------------------------ simulation

    def _script(self, job: dict) -> Script:
        """The script a Job got when it was created (changing ``scripts`` later affects new Jobs only)."""
        if "_script" not in job:
            stage = job["metadata"].get("labels", {}).get("cmv.io/stage", "")
            job["_script"] = self.scripts.get(stage, Script())
        return job["_script"]

    def _job_view(self, job: dict) -> dict:
        """The Job as the API returns it, its status computed from its script and the clock."""
        script = self._script(job)
        completions = self._job_spec(job).get("completions") or 1
        elapsed = time.monotonic() - job["_created"]
        if job.get("kind") == "JobSet":
            return self._jobset_view(job, script, elapsed)
        if script.pods is not None:
            view = {k: v for k, v in job.items() if not k.startswith("_")}
            fate = self._advance(job)
            view["status"] = fake_k8s_pods.job_status(fate, job["metadata"]["creationTimestamp"])
            if fate.state == "succeeded" and not job.get("_success_called"):
                job["_success_called"] = True
                if self.on_success:
                    self.on_success(job)
            return view
        status: dict = {"startTime": job["metadata"]["creationTimestamp"]}
        if elapsed < script.run_s:
            status.update(active=completions, ready=completions)
        elif script.succeed:
            status.update(
                succeeded=completions,
                completionTime=_now_iso(),
                conditions=[
                    {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"},
                    {"type": "Complete", "status": "True", "reason": "CompletionsReached"},
                ],
            )
            if not job.get("_success_called"):
                job["_success_called"] = True
                if self.on_success:
                    self.on_success(job)
        else:
            status.update(
                failed=completions,
                conditions=[
                    {
                        "type": "FailureTarget",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    },
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    },
                ],
            )
        view = {k: v for k, v in job.items() if not k.startswith("_")}
        view["status"] = status
        return view

    def _jobset_view(self, job: dict, script: Script, elapsed: float) -> dict:
        rjob = job["spec"]["replicatedJobs"][0]["name"]
        if elapsed < script.run_s:
            status = {
                "replicatedJobsStatus": [
                    {"name": rjob, "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}
                ]
            }
        elif script.succeed:
            status = {
                "conditions": [
                    {
                        "type": "Completed",
                        "status": "True",
                        "reason": "AllJobsCompleted",
                        "message": "jobset completed successfully",
                    }
                ],
                "replicatedJobsStatus": [
                    {"name": rjob, "active": 0, "ready": 0, "succeeded": 1, "failed": 0, "suspended": 0}
                ],
            }
            if not job.get("_success_called"):
                job["_success_called"] = True
                if self.on_success:
                    self.on_success(job)
        else:
            status = {
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "FailedJobs",
                        "message": "jobset failed due to reaching max number of restarts",
                    }
                ],
                "replicatedJobsStatus": [
                    {"name": rjob, "active": 0, "ready": 0, "succeeded": 0, "failed": 1, "suspended": 0}
                ],
            }
        view = {k: v for k, v in job.items() if not k.startswith("_")}
        view["status"] = status
        return view

    def _advance(self, job: dict) -> fake_k8s_pods.Fate:
        """A Job with ``pods``: its fate by now, and a pod record for each pod started so far."""
        script, ns = self._script(job), job["metadata"]["namespace"]
        finished = int((time.monotonic() - job["_created"]) // script.run_s)
        names = job.setdefault("_pod_names", [])
        while True:
            fate = fake_k8s_pods.fate(self._job_spec(job), script.pods, min(finished, len(names)), ns, names)
            if len(names) >= fate.started:
                return fate
            k = len(names)
            names.append(f"{job['metadata']['name']}-0-{len(self.pods):05d}")
            run = script.pods[k] if k < len(script.pods) else fake_k8s_pods.PodRun()
            labels = {**self._job_spec(job)["template"]["metadata"].get("labels", {})}
            labels.update(
                {"batch.kubernetes.io/job-name": job["metadata"]["name"], "job-name": job["metadata"]["name"]}
            )
            self.pods[(ns, names[-1])] = {
                "metadata": {"name": names[-1], "namespace": ns, "labels": labels, "creationTimestamp": _now_iso()},
                "_job": job,
                "_index": 0,
                "_run": run,
                "_start": job["_created"] + k * script.run_s,
                "_started": dt.datetime.now(dt.UTC).replace(microsecond=0),
            }

    def _pod_end(self, pod: dict) -> float:
        return pod.get("_start", pod["_job"]["_created"]) + self._script(pod["_job"]).run_s

    def _pod_view(self, pod: dict) -> dict:
        job = pod["_job"]
        script = self._script(job)
        elapsed = time.monotonic() - job["_created"]
        conditions: list[dict] = []
        if "_run" in pod:
            phase, state, conditions = fake_k8s_pods.pod_status(pod["_run"], time.monotonic() < self._pod_end(pod))
        elif elapsed < script.run_s:
            phase, state = "Running", {"running": {"startedAt": pod["metadata"]["creationTimestamp"]}}
        else:
            code = 0 if script.succeed else script.exit_code
            phase = "Succeeded" if script.succeed else "Failed"
            state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {k: v for k, v in pod["metadata"].items()},
            "spec": {"containers": [{"name": "main", "image": "fake"}], "restartPolicy": "Never"},
            "status": {
                "phase": phase,
                "conditions": conditions,
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": "fake",
                        "imageID": "",
                        "ready": phase == "Running",
                        "restartCount": 0,
                        "state": state,
                    }
                ],
            },
        }

    @staticmethod
    def _job_spec(job: dict) -> dict:
        """The (first) Job spec of a Job or a JobSet."""
        return job["spec"]["replicatedJobs"][0]["template"]["spec"] if job.get("kind") == "JobSet" else job["spec"]

    def _create_job(self, ns: str, job: dict) -> None:
        job["_created"] = time.monotonic()
        self._script(job)
        job["metadata"]["creationTimestamp"] = _now_iso()
        job["metadata"]["uid"] = f"uid-{len(self.objects)}"
        name = job["metadata"]["name"]
        if job.get("kind") != "JobSet" and self._script(job).pods is not None:
            assert (self._job_spec(job).get("completions") or 1) == 1, "Script.pods simulates one-pod Jobs"
            self._advance(job)  # its first pod
            return
        spec = self._job_spec(job)
        template_labels = dict(spec["template"]["metadata"].get("labels", {}))
        for index in range(spec.get("completions") or 1):
            if job.get("kind") == "JobSet":  # <jobset>-<replicated job>-<job index>-<pod index>
                rjob = job["spec"]["replicatedJobs"][0]["name"]
                pod_name = f"{name}-{rjob}-0-{index}-{len(self.pods):05d}"
                labels = {
                    **template_labels,
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "batch.kubernetes.io/job-name": f"{name}-{rjob}-0",
                    "batch.kubernetes.io/job-completion-index": str(index),
                }
            else:
                pod_name = f"{name}-{index}-{len(self.pods):05d}"
                labels = {
                    **template_labels,
                    "batch.kubernetes.io/job-name": name,
                    "job-name": name,
                    "batch.kubernetes.io/job-completion-index": str(index),
                }
            self.pods[(ns, pod_name)] = {
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": labels,
                    "creationTimestamp": job["metadata"]["creationTimestamp"],
                },
                "_job": job,
                "_index": index,
                "_started": dt.datetime.now(dt.UTC).replace(microsecond=0),
            }

    def _log(self, pod: dict) -> list[str]:
        script = self._script(pod["_job"])
        run = pod.get("_run")
        lines = run.log if run is not None and run.log is not None else script.log
        return [line.replace("{index}", str(pod["_index"])) for line in lines]

    def _log_stamps(self, pod: dict) -> list[str]:
        """One RFC3339Nano timestamp per line: a few lines per second, so that a second holds several."""
        base = pod["_started"]
        return [
            (base + dt.timedelta(microseconds=250_000 * i + 7)).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
            for i in range(len(self._log(pod)))
        ]

    # ------------------------------------------------------------ HTTP

    def _reap(self) -> None:
        """The garbage collector: pods of deleted Jobs go delete_delay_s later; a Foreground-deleted Job after them."""
        now = time.monotonic()
        for job in [p["_job"] for p in self.pods.values() if "_run" in p]:  # later pods of a Job with pods
            if "_deleting_at" not in job:
                self._advance(job)
        for key, pod in list(self.pods.items()):
            job = pod["_job"]
            since = pod.get("_deleting_at", job.get("_deleting_at"))
            if since is not None and now - since >= self.delete_delay_s:
                del self.pods[key]
        for key, obj in list(self.objects.items()):
            if (
                key[0] in ("Job", "JobSet")
                and "_deleting_at" in obj
                and not any(p["_job"] is obj for p in self.pods.values())
            ):
                del self.objects[key]

    def _send(self, h: BaseHTTPRequestHandler, code: int, body, content_type: str = "application/json") -> None:
        data = (
            body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
        )
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _status(self, h, code: int, reason: str, message: str) -> None:
        self._send(
            h,
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""  # read every body (DELETE has options), keep-alive needs it
        body = json.loads(raw or b"{}")
        path = url.path
        with self.lock:
            self._reap()
            fault = next(
                (f for f in self.faults if f.times > 0 and f.method == method and re.search(f.path, path)), None
            )
            if fault is not None:
                fault.times -= 1
                self.injected.append((method, path, fault.status))
                self.calls.append(Call(time.monotonic(), method, path, "Fault", str(fault.status)))
        if fault is not None:
            return self._status(
                h,
                fault.status,
                "ServiceUnavailable" if fault.status == 503 else "InternalError",
                f"injected fault {fault.status}",
            )
        if path == "/version":  # the client asks once, to learn the server's version
            with self.lock:
                self.calls.append(Call(time.monotonic(), method, path))
            return self._send(h, 200, {"major": "1", "minor": "37", "gitVersion": "v1.37.0", "platform": "linux/amd64"})
        m = (
            re.fullmatch(r"/api/v1/namespaces/([^/]+)/(configmaps|services)", path)
            or re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/(jobs)", path)
            or re.fullmatch(r"/apis/jobset.x-k8s.io/v1alpha2/namespaces/([^/]+)/(jobsets)", path)
        )
        kinds = {"configmaps": "ConfigMap", "services": "Service", "jobs": "Job", "jobsets": "JobSet"}
        with self.lock:
            patched = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(configmaps|services)/([^/]+)", path)
            if patched and method == "PATCH":
                ns, plural, name = patched.groups()
                kind = kinds[plural]
                self.calls.append(Call(time.monotonic(), method, path, kind, name))
                obj = self.objects.get((kind, ns, name))
                if obj is None:
                    return self._status(h, 404, "NotFound", f'{plural} "{name}" not found')
                refs = obj["metadata"].setdefault("ownerReferences", [])
                for ref in (body.get("metadata") or {}).get("ownerReferences") or []:  # merged by uid
                    if ref["uid"] not in {r["uid"] for r in refs}:
                        refs.append(ref)
                return self._send(h, 200, obj)
            if m and method == "POST":
                ns, plural = m.groups()
                kind = kinds[plural]
                name = body["metadata"]["name"]
                self.calls.append(Call(time.monotonic(), method, path, kind, name))
                key = (kind, ns, name)
                if key in self.objects:
                    return self._status(h, 409, "AlreadyExists", f'{plural} "{name}" already exists')
                body["metadata"]["namespace"] = ns
                if kind in ("Job", "JobSet"):
                    body["kind"] = kind
                    self._create_job(ns, body)
                self.objects[key] = body
                view = self._job_view(body) if kind in ("Job", "JobSet") else body
                return self._send(h, 201, view)
            m = re.fullmatch(r"/apis/batch/v1/namespaces/([^/]+)/(jobs)/([^/]+)", path) or re.fullmatch(
                r"/apis/jobset.x-k8s.io/v1alpha2/namespaces/([^/]+)/(jobsets)/([^/]+)", path
            )
            if m:
                ns, plural, name = m.groups()
                kind = kinds[plural]
                self.calls.append(Call(time.monotonic(), method, path, kind, name))
                job = self.objects.get((kind, ns, name))
                if job is None:
                    return self._status(h, 404, "NotFound", f'{plural} "{name}" not found')
                if method == "GET":
                    if self._script(job).start_when_read and not job.get("_read"):
                        job["_read"] = True
                        job["_created"] = time.monotonic()
                    return self._send(h, 200, self._job_view(job))
                if method == "DELETE":
                    self.delete_bodies.append(body)
                    now = time.monotonic()
                    if body.get("propagationPolicy") == "Foreground":  # the Job goes after its pods
                        job.setdefault("_deleting_at", now)
                        job["metadata"]["deletionTimestamp"] = _now_iso()
                    else:  # Background/Orphan: the name is free now, the pods linger until collected
                        del self.objects[(kind, ns, name)]
                        for pod in self.pods.values():
                            if pod["_job"] is job:
                                pod.setdefault("_deleting_at", now)
                    return self._send(
                        h, 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
                    )
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
            if m and method == "GET":
                ns = m.group(1)
                self.calls.append(Call(time.monotonic(), method, path, "Pod", query.get("labelSelector", "")))
                want = dict(kv.split("=", 1) for kv in query.get("labelSelector", "").split(",") if kv)
                items = [
                    self._pod_view(p)
                    for (pns, _), p in self.pods.items()
                    if pns == ns and all(p["metadata"]["labels"].get(k) == v for k, v in want.items())
                ]
                return self._send(h, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)", path)
            if m and method == "GET":
                ns, name = m.groups()
                self.calls.append(Call(time.monotonic(), method, path, "Pod", name))
                pod = self.pods.get((ns, name))
                if pod is None:
                    return self._status(h, 404, "NotFound", f'pods "{name}" not found')
                return self._send(h, 200, self._pod_view(pod))
            m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
            if m and method == "GET":
                ns, name = m.groups()
                self.calls.append(Call(time.monotonic(), method, path, "PodLog", name))
                pod = self.pods.get((ns, name))
                if pod is None:
                    return self._status(h, 404, "NotFound", f'pods "{name}" not found')
                job = pod["_job"]
                follow = query.get("follow") == "true"
        if m and method == "GET" and path.endswith("/log"):
            lines = self._log(pod)
            if query.get("timestamps") == "true":
                lines = [f"{stamp} {line}" for stamp, line in zip(self._log_stamps(pod), lines)]
                if "sinceTime" in query:  # whole seconds, as the API server's sinceTime
                    lines = [ln for ln in lines if ln[:19] >= query["sinceTime"][:19]]
            if "tailLines" in query:
                lines = lines[-int(query["tailLines"]) :]
            body = "".join(line + "\n" for line in lines).encode()
            with self.lock:
                drop = follow and self.drop_log_after is not None and name not in self.dropped
                if drop:
                    self.dropped.append(name)
            if drop:  # headers promise the whole log; a few lines come, then the connection breaks
                h.send_response(200)
                h.send_header("Content-Type", "text/plain")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write("".join(line + "\n" for line in lines[: self.drop_log_after]).encode())
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return None
            if follow:  # like a real follow: the stream ends when the container does
                remaining = self._pod_end(pod) - time.monotonic()
                time.sleep(max(0.0, min(remaining, 30)))
            return self._send(h, 200, body, "text/plain")
        m = re.fullmatch(
            r"/apis/argoproj.io/v1alpha1/namespaces/([^/]+)/(workflowtemplates|workflows)(?:/([^/]+))?", path
        )
        if m:  # Argo's objects: stored, no controller behind them
            ns, plural, name = m.groups()
            kind = {"workflowtemplates": "WorkflowTemplate", "workflows": "Workflow"}[plural]
            with self.lock:
                if method == "POST" and name is None:
                    name = body["metadata"].get("name") or body["metadata"]["generateName"] + f"{len(self.calls):05d}"
                    body["metadata"]["name"] = name
                self.calls.append(Call(time.monotonic(), method, path, kind, name or ""))
                key = (kind, ns, name)
                if method == "POST":
                    if key in self.objects:
                        return self._status(h, 409, "AlreadyExists", f'{plural} "{name}" already exists')
                    body["metadata"]["resourceVersion"] = "1"
                    self.objects[key] = body
                    return self._send(h, 201, body)
                if key not in self.objects:
                    return self._status(h, 404, "NotFound", f'{plural} "{name}" not found')
                if method == "GET":
                    return self._send(h, 200, self.objects[key])
                if method == "PUT":
                    body["metadata"]["resourceVersion"] = str(int(self.objects[key]["metadata"]["resourceVersion"]) + 1)
                    self.objects[key] = body
                    return self._send(h, 200, body)
        with self.lock:
            self.calls.append(Call(time.monotonic(), method, path))
        return self._status(h, 404, "NotFound", f"fake API does not implement {method} {path}")


def kubeconfig(server: str, namespace: str = "cmv-test") -> str:
    """A kubeconfig (YAML text) whose current context points at the fake server."""
    return f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
users:
- name: fake
  user:
    token: fake-token
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: {namespace}
current-context: fake
"""
