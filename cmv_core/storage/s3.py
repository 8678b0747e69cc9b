"""The S3 side of the store: one retrying client per endpoint and process, transfers, streamed reads.

Any S3-compatible store is reached through ``AWS_ENDPOINT_URL``; boto3 is imported only when an ``s3://``
URI is used, so local runs never need it. Every S3 call, transfer parts included, rides out an outage of
``CMV_S3_RETRY_BUDGET_S`` seconds through botocore's own retries, configured here (README, "Inputs and
outputs"); what botocore cannot retry is resumed here: a streamed read cut midway goes on from where it
was, and a multipart upload the store no longer knows restarts its file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

from cmv_core.errors import StageFailed
from cmv_core.storage.uris import split_s3

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 10  # transfer threads per file (boto3's default)
RESUMES = 5  # consecutive reopens of a streamed read that make no progress before it fails
RESTARTS = 3  # times a file is uploaded again when the store lost its multipart upload


def budget_s() -> float:
    return float(os.environ.get("CMV_S3_RETRY_BUDGET_S", "60"))


def retry_settings(budget: float) -> tuple[int, float]:
    """(attempts, max backoff in s) for botocore's standard/adaptive retries to ride out an outage of
    ``budget`` seconds. The backoff before retry i is rand(0, 1) * min(base * 2**i, max_backoff) (base
    0.05 s, 1 s when throttled). Capping it at budget/10 makes the wait a sum of ~30 jitters, so it
    concentrates around its mean: attempts are added until that mean is 1.5 budgets, which the sum then
    falls below the budget with a probability under 1e-5, and it gives up soon after the budget."""
    cap = min(20.0, max(0.2, budget / 10))
    waited, attempts = 0.0, 1
    while waited < 1.5 * budget:
        waited += min(0.05 * 2 ** (attempts - 1), cap) / 2
        attempts += 1
    return attempts, cap


def s3_max_attempts(budget: float) -> int:
    return retry_settings(budget)[0]


def _install_retries(client, attempts: int, max_backoff: float) -> None:
    """Replace the standard retry handler botocore registered with the same one, built from botocore's
    own classes, but with the backoff capped for the budget and a retry quota sized for every connection
    retrying through a whole outage: the default quota (500, 14 per retried connection error) runs dry
    after ~35 retries, i.e. about a second into an outage when ten part uploads fail at once."""
    from botocore.retries import quota, standard

    name = client.meta.service_model.service_id.hyphenize()
    client.meta.events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")
    adapter = standard.RetryEventAdapter()
    throttling = standard.ThrottlingErrorDetector(adapter)
    capacity = standard.RetryQuotaChecker._RETRY_COST * attempts * client.meta.config.max_pool_connections
    retry_quota = standard.RetryQuotaChecker(quota.RetryQuota(capacity), throttling)
    handler = standard.RetryHandler(
        retry_policy=standard.RetryPolicy(
            retry_checker=standard.StandardRetryConditions(max_attempts=attempts),
            retry_backoff=standard.ExponentialBackoff(
                max_backoff=max_backoff, service_name=name, throttling_detector=throttling
            ),
        ),
        retry_event_adapter=adapter,
        retry_quota=retry_quota,
        service_name=name,
    )
    client.meta.events.register(f"after-call.{name}", retry_quota.release_retry_quota)
    client.meta.events.register(f"needs-retry.{name}", handler.needs_retry, unique_id=f"retry-config-{name}")


def _s3_client():
    import boto3
    from botocore.config import Config

    # botocore's retries (exponential backoff with jitter on throttling, 5xx and connection errors) sized
    # from the budget; "adaptive" (the default) adds client-side rate limiting, so 503 SlowDown slows the
    # request rate instead of failing the stage.
    attempts, max_backoff = retry_settings(budget_s())
    attempts = int(os.environ.get("CMV_S3_MAX_ATTEMPTS") or attempts)
    mode = os.environ.get("CMV_S3_RETRY_MODE", "adaptive")
    cfg = Config(
        retries={"total_max_attempts": attempts, "mode": mode},
        connect_timeout=5,
        read_timeout=float(os.environ.get("CMV_S3_READ_TIMEOUT_S", "60")),
        max_pool_connections=MAX_CONCURRENCY + 4,  # one file's parts, the lease heartbeat, the stage
    )
    client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=cfg)
    if mode in ("standard", "adaptive"):
        _install_retries(client, attempts, max_backoff)
    return client


_client_cache: dict[tuple, Any] = {}


def s3_client():
    # One client per endpoint and process; clients are thread-safe.
    key = (
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("CMV_S3_MAX_ATTEMPTS"),
        os.environ.get("CMV_S3_RETRY_BUDGET_S"),
        os.environ.get("CMV_S3_RETRY_MODE"),
        os.environ.get("CMV_S3_READ_TIMEOUT_S"),
        os.getpid(),
    )
    if key not in _client_cache:
        _client_cache[key] = _s3_client()
    return _client_cache[key]


def transfer_config():
    """boto3's transfer manager settings: its threads' calls retry through the client; a download's
    streamed body cut midway is retried by s3transfer itself (``num_download_attempts``)."""
    from boto3.s3.transfer import TransferConfig

    part = int(os.environ.get("CMV_S3_PART_BYTES", str(8 * 1024 * 1024)))
    return TransferConfig(
        multipart_threshold=part,
        multipart_chunksize=part,
        max_concurrency=MAX_CONCURRENCY,
        num_download_attempts=RESUMES,
        preferred_transfer_client="classic",
    )


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def upload_file(path: str, uri: str, extra: dict | None = None) -> None:
    """Upload a local file (multipart above ``CMV_S3_PART_BYTES``). A multipart upload the store lost
    (NoSuchUpload: it restarted without its state) restarts the file; boto3 reports a failed part as
    S3UploadFailedError, turned here into the stage's one-line failure."""
    from boto3.exceptions import S3UploadFailedError

    bucket, key = split_s3(uri)
    for restart in range(RESTARTS + 1):
        try:
            s3_client().upload_file(path, bucket, key, ExtraArgs=extra or None, Config=transfer_config())
            return
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__ or exc  # boto3 raises it while handling the ClientError
            if error_code(cause) == "NoSuchUpload" and restart < RESTARTS:
                log.warning("%s: the store lost its multipart upload; uploading the file again", uri)
                continue
            raise StageFailed(f"S3 failed after retries uploading {uri} ({' '.join(str(cause).split())})") from exc


def download_file(uri: str, path: str) -> None:
    bucket, key = split_s3(uri)
    s3_client().download_file(bucket, key, path, Config=transfer_config())


def abort_uploads(uri: str) -> int:
    """Abort the incomplete multipart uploads under a prefix (a failed or dead attempt's); how many."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    client = s3_client()
    n = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            with contextlib.suppress(Exception):  # already completed or aborted meanwhile
                client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                n += 1
    return n


def s3_objects(uri: str) -> Iterator[dict]:
    """Every object under a prefix, each with ``Rel``, its key relative to the prefix."""
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield {**obj, "Rel": obj["Key"][len(prefix) :]}


class S3Reader(io.RawIOBase):
    """Streaming, read-only raw file over an S3 GetObject body. A body cut midway (a reset, a read
    timeout, fewer bytes than its length) is reopened at the byte where it stopped, on the same object
    version (If-Match on its ETag); the reopen rides out an outage like any call."""

    def __init__(self, bucket: str, key: str, response: dict):
        self._bucket, self._key = bucket, key
        self._etag = response.get("ETag")
        self._size = int(response.get("ContentLength", 0))
        self._body = response["Body"]
        self._pos = 0
        self.resumed = 0

    def readable(self) -> bool:
        return True

    def _reopen(self, why: BaseException | str) -> None:
        log.warning(
            "s3://%s/%s: read cut at byte %d (%s); reading on from there", self._bucket, self._key, self._pos, why
        )
        with contextlib.suppress(Exception):
            self._body.close()
        args = {"IfMatch": self._etag} if self._etag else {}
        resp = s3_client().get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", **args)
        self._body = resp["Body"]
        self.resumed += 1

    def readinto(self, buf) -> int:
        from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

        stalled = 0
        while True:
            try:
                data = self._body.read(len(buf))
                if data or self._pos >= self._size:
                    break
                why: BaseException | str = f"ended at {self._pos} of {self._size} bytes"
            except S3_RETRYABLE_DOWNLOAD_ERRORS as exc:
                why = exc
            stalled += 1
            if stalled > RESUMES:
                raise StageFailed(f"S3 read of s3://{self._bucket}/{self._key} failed at byte {self._pos}: {why}")
            self._reopen(why)
        n = len(data)
        buf[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def s3_reader(uri: str) -> S3Reader:
    """The object's bytes as a raw stream; FileNotFoundError when there is no such key."""
    bucket, key = split_s3(uri)
    try:
        resp = s3_client().get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore raises NoSuchKey as a ClientError subclass
        if "NoSuchKey" in type(exc).__name__ or "NoSuchKey" in str(exc) or "404" in str(exc):
            raise FileNotFoundError(uri) from exc
        raise
    return S3Reader(bucket, key, resp)
