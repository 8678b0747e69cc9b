"""clean then format through the real CLI, on local paths and on S3 (moto server on loopback).

Both backends must give byte-identical conversation files; a rerun is skipped
through the manifest; a corrupted input line is rejected with its reason and
nothing else changes.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from conftest import CONFIGS, run_cmv

from cmv_core import storage

TINY = str(CONFIGS / "tiny.yaml")


def _raw(uri: str) -> bytes:
    with storage.open_read_raw(uri) as f:
        return f.read()


def test_local_and_s3_give_byte_identical_outputs(tmp_path, s3_bucket, sample_dump, tiny_model_dir):
    local = tmp_path / "runs" / "r1"
    remote = f"{s3_bucket}/runs/r1"
    raw_s3 = f"{s3_bucket}/raw/sample_cmv.jsonlist.gz"
    storage.write_bytes(raw_s3, Path(sample_dump).read_bytes())  # compressed on the way up

    run_cmv("clean", "--input", sample_dump, "--output", str(local / "clean"), "--config", TINY)
    run_cmv("clean", "--input", raw_s3, "--output", f"{remote}/clean", "--config", TINY)
    # (rejects name their input file, which differs between the two runs)
    name = "conversations.jsonl.gz"
    assert _raw(str(local / "clean" / name)) == _raw(f"{remote}/clean/{name}")

    run_cmv("format", "--input", str(local / "clean"), "--output", str(local / "format"), "--config", TINY)
    run_cmv("format", "--input", f"{remote}/clean", "--output", f"{remote}/format", "--config", TINY)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "pairs.jsonl"):
        assert _raw(str(local / "format" / name)) == _raw(f"{remote}/format/{name}"), name
    assert storage.list_files(f"{remote}/format") == sorted(p.name for p in (local / "format").iterdir())

    # A rerun with the same inputs and config is skipped through the manifest.
    before = _raw(f"{remote}/format/_SUCCESS")
    proc = run_cmv("format", "--input", f"{remote}/clean", "--output", f"{remote}/format", "--config", TINY)
    assert "skipped" in proc.stderr + proc.stdout
    assert _raw(f"{remote}/format/_SUCCESS") == before


def test_corrupted_line_is_rejected_and_nothing_else_changes(tmp_path, sample_dump):
    lines = Path(sample_dump).read_bytes().splitlines(keepends=True)
    good = tmp_path / "good.jsonlist"
    good.write_bytes(b"".join(lines))
    bad = tmp_path / "bad.jsonlist"
    truncated = lines[2][: len(lines[2]) // 2] + b"\n"
    bad.write_bytes(b"".join(lines[:2] + [truncated] + lines[3:]))

    run_cmv(
        "clean",
        "--input",
        str(good),
        "--output",
        str(tmp_path / "a" / "clean"),
        "--config",
        TINY,
        "--set",
        "clean.max_reject_fraction=0.5",
    )
    run_cmv(
        "clean",
        "--input",
        str(bad),
        "--output",
        str(tmp_path / "b" / "clean"),
        "--config",
        TINY,
        "--set",
        "clean.max_reject_fraction=0.5",
    )

    def threads(run: str) -> list[dict]:
        with gzip.open(tmp_path / run / "clean" / "conversations.jsonl.gz", "rt") as f:
            return [json.loads(line) for line in f]

    broken_id = json.loads(lines[2])["id"]
    expected = [t for t in threads("a") if t["thread_id"] != broken_id]
    assert threads("b") == expected
    with gzip.open(tmp_path / "b" / "clean" / "rejects.jsonl.gz", "rt") as f:
        # comment-level skips (a parent missing from the dump) are kept too; count whole lines
        rejects = [r for line in f if (r := json.loads(line)).get("level") != "comment"]
    assert len(rejects) == 1
    assert rejects[0]["line"] == 3
    stats = json.loads((tmp_path / "b" / "clean" / "stats.json").read_text())
    assert stats["lines"]["rejected"] == 1
    assert sum(stats["rejected_lines_by_reason"].values()) == 1
    assert rejects[0]["reason"] in stats["rejected_lines_by_reason"]
