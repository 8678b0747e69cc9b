"""The ``cmv`` command: one subcommand per stage, plus ``run`` (local pipeline) and ``k8s``.

Stage modules are imported only when their subcommand is chosen, so the clean
image (no torch) can run ``cmv clean`` and ``cmv --help`` stays fast.

One error path: an expected fault is a ``cmv_core.errors.CmvError`` (or an S3
error that outlived botocore's retries), caught here once and printed as one
line on stderr: exit 2 for bad input or settings, 1 for a failure after
retries, 143 for SIGTERM, 129 for SIGHUP. No traceback for any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time

from cmv_core import stages

# The ``cmv`` subcommand of each stage image -> its entry module (dpo is ``cmv train --method dpo``).
STAGE_MODULES = {s.command: s.entry for s in stages.PIPELINE if s.name == s.command}
STAGE_HELP = {s.command: s.help for s in stages.PIPELINE if s.name == s.command}
PIPELINE = [s.name for s in stages.PIPELINE]  # dpo: only when the recipe has a dpo: section


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common")
    group.add_argument("--config", help="YAML recipe (path or URI), e.g. configs/demo.yaml")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set train.max_steps=5",
    )
    group.add_argument("--run-id", help="run id recorded in the manifest (default: the parent folder of --output)")
    group.add_argument("--force", action="store_true", help="rerun even if the output's _SUCCESS matches")
    group.add_argument(
        "--wait-for-input",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to this long for the inputs' _SUCCESS before failing (for cluster Jobs)",
    )
    group.add_argument("--log-level", default=os.environ.get("CMV_LOG_LEVEL", "INFO"))


def _stage_names(argv: list[str]) -> str | None:
    for a in argv:
        if not a.startswith("-"):
            return a
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmv", description="cmv-persuasion pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    for stage, module_name in STAGE_MODULES.items():
        p = sub.add_parser(stage, help=STAGE_HELP[stage], description=STAGE_HELP[stage])
        # Import a stage module only when it is the one being run (or for --help of it).
        if only == stage:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            add_common_arguments(p)
            p.set_defaults(func=module.cli_main)
    p = sub.add_parser("run", help="run the pipeline locally, stage after stage, as processes")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("--root", default="runs", help="artifact root (path or s3:// URI)")
    p.add_argument("--run-id", default="demo")
    p.add_argument("--stages", nargs="+", choices=PIPELINE, default=PIPELINE)
    p.add_argument("--input", action="append", help="raw dump(s) for clean (default: the bundled sample)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=run_local)
    p = sub.add_parser("k8s", help="render, submit and watch the pipeline on Kubernetes")
    if only == "k8s":
        module = importlib.import_module("cmv_core.k8s.cli")
        module.add_arguments(p)
        p.set_defaults(func=module.cli_main)
    return parser


def stage_uri(root: str, run_id: str, stage: str) -> str:
    from cmv_core import storage

    return storage.join(root, run_id, stage)


def stage_argv(stage: str, root: str, run_id: str, config: str, raw_inputs: list[str], dpo: bool = False) -> list[str]:
    """The ``cmv <stage>`` arguments for one stage of a run under ``root/run_id``."""
    out = stage_uri(root, run_id, stage)
    if stage == "clean":
        args = [a for i in raw_inputs for a in ("--input", i)]
    elif stage == "format":
        args = ["--input", stage_uri(root, run_id, "clean")]
    elif stage == "train":
        args = ["--input", stage_uri(root, run_id, "format")]
    elif stage == "dpo":  # a second train stage: DPO from the SFT output
        stage, args = (
            "train",
            [
                "--method",
                "dpo",
                "--input",
                stage_uri(root, run_id, "format"),
                "--init",
                stage_uri(root, run_id, "train"),
            ],
        )
    elif stage == "generate":
        args = ["--data", stage_uri(root, run_id, "format"), "--trained", stage_uri(root, run_id, "train")]
        args += ["--dpo", stage_uri(root, run_id, "dpo")] if dpo else []
    else:
        args = ["--generations", stage_uri(root, run_id, "generate"), "--data", stage_uri(root, run_id, "format")]
    return [stage, *args, "--output", out, "--config", config, "--run-id", run_id]


def bundled_sample() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "data" / "sample_cmv.jsonlist")


def run_local(args: argparse.Namespace) -> int:
    """Run stages as separate processes, as the cluster would run separate Jobs."""
    from cmv_core import storage
    from cmv_core.config import load_recipe, validate_recipe
    from cmv_core.stages import dpo_enabled

    # Check: every stage's settings, the root and the run id, before the first stage starts
    storage.check_run_id(args.run_id)
    storage.check_uri(args.root)
    for uri in args.input or []:
        storage.check_uri(uri)
    recipe = load_recipe(args.config, args.set)
    dpo = dpo_enabled(recipe)
    validate_recipe(recipe, [s for s in args.stages if s != "dpo" or dpo])
    raw = args.input or [bundled_sample()]
    started = time.monotonic()
    forked = _preload([s for s in args.stages if s != "dpo" or dpo])
    walls: list[tuple[str, float]] = []
    for stage in args.stages:
        if stage == "dpo" and not dpo:
            continue
        argv = stage_argv(stage, args.root, args.run_id, args.config, raw, dpo=dpo)
        argv += [a for s in args.set for a in ("--set", s)]
        if args.force:
            argv.append("--force")
        cmd = [sys.executable, "-m", "cmv_core.cli", *argv]
        print(f"\n=== {stage}: {shlex.join(['cmv', *argv])}", flush=True)
        stage_started = time.monotonic()
        rc = _run_stage_process(cmd, fork=forked)
        walls.append((stage, time.monotonic() - stage_started))
        if rc != 0:
            print(f"stage {stage} failed with exit code {rc}; later stages not run", file=sys.stderr)
            return rc
    artifacts = stage_uri(args.root, args.run_id, "")
    print(f"\npipeline finished in {time.monotonic() - started:.0f} s; artifacts under {artifacts}")
    # each stage is its own process: its wall time includes interpreter start, imports and model loading
    print("stage wall times: " + ", ".join(f"{name} {s:.1f} s" for name, s in walls))
    if "judge" in args.stages:
        print(f"report: {stage_uri(args.root, args.run_id, 'judge')}/report.md")
    return 0


# What the model stages import (transformers alone is seconds: it scans its model tree on import).
PRELOAD = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def _preload(stages_to_run: list[str]) -> bool:
    """Import the model stages' libraries once in ``cmv run`` when a stage after clean needs them, so
    that each stage, forked from here (still its own process, as a Job would be), skips the seconds
    of imports; the demo runs five such stages. False (stages started from scratch) without fork."""
    if not hasattr(os, "fork") or not set(stages_to_run) - {"clean"}:
        return False
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # an image without the train extra: the rest still helps
            importlib.import_module(name)
    return True


class _ForkedStage:
    """A stage run by ``main`` in a forked child: the Popen methods ``_run_stage_process`` uses."""

    def __init__(self, argv: list[str]):
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            self._child(argv)

    @staticmethod
    def _child(argv: list[str]) -> None:
        import atexit
        import traceback

        rc = 1
        try:
            for s in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(s, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logging.root.handlers.clear()  # the stage's own --log-level, as in a fresh process
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - what an uncaught exception does to a fresh process
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(rc)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self) -> int:
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
                return os.waitstatus_to_exitcode(status)
            except InterruptedError:
                continue


def _run_stage_process(cmd: list[str], fork: bool = False) -> int:
    """Run one stage as a child process (forked from ``cmv run`` when it preloaded the libraries); a
    SIGTERM (or SIGINT) to ``cmv run`` is passed on to the stage, which stops the way a stage stops on
    SIGTERM (its own one line, exit 143, leases released), instead of the child being killed outright
    when the wait is interrupted."""
    child = _ForkedStage(cmd[3:]) if fork else subprocess.Popen(cmd)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = child.wait()
        return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's convention
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_for_inputs(args: argparse.Namespace) -> None:
    """In a cluster, a stage Job may start before its upstream Job finished: wait, bounded."""
    from cmv_core import storage

    for name in ("input", "data", "generations", "trained"):
        value = getattr(args, name, None)
        for uri in value if isinstance(value, list) else [value]:
            if uri and not str(uri).startswith("embedded:"):
                storage.wait_for_success(uri, timeout_s=args.wait_for_input)


# Signals that stop a stage the way SIGTERM does: its finally blocks run, its lease is released
# (README, "Inputs and outputs"). SIGHUP is a closed terminal or ssh session; only SIGKILL skips this.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _on_sigterm(signum, frame):
    from cmv_core.errors import Terminated

    name = signal.Signals(signum).name
    exc = Terminated(f"stopped by {name}; no _SUCCESS written, rerun the same command to resume or start over")
    exc.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 129 for SIGHUP
    raise exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_stage_names(argv))
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", None) or os.environ.get("CMV_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from botocore.exceptions import BotoCoreError, ClientError

    from cmv_core import errors, storage

    rerun = shlex.join(["cmv", *argv])
    previous = {s: signal.signal(s, _on_sigterm) for s in STOP_SIGNALS}
    try:
        if args.command in STAGE_MODULES:
            if args.run_id is not None:
                storage.check_run_id(args.run_id)
            storage.check_uri(args.output)
        if getattr(args, "wait_for_input", 0) and args.command in STAGE_MODULES and args.command != "clean":
            _wait_for_inputs(args)
        return int(args.func(args) or 0)
    except (errors.CmvError, errors.Terminated) as exc:
        hint = f"; rerun: {rerun}" if exc.exit_code == errors.EXIT_FAILURE else ""
        print(f"cmv {args.command}: error: {_one_line(exc)}{hint}", file=sys.stderr, flush=True)
        return exc.exit_code
    except FileNotFoundError as exc:
        print(f"cmv {args.command}: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return errors.EXIT_BAD_INPUT
    except (BotoCoreError, ClientError) as exc:
        print(
            f"cmv {args.command}: error: S3 failed after retries ({type(exc).__name__}: {_one_line(exc)}); "
            f"no _SUCCESS written; rerun: {rerun}",
            file=sys.stderr,
            flush=True,
        )
        return errors.EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        storage.release_all()


if __name__ == "__main__":
    sys.exit(main())
