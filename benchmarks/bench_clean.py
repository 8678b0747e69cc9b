"""Benchmark the clean stage against the floor "read + JSON-parse every line", in one run.

    python benchmarks/bench_clean.py                  # 25,000 threads (~1.5M comment objects)
    python benchmarks/bench_clean.py --threads 2000   # quick look

Generates the synthetic dump if it is missing (benchmarks/synth_dump.py), reads
it once to warm the page cache, then runs, each in a fresh subprocess:
- floor: stream the file through cmv_core.storage.open_read and orjson.loads
  every line, nothing else;
- clean: `cmv clean --input <dump> --output <tmp> --force` (the real CLI), with
  the default `clean.workers: 0` (worker processes, one per CPU up to 4) and
  with `clean.workers=1` (everything in one process);
and prints wall time, CPU time, peak RSS of all the processes and the ratio to
the floor. Targets (issue 2): clean within 2x of the floor, peak RSS < 1 GiB.
"""

from __future__ import annotations

import argparse
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


def run_measured(cmd: list[str]) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (MiB) of the process tree, stdout, and CPU seconds (user + system,
    the process and its reaped children, i.e. the workers).

    The RSS is the peak of the sum over the process and its children, sampled every
    20 ms with psutil (the clean stage's workers are separate processes), and at
    least the process's own ru_maxrss from os.wait4.
    """
    import psutil

    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        peak = 0
        ps = psutil.Process(proc.pid)
        while True:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
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
    args = ap.parse_args()
    dump = Path(args.dump or REPO / "benchmarks" / "data" / f"synth_cmv_{args.threads}.jsonlist")

    # Generate if missing
    if not dump.exists():
        print(f"generating {dump} ...", flush=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "synth_dump.py"), "--threads",
                        str(args.threads), "--output", str(dump)], check=True, cwd=REPO)
    size_mib = dump.stat().st_size / 2**20

    # Warm the page cache so that neither measurement pays for the disk
    with open(dump, "rb") as f:
        while f.read(16 * 2**20):
            pass

    load = os.getloadavg()[0]
    py = sys.executable
    floor_cmd = [py, "-c", FLOOR, str(dump)]
    out_dir = Path(tempfile.mkdtemp(prefix="cmv-bench-clean-"))

    def clean_cmd(workers: int) -> list[str]:
        return [py, "-m", "cmv_core.cli", "clean", "--input", str(dump), "--output", str(out_dir / "clean"),
                "--force", "--log-level", "WARNING", "--set", f"clean.workers={workers}"]

    runs: dict[str, list] = {"floor": [], "auto": [], "serial": []}
    try:
        for _ in range(args.repeat):  # interleaved, so all see the same machine load
            runs["floor"].append(run_measured(floor_cmd))
            runs["auto"].append(run_measured(clean_cmd(0)))
            runs["serial"].append(run_measured(clean_cmd(1)))
        summary = runs["auto"][-1][2].strip()
        out_size = (out_dir / "clean" / "conversations.jsonl.gz").stat().st_size / 2**20
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    floor_s, floor_rss, floor_out, floor_cpu = min(runs["floor"])
    lines = int(floor_out.strip() or 0)
    print()
    print(summary)
    print()
    print(f"input: {dump} ({size_mib:,.0f} MiB, {lines:,} lines); conversations.jsonl.gz {out_size:,.0f} MiB; "
          f"{os.cpu_count()} cores, load average {load:.1f} before")
    print(f"{'':40s} {'wall':>8s} {'CPU':>8s} {'peak RSS':>10s} {'wall/floor':>11s}")
    print(f"{'floor (read + orjson.loads each line)':40s} {floor_s:7.1f}s {floor_cpu:7.1f}s {floor_rss:6.0f} MiB")
    for key, label in (("auto", "cmv clean (workers: auto)"), ("serial", "cmv clean (workers: 1)")):
        wall, rss, _, cpu = min(runs[key])
        print(f"{label:40s} {wall:7.1f}s {cpu:7.1f}s {rss:6.0f} MiB {wall / floor_s:10.2f}x")
    print("targets: clean wall <= 2x floor, peak RSS < 1 GiB (all processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
