"""An S3 outage within the retry budget while the generate and judge stages upload their outputs is
ridden out, and every output equals an uninterrupted run's (README, "Inputs and outputs").

The store, the proxy and the scaled numbers are those of tests/test_s3_faults.py: budget 8 s, a 4 s outage
started by the first matching upload (the proxy's ``outage_at``), 8 KiB parts (as tests/s3_small_parts.py
sets them). Inputs and outputs are on S3. Each stage runs in this process, as in the resume tests there:
first uninterrupted, straight to the store, then through the proxy with the outage. Compared: every output
file but _SUCCESS, byte for byte, except the fields that carry times (generate's stats.json
``generate_seconds`` and ``completion_tokens_per_s``; the judge's report.json ``judge_seconds`` and
report.md's ``- time:`` line), compared with those removed; the judge's cache shards are named by time
and process, so their entries are compared as a set. Assertions count events, never time.
"""

from __future__ import annotations

import json
import time

import pytest
import test_s3_faults as faults
from s3transfer import utils
from test_s3_faults import BUDGET_S, PART_BYTES, report

from cmv_core import storage

moto_url, store = faults.moto_url, faults.store  # the store and the proxy of tests/test_s3_faults.py
# timings, which differ between any two runs (tokens_per_s: the judge transport's observed throughput)
TIME_FIELDS = {"generate_seconds", "completion_tokens_per_s", "judge_seconds", "tokens_per_s"}


class _Uri(str):
    """An S3 prefix that joins with ``/`` like a Path, for helpers that build their inputs under a root."""

    def __truediv__(self, name: str) -> _Uri:
        return _Uri(storage.join(self, name))


@pytest.fixture()
def through_proxy(store, monkeypatch):
    """Returns a function that sends this process's S3 calls through the proxy with the tests' budget and
    8 KiB parts; until it is called they go straight to the store."""
    proxy, _ = store
    adjuster = utils.ChunksizeAdjuster.__init__
    defaults = list(adjuster.__defaults__)
    defaults[1] = 1024  # s3transfer's 5 MiB part floor, lowered as tests/s3_small_parts.py does

    def switch() -> None:
        monkeypatch.setattr(adjuster, "__defaults__", tuple(defaults))
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("CMV_S3_RETRY_BUDGET_S", str(BUDGET_S))
        monkeypatch.setenv("CMV_S3_PART_BYTES", str(PART_BYTES))

    return switch


def _without_times(obj):
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if k not in TIME_FIELDS}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def _comparable(uri: str) -> bytes | object:
    data = storage.read_bytes(uri)
    if uri.endswith(".json"):
        return _without_times(json.loads(data))
    if uri.endswith(".md"):
        return [line for line in data.splitlines() if not line.startswith(b"- time:")]
    return data


def assert_same_outputs(out: str, ref: str) -> None:
    """Every file under ``out`` but _SUCCESS equals the one under ``ref``; cache shards as a set of entries."""
    assert storage.require_success(out) and storage.require_success(ref)
    names = [n for n in storage.list_files(out) if n not in (storage.SUCCESS, storage.LEASE)]
    ref_names = [n for n in storage.list_files(ref) if n != storage.SUCCESS]
    cached = [n for n in names if n.startswith("cache/")]
    assert len(cached) == len([n for n in ref_names if n.startswith("cache/")])
    assert [n for n in names if n not in cached] == [n for n in ref_names if not n.startswith("cache/")]
    for name in names:
        if name not in cached:
            assert _comparable(storage.join(out, name)) == _comparable(storage.join(ref, name)), name
    assert _cache_entries(out) == _cache_entries(ref)
    assert not storage.exists(storage.join(out, storage.LEASE))


def _cache_entries(uri: str) -> list[bytes]:
    shards = [n for n in storage.list_files(uri) if n.startswith("cache/")]
    return sorted(line for n in shards for line in storage.read_bytes(storage.join(uri, n)).splitlines())


def assert_ridden_out(proxy, path_part: str) -> None:
    """One outage, seen by the stage (a request reset or a connection refused), and the upload it hit
    sent again once the store was back."""
    assert proxy.counters.faults["outage"] == 1
    assert proxy.counters.faults.get("reset", 0) + proxy.counters.faults.get("refused", 0) >= 1
    puts = [p for m, p in proxy.counters.requests if m == "PUT" and path_part in p]
    assert len(puts) >= 2, puts  # the upload the outage reset, then the same upload again


# ------------------------------------------------------------------ generate


@pytest.mark.parametrize("path_part", ["/shards/base-00000", "/generations.jsonl"])
def test_generate_rides_out_an_outage_during_its_uploads(path_part, store, through_proxy, tiny_model_dir):
    """The outage starts at the first upload of shard 0 (mid-run) or of generations.jsonl (the end)."""
    from test_generation import config, write_format_output

    from cmv_core.generate import stage as gen

    proxy, bucket = store
    cfg = config(tiny_model_dir)  # 7 prompts, shards of 3
    fmt = write_format_output(f"s3://{bucket}/r/format")
    ref = f"s3://{bucket}/ref/generate"
    gen.run_generate(fmt, ref, cfg, run_id="r")
    through_proxy()
    out = f"s3://{bucket}/r/generate"
    proxy.outage_at(BUDGET_S / 2, "PUT", path_part)
    manifest = gen.run_generate(fmt, out, cfg, run_id="r")
    report(
        f"outage 4 s at {path_part} upload (budget 8 s)", "generate", "completes, same output", proxy, time.monotonic()
    )
    assert_ridden_out(proxy, path_part)
    assert manifest["summary"]["shards_resumed"] == 0
    assert_same_outputs(out, ref)


# ------------------------------------------------------------------ judge


@pytest.mark.parametrize("path_part", ["/cache/", "/judgments.jsonl"])
def test_judge_rides_out_an_outage_during_its_uploads(path_part, store, through_proxy, tmp_path, monkeypatch):
    """The outage starts at the first upload of a cache shard (mid-run, a flush every 4 answers) or of
    judgments.jsonl (after the last call); the judge's server is asked each call once, as uninterrupted."""
    from fake_openai_server import FakeOpenAI
    from test_judge import config, make_inputs, smart_judge

    from cmv_core.judge import stage as judging

    proxy, bucket = store
    monkeypatch.setenv("CMV_SCRATCH", str(tmp_path / "scratch"))
    gen, fmt = make_inputs(_Uri(f"s3://{bucket}/r"))
    ref, out = f"s3://{bucket}/ref/judge", f"s3://{bucket}/r/judge"
    with FakeOpenAI(smart_judge) as srv:
        cfg = config(srv, calibration=False, cache_flush_every=4)
        judging.run_judge(gen, fmt, ref, cfg, run_id="r")
        calls = srv.count
        through_proxy()
        proxy.outage_at(BUDGET_S / 2, "PUT", path_part)
        judging.run_judge(gen, fmt, out, cfg, run_id="r")
        report(
            f"outage 4 s at {path_part} upload (budget 8 s)", "judge", "completes, same output", proxy, time.monotonic()
        )
        assert calls == 9 + 12 and srv.count == 2 * calls  # no call failed nor was asked twice
    assert_ridden_out(proxy, path_part)
    assert storage.read_json(f"{out}/report.json")["usage"]["new_calls"] == calls
    assert_same_outputs(out, ref)
    assert not any((tmp_path / "scratch").glob("cmv-judge-cache-*/*.jsonl"))  # nothing spilled
