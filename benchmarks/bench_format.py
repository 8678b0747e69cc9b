"""Benchmark the format stage against two floors, in one run (``make bench`` runs it after bench_clean).

    python benchmarks/bench_format.py                  # 25,000 threads (~1.5M comment objects)
    python benchmarks/bench_format.py --threads 2000   # quick look

Cleans the synthetic dump once (benchmarks/synth_dump.py, generated if missing), then runs, each in a fresh
subprocess, interleaved ``--repeat`` times:

- read floor: stream conversations.jsonl.gz through cmv_core.storage.open_read and orjson.loads every line;
- tokenizer floor: the read floor, then the texts the stage tokenizes, done the fastest known way: the
  tokenizer's own chat template compiled once with jinja2 (the environment transformers uses) and rendered
  for every kept SFT example and both sides of every preference pair, and every rendered text and reply
  encoded by the fast tokenizer (``tokenizers.Tokenizer.encode_batch``, all cores) in one call. The texts
  are taken from a first format run's outputs (the examples the length filter dropped are not in them, so
  the floor is, if anything, low);
- ``cmv format`` (the real CLI, tiny recipe: SmolLM2's tokenizer and template);
- ``cmv format`` with the hand-off checks off (the input not hashed against the clean stage's _SUCCESS), so
  that the cost of verification is measured.

Targets (issue 24): format wall <= 1.5x the tokenizer floor; verification < 5% of the stage's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_clean import FLOOR, UNVERIFIED_SITE, run_measured  # noqa: E402

TOKENIZER_FLOOR = """
import json, sys, orjson
from pathlib import Path
import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from cmv_core import storage

conversations, texts_file, tok_dir = sys.argv[1:4]
n = 0
with storage.open_read(conversations, "rb") as f:
    for line in f:
        if line.strip():
            orjson.loads(line)
            n += 1
tok_dir = Path(tok_dir)
config = json.loads((tok_dir / "tokenizer_config.json").read_text())

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
env.globals["raise_exception"] = raise_exception
template = env.from_string((tok_dir / "chat_template.jinja").read_text())
special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
work = orjson.loads(Path(texts_file).read_bytes())
texts = [template.render(messages=c, add_generation_prompt=False, **special) for c in work["conversations"]]
texts += work["texts"]
tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
print(n, len(texts), sum(len(e.ids) for e in encoded))
"""


def floor_work(format_dir: Path, out: Path) -> tuple[int, int]:
    """The conversations the stage renders and the texts it tokenizes alone, from its outputs, to ``out``."""
    conversations, texts = [], []
    for split in ("train", "val", "test"):
        for line in (format_dir / f"{split}.jsonl").read_text().splitlines():
            messages = json.loads(line)["messages"]
            conversations.append(messages)
            texts.append(messages[-1]["content"])  # the target, tokenized alone
    for split in ("train", "val"):
        path = format_dir / f"{split}_preferences.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            conversations += [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
            texts += [row["chosen"][0]["content"], row["rejected"][0]["content"]]
    out.write_text(json.dumps({"conversations": conversations, "texts": texts}))
    return len(conversations), len(texts)


def cmv(py: str, *args: str) -> list[str]:
    return [py, "-m", "cmv_core.cli", *args, "--force", "--log-level", "WARNING"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=25000)
    ap.add_argument("--dump", default=None, help="default: benchmarks/data/synth_cmv_<threads>.jsonlist")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest is reported")
    args = ap.parse_args()
    dump = Path(args.dump or REPO / "benchmarks" / "data" / f"synth_cmv_{args.threads}.jsonlist")
    py = sys.executable
    if not dump.exists():
        print(f"generating {dump} ...", flush=True)
        synth = [py, str(REPO / "benchmarks" / "synth_dump.py"), "--threads", str(args.threads), "--output", str(dump)]
        subprocess.run(synth, check=True, cwd=REPO)
    from cmv_core.models import resolve_model

    tok_dir = resolve_model("embedded:tiny-random-llama")
    work = Path(tempfile.mkdtemp(prefix="cmv-bench-format-"))
    try:
        clean, fmt = work / "clean", work / "format"
        subprocess.run(cmv(py, "clean", "--input", str(dump), "--output", str(clean)), check=True, cwd=REPO)
        fmt_cmd = cmv(py, "format", "--input", str(clean), "--output", str(fmt), "--config", "configs/tiny.yaml")
        subprocess.run(fmt_cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)  # warm-up; its outputs feed the floor
        n_conv, n_texts = floor_work(fmt, work / "floor_texts.json")
        site = work / "unverified-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(UNVERIFIED_SITE)
        unverified = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
        conversations = str(clean / "conversations.jsonl.gz")
        load = os.getloadavg()[0]
        runs: dict[str, list] = {k: [] for k in ("read", "tokenize", "format", "unverified")}
        for _ in range(args.repeat):
            runs["read"].append(run_measured([py, "-c", FLOOR, conversations]))
            floor_cmd = [py, "-c", TOKENIZER_FLOOR, conversations, str(work / "floor_texts.json"), str(tok_dir)]
            runs["tokenize"].append(run_measured(floor_cmd))
            runs["format"].append(run_measured(fmt_cmd))
            runs["unverified"].append(run_measured(fmt_cmd, unverified))
        size = (clean / "conversations.jsonl.gz").stat().st_size / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nformat of {args.threads:,} threads (conversations.jsonl.gz {size:,.0f} MiB); the floor renders "
        f"{n_conv:,} conversations and tokenizes them and {n_texts:,} replies/targets; "
        f"{os.cpu_count()} cores, load average {load:.1f} before"
    )
    print_table(runs)
    return 0


def print_table(runs: dict[str, list]) -> None:
    read_s = min(runs["read"])[0]
    floor_s = min(runs["tokenize"])[0]
    rows = [
        ("read", "read floor (read + orjson.loads each line)"),
        ("tokenize", "tokenizer floor (+ template, encode_batch)"),
        ("format", "cmv format (tiny recipe)"),
        ("unverified", "  same, hand-off checks off"),
    ]
    print(f"{'':44s} {'wall':>8s} {'CPU':>8s} {'peak RSS':>10s} {'/read':>7s} {'/tokenizer floor':>17s}")
    for key, label in rows:
        wall, rss, _, cpu = min(runs[key])
        print(f"{label:44s} {wall:7.1f}s {cpu:7.1f}s {rss:6.0f} MiB {wall / read_s:6.2f}x {wall / floor_s:16.2f}x")
    fmt_s, unverified_s = min(runs["format"])[0], min(runs["unverified"])[0]
    # CPU seconds too: on a shared machine the wall ratio mostly measures the other tenants
    cpu_ratio = min(runs["format"])[3] / min(runs["tokenize"])[3]
    print(
        f"format / tokenizer floor: {fmt_s / floor_s:.2f}x wall, {cpu_ratio:.2f}x CPU (target <= 1.5x); "
        f"verification: {100 * (fmt_s / unverified_s - 1):+.1f}% of wall (target < 5%)"
    )


if __name__ == "__main__":
    sys.exit(main())
