"""An exclusive, expiring lease on a stage output: one live writer per output.

``<output>/_LEASE`` holds who writes the output (attempt id, host, pid, since,
until). Locally it is created with ``O_CREAT | O_EXCL``; on S3 with a
conditional PUT (``If-None-Match: *``), and taken over with ``If-Match`` on the
stale holder's ETag, so of two writers exactly one gets it. A heartbeat thread
pushes ``until`` forward every ttl/3; a killed writer's lease expires after
``CMV_LEASE_TTL_S`` seconds (default 60), or at once when the holder was a
process on this host that no longer exists. A holder on another host (a
killed pod whose Job started a new one) is watched until its lease expires:
renewed meanwhile, it is live and the second writer is refused; not renewed,
it is dead and the lease is taken over, so a restarted Job resumes by itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from cmv_core.errors import LeaseHeld
from cmv_core.storage.io import raw_get
from cmv_core.storage.s3 import s3_client
from cmv_core.storage.uris import LEASE, SUCCESS, is_s3, join, local_path, split_s3

log = logging.getLogger(__name__)


def ttl_s() -> float:
    return float(os.environ.get("CMV_LEASE_TTL_S", "60"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(holder: dict, now: float) -> bool:
    if not isinstance(holder, dict):
        return True
    if float(holder.get("until", 0)) < now:
        return True
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        # this process: its earlier attempt has ended (stages run one at a time in a process)
        return pid == os.getpid() or not _pid_alive(pid)
    return False


def describe(holder: dict) -> str:
    until = time.strftime("%H:%M:%S", time.gmtime(float(holder.get("until", 0))))
    return (
        f"attempt {holder.get('attempt')} (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"started {holder.get('since')}, lease until {until} UTC)"
    )


@dataclass
class Lease:
    output: str
    uri: str
    attempt: str
    ttl: float
    etag: str | None = None  # S3: the ETag of our lease object
    lost: str | None = None  # why the lease is no longer ours
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "attempt": self.attempt,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "until": now + self.ttl,
            }
        ).encode()

    def _renew(self) -> None:
        if is_s3(self.uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(self.uri)
            try:
                resp = s3_client().put_object(Bucket=bucket, Key=key, Body=self.body(), IfMatch=self.etag)
                self.etag = resp.get("ETag")
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    self.lost = "another writer took the lease over"
                raise
        else:
            path = local_path(self.uri)
            holder = json.loads(path.read_bytes())
            if holder.get("attempt") != self.attempt:
                self.lost = f"the lease is now held by {describe(holder)}"
                return
            tmp = path.with_name(f".{LEASE}.{self.attempt}.tmp")
            tmp.write_bytes(self.body())
            os.replace(tmp, path)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if self.lost:
                return
            try:
                self._renew()
            except Exception as exc:  # noqa: BLE001 - an outage: try again next beat
                log.debug("lease renewal of %s failed: %s", self.uri, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise LeaseHeld when the lease is no longer this attempt's (say it expired during an outage)."""
        holder = _read(self.uri)
        if self.lost or holder is None or holder.get("attempt") != self.attempt:
            who = describe(holder) if holder else "nobody"
            raise LeaseHeld(
                f"{self.output}: this attempt ({self.attempt}) lost its lease "
                f"({self.lost or 'now held by ' + who}); no {SUCCESS} written"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:  # on S3 each call rides out the retry budget (README, "Inputs and outputs")
            holder = _read(self.uri)
            if holder and holder.get("attempt") == self.attempt:
                if is_s3(self.uri):
                    bucket, key = split_s3(self.uri)
                    s3_client().delete_object(Bucket=bucket, Key=key)
                else:
                    local_path(self.uri).unlink()
        except Exception as exc:  # noqa: BLE001 - the store is away for good: the lease expires by itself
            log.warning("could not release the lease %s (%s); it expires after %.0f s", self.uri, exc, self.ttl)


def _read(uri: str) -> dict | None:
    try:
        data = raw_get(uri)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {}


def acquire(output: str, attempt: str) -> Lease:
    """Take ``<output>/_LEASE`` for this attempt, or raise LeaseHeld naming the live holder."""
    lease = Lease(output=output, uri=join(output, LEASE), attempt=attempt, ttl=ttl_s())
    for _ in range(5):
        if _try_create(lease):
            lease.start()
            return lease
        holder, etag = _read_with_etag(lease.uri)
        if holder is None:
            continue  # released meanwhile
        if not _stale(holder, time.time()) and not _dies_unrenewed(lease.uri, holder):
            raise LeaseHeld(
                f"{output} is being written by {describe(holder)}; a second writer is refused. Wait for it, "
                f"or, if it is dead on another host, for its lease to expire (CMV_LEASE_TTL_S={lease.ttl:.0f})"
            )
        log.info("taking over the stale lease of %s from %s", output, describe(holder))
        _remove_stale(lease.uri, etag, holder.get("attempt"))
    raise LeaseHeld(f"{output}: could not take the lease (other writers keep taking it)")


def _dies_unrenewed(uri: str, holder: dict) -> bool:
    """Watch another host's lease until it expires: True when it expired without being renewed (its
    holder is dead), False as soon as it is renewed or taken by someone else (live)."""
    if holder.get("host") == socket.gethostname():
        return False  # a live process here: no need to wait to know
    until = float(holder.get("until", 0))
    log.info(
        "waiting until %s for the lease of %s to be renewed or to expire",
        time.strftime("%H:%M:%S", time.gmtime(until)),
        describe(holder),
    )
    while time.time() <= until + 1:
        time.sleep(min(1.0, max(0.05, until + 1 - time.time())))
        now = _read(uri)
        if not now or now.get("attempt") != holder.get("attempt") or float(now.get("until", 0)) > until:
            return False
    return True


def _read_with_etag(uri: str) -> tuple[dict | None, str | None]:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            obj = s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if "NoSuchKey" in str(exc) or "404" in str(exc):
                return None, None
            raise
        try:
            return json.loads(obj["Body"].read()), obj.get("ETag")
        except ValueError:
            return {}, obj.get("ETag")
    return _read(uri), None


def _try_create(lease: Lease) -> bool:
    if is_s3(lease.uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(lease.uri)
        try:
            resp = s3_client().put_object(Bucket=bucket, Key=key, Body=lease.body(), IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        lease.etag = resp.get("ETag")
        return True
    path = local_path(lease.uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(lease.body())
    return True


def _remove_stale(uri: str, etag: str | None, stale_attempt: str | None) -> None:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            # only the stale holder's object: a racing taker's fresh lease survives
            s3_client().delete_object(Bucket=bucket, Key=key, **({"IfMatch": etag} if etag else {}))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "NoSuchKey"):
                raise
        return
    path = local_path(uri)
    grave = path.with_name(f".{LEASE}.stale.{os.getpid()}.tmp")
    try:
        os.rename(path, grave)  # atomic: of two takers only one moves it
    except FileNotFoundError:
        return
    if (_read(str(grave)) or {}).get("attempt") != stale_attempt:
        # a racing taker's fresh lease, not the stale one: put it back (link fails if a third one exists)
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink()
