"""Benchmark the clean and format stages against their floors "read + JSON-parse every line", in one run.

    python benchmarks/bench_clean.py                  # 25,000 threads (~1.5M comment objects)
    python benchmarks/bench_clean.py --threads 2000   # quick look

Generates the synthetic dump if it is missing (benchmarks/synth_dump.py), reads
it once to warm the page cache, then runs, each in a fresh subprocess:
- floor: stream the file through cmv_core.storage.open_read and orjson.loads
  every line, nothing else;
- clean: `cmv clean --input <dump> --output <tmp> --force` (the real CLI), with
  the default `clean.workers: 0` (worker processes, one per CPU up to 4) and
  with `clean.workers=1` (everything in one process);
- format: `cmv format` of that clean output with the tiny recipe's tokenizer,
  beside its floor (read + JSON-parse every line of conversations.jsonl.gz);
- clean and format again with the hand-off checks switched off (input files not
  hashed against the upstream _SUCCESS, the raw dump not fingerprinted; a patch
  in the benchmark's own process, there is no such switch in the stage), so the
  cost of verification is measured, not guessed;
and prints wall time, CPU time, peak RSS of all the processes and the ratio to
the floor. Targets (issues 2, 12): clean within 2x of the floor, peak RSS < 1 GiB,
verification under 5% of the stage's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FLOOR = """
import sys, orjson
from cmv_core import storage
n = 0
with storage.open_read(sys.argv[1], "rb") as f:
    for line in f:
        if line.strip():
            orjson.loads(line)
            n += 1
print(n)
"""

# The hand-off checks patched out (benchmark only): a sitecustomize on PYTHONPATH, so that clean's
# spawned workers (which hash the dump's chunks) are patched too.
UNVERIFIED_SITE = """
from cmv_core import storage
from cmv_core.clean import workers
from cmv_core.storage import digests, manifests, tracking
tracking.expected = lambda uri: None
manifests._check_listing = lambda uri, manifest: None
digests.raw_fingerprint = lambda uri, streamed=None: "unverified"
storage.record_raw_digest = lambda run, uri, digest: None  # clean calls it through the facade
workers._digest_of = lambda parts: b""  # the workers' hash of each chunk
"""


def _peak_rss(proc) -> int:
    """A process's peak RSS in bytes: the kernel's high-water mark (Linux), else its RSS now."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (MiB) of the process tree, stdout, and CPU seconds (user + system,
    the process and its reaped children, i.e. the workers).

    The RSS is the sum over the process and its children (the clean stage's workers are separate
    processes) of each one's own peak (VmHWM), so at least the peak of the sum; polled every 100 ms
    with psutil (at 20 ms the polling itself took ~8% of a core, from the 2-core runs it measures), and at
    least the process's own ru_maxrss from os.wait4.
    """
    import psutil

    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, env=env)
        peaks: dict[int, int] = {}
        ps = psutil.Process(proc.pid)
        while True:
            try:
                for p in [ps, *ps.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        peaks[p.pid] = max(peaks.get(p.pid, 0), _peak_rss(p))
            except psutil.Error:
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.1)
        peak = sum(peaks.values())
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
        # wait4's rusage covers the process and the children it waited for (its workers)
        cpu = usage.ru_utime + usage.ru_stime
        return wall, max(peak / 2**20, usage.ru_maxrss / 1024), out.read().decode(), cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=25000)
    ap.add_argument("--dump", default=None, help="default: benchmarks/data/synth_cmv_<threads>.jsonlist")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    ap.add_argument("--no-format", action="store_true", help="clean only")
    args = ap.parse_args()
    dump = Path(args.dump or REPO / "benchmarks" / "data" / f"synth_cmv_{args.threads}.jsonlist")

    # Generate if missing
    if not dump.exists():
        print(f"generating {dump} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "synth_dump.py"),
                "--threads",
                str(args.threads),
                "--output",
                str(dump),
            ],
            check=True,
            cwd=REPO,
        )
    size_mib = dump.stat().st_size / 2**20

    # Warm the page cache so that neither measurement pays for the disk
    with open(dump, "rb") as f:
        while f.read(16 * 2**20):
            pass

    # Measure, interleaved
    load = os.getloadavg()[0]
    out_dir = Path(tempfile.mkdtemp(prefix="cmv-bench-clean-"))
    try:
        runs = measure_all(dump, out_dir, args.repeat, with_format=not args.no_format)
        summary = runs["auto"][-1][2].strip()
        out_size = (out_dir / "clean" / "conversations.jsonl.gz").stat().st_size / 2**20
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    # Report
    floor_out = min(runs["floor"])[2]
    lines = int(floor_out.strip() or 0)
    print()
    print(summary)
    print()
    print(
        f"input: {dump} ({size_mib:,.0f} MiB, {lines:,} lines); conversations.jsonl.gz {out_size:,.0f} MiB; "
        f"{os.cpu_count()} cores, load average {load:.1f} before"
    )
    print_table(runs)
    return 0


def measure_all(dump: Path, out_dir: Path, repeat: int, with_format: bool) -> dict[str, list]:
    """Every measured run, by kind, `repeat` times each; interleaved, so all see the same machine load."""
    py = sys.executable
    site = out_dir / "unverified-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(UNVERIFIED_SITE)
    unverified_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}

    def clean_cmd(workers: int) -> list[str]:
        return [
            py,
            "-m",
            "cmv_core.cli",
            "clean",
            "--input",
            str(dump),
            "--output",
            str(out_dir / "clean"),
            "--force",
            "--log-level",
            "WARNING",
            "--set",
            f"clean.workers={workers}",
        ]

    format_cmd = [
        py,
        "-m",
        "cmv_core.cli",
        "format",
        "--input",
        str(out_dir / "clean"),
        "--output",
        str(out_dir / "format"),
        "--force",
        "--log-level",
        "WARNING",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
    ]
    conversations = str(out_dir / "clean" / "conversations.jsonl.gz")
    runs: dict[str, list] = {
        k: [] for k in ("floor", "auto", "auto_unverified", "serial", "format_floor", "format", "format_unverified")
    }
    for _ in range(repeat):
        runs["floor"].append(run_measured([py, "-c", FLOOR, str(dump)]))
        runs["auto_unverified"].append(run_measured(clean_cmd(0), unverified_env))
        runs["serial"].append(run_measured(clean_cmd(1)))
        runs["auto"].append(run_measured(clean_cmd(0)))  # last: format reads its verified output
        if with_format:
            runs["format_floor"].append(run_measured([py, "-c", FLOOR, conversations]))
            runs["format_unverified"].append(run_measured(format_cmd, unverified_env))
            runs["format"].append(run_measured(format_cmd))
    return runs


def print_table(runs: dict[str, list]) -> None:
    """Wall, CPU, peak RSS and the ratio to the floor of the fastest run of each kind; the cost of verification."""
    floor_s, floor_rss, _, floor_cpu = min(runs["floor"])
    print(f"{'':40s} {'wall':>8s} {'CPU':>8s} {'peak RSS':>10s} {'wall/floor':>11s}")
    print(f"{'floor (read + orjson.loads each line)':40s} {floor_s:7.1f}s {floor_cpu:7.1f}s {floor_rss:6.0f} MiB")
    rows = [
        ("auto", "cmv clean (workers: auto)"),
        ("auto_unverified", "  same, hand-off checks off"),
        ("serial", "cmv clean (workers: 1)"),
    ]
    for key, label in rows:
        wall, rss, _, cpu = min(runs[key])
        print(f"{label:40s} {wall:7.1f}s {cpu:7.1f}s {rss:6.0f} MiB {wall / floor_s:10.2f}x")
    verify_pct = {"clean": 100 * (min(runs["auto"])[0] / min(runs["auto_unverified"])[0] - 1)}
    if runs["format"]:
        ff_s, ff_rss, _, ff_cpu = min(runs["format_floor"])
        print(f"{'format floor (read + json each line)':40s} {ff_s:7.1f}s {ff_cpu:7.1f}s {ff_rss:6.0f} MiB")
        for key, label in (
            ("format", "cmv format (tiny tokenizer)"),
            ("format_unverified", "  same, hand-off checks off"),
        ):
            wall, rss, _, cpu = min(runs[key])
            print(f"{label:40s} {wall:7.1f}s {cpu:7.1f}s {rss:6.0f} MiB {wall / ff_s:10.2f}x")
        verify_pct["format"] = 100 * (min(runs["format"])[0] / min(runs["format_unverified"])[0] - 1)
    print("verification cost (wall, checks on vs off): " + ", ".join(f"{k} {v:+.1f}%" for k, v in verify_pct.items()))
    print("targets: clean wall <= 2x floor, peak RSS < 1 GiB (all processes), verification < 5%")


if __name__ == "__main__":
    sys.exit(main())
