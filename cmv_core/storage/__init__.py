"""Artifact store: one API for plain paths, ``file://`` URIs and ``s3://`` URIs (docs/ARCHITECTURE.md).

Every stage reads its inputs and writes its outputs through ``from cmv_core import storage``, so the same
stage code runs on a laptop (local paths) and in a cluster (S3 or any S3-compatible store reached through
``AWS_ENDPOINT_URL``). This facade only re-exports; each name lives in one module, bottom-up:
uris < s3 < streams < tracking < io < dirs < digests < lease < manifests < handoff. Monkeypatch a name
in the module that owns it, not here.
"""

from cmv_core.storage.digests import (
    RAW_CHUNK_BYTES,
    RawDigest,
    chunk_hash,
    plain_local,
    raw_chunks,
    raw_file_digest,
    raw_fingerprint,
    read_range,
)
from cmv_core.storage.dirs import download_dir, materialize_dir, upload_dir
from cmv_core.storage.handoff import (
    StageRun,
    abort_stage,
    begin_stage,
    finish_stage,
    infer_run_id,
    record_raw_digest,
    release_all,
)
from cmv_core.storage.io import (
    artifact_mode,
    delete,
    delete_prefix,
    dumps_json,
    exists,
    list_files,
    open_read,
    open_read_raw,
    open_write,
    read_bytes,
    read_json,
    read_jsonl,
    read_text,
    sha256,
    size,
    sweep_tmp,
    write_bytes,
    write_json,
    write_jsonl,
    write_text,
)
from cmv_core.storage.manifests import (
    ManifestError,
    MissingInputError,
    parse_manifest,
    require_success,
    wait_for_success,
)
from cmv_core.storage.s3 import s3_client, s3_max_attempts
from cmv_core.storage.streams import COMPRESSED, ZstdReader
from cmv_core.storage.tracking import Expected
from cmv_core.storage.uris import (
    KNOWN_SCHEMES,
    LEASE,
    RUN_ID_RE,
    SUCCESS,
    check_run_id,
    check_uri,
    is_s3,
    join,
    local_path,
)

__all__ = [
    "COMPRESSED",
    "KNOWN_SCHEMES",
    "LEASE",
    "RAW_CHUNK_BYTES",
    "RUN_ID_RE",
    "SUCCESS",
    "Expected",
    "ManifestError",
    "MissingInputError",
    "RawDigest",
    "StageRun",
    "ZstdReader",
    "abort_stage",
    "artifact_mode",
    "begin_stage",
    "check_run_id",
    "check_uri",
    "chunk_hash",
    "delete",
    "delete_prefix",
    "download_dir",
    "dumps_json",
    "exists",
    "finish_stage",
    "infer_run_id",
    "is_s3",
    "join",
    "list_files",
    "local_path",
    "materialize_dir",
    "open_read",
    "open_read_raw",
    "open_write",
    "parse_manifest",
    "plain_local",
    "raw_chunks",
    "raw_file_digest",
    "raw_fingerprint",
    "read_bytes",
    "read_json",
    "read_jsonl",
    "read_range",
    "read_text",
    "record_raw_digest",
    "release_all",
    "require_success",
    "s3_client",
    "s3_max_attempts",
    "sha256",
    "size",
    "sweep_tmp",
    "upload_dir",
    "wait_for_success",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_text",
]
