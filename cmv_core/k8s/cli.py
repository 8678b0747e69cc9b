"""``cmv k8s render|submit|status``: the arguments, and each command from a rendered :class:`Plan`.

Heavy imports (``kubernetes``, ``yaml``) happen inside functions: the clean image has neither.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from cmv_core.k8s.api import api_error_line, connect
from cmv_core.k8s.names import OVERLAYS, PIPELINE, K8sError
from cmv_core.k8s.render import Plan, plan, render, render_objects
from cmv_core.k8s.settings import run_settings
from cmv_core.k8s.submit import ARGO_HAS_NO_DPO, argo_template, status, submit, submit_argo


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overlay", default="dev", help=f"k8s/overlays/<name>: {', '.join(OVERLAYS)} (default: dev)")
    p.add_argument("--run-id", help="the run (Job names cmv-<stage>-<run id>); default: the overlay's RUN_ID")
    p.add_argument("--nodes", type=int, help="train over this many nodes (NNODES)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs and torchrun processes per train pod (NPROC_PER_NODE)")
    p.add_argument("--recipe", help="recipe inside the image (configs/...) or s3:// URI (CMV_RECIPE)")
    p.add_argument("--model", help="model spec (CMV_MODEL)")
    p.add_argument("--artifact-root", help="where runs live, e.g. s3://bucket/runs (ARTIFACT_ROOT)")
    p.add_argument("--raw-input", help="the raw dump for clean (RAW_INPUT)")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other pipeline.env value (repeatable), e.g. --setting INPUT_WAIT_S=600",
    )
    p.add_argument("--registry", help="image registry, e.g. registry.example.com/cmv (as in make push)")
    p.add_argument("--tag", help="image tag (as in make push; default: `git describe --always --dirty`, as make)")
    p.add_argument("--k8s-dir", help="the kustomize tree (default: the repository's k8s/)")
    p.add_argument(
        "--dpo",
        action="store_true",
        help="with the DPO stage (k8s/components/dpo): a second train Job after train, from the "
        "SFT output, and generate's dpo variant; the recipe needs a dpo: section. Not with the "
        "jobset overlay or --engine argo",
    )


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--namespace", help="default: the kubeconfig context's namespace, else 'default'")
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--no-store-check",
        action="store_true",
        help="do not look for _SUCCESS in the artifact store from here; trust the Jobs' status",
    )


def _engine_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=["jobs", "argo"],
        default="jobs",
        help="jobs: one Job per stage, run in order from here (default, nothing to install); "
        "argo: one Argo WorkflowTemplate running the whole DAG in the cluster (overlay jobset)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="k8s_command", required=True)

    p = sub.add_parser("render", help="print the manifests of a run (kubectl apply -f - them, or inspect)")
    _common_arguments(p)
    _engine_argument(p)
    p.add_argument("--stage", choices=PIPELINE, help="only this stage's kustomization (with the ConfigMap)")

    p = sub.add_parser("submit", help="run the pipeline's Jobs in order, stream logs, stop on failure, resume")
    _common_arguments(p)
    _cluster_arguments(p)
    p.add_argument(
        "--stages",
        nargs="+",
        choices=PIPELINE,
        help="run only these, in this order (default: every stage of the run; dpo with --dpo)",
    )
    p.add_argument("--poll", type=float, default=5, help="seconds between Job status checks")
    p.add_argument("--stage-timeout", type=float, default=0, help="give up waiting on a stage after this (0: never)")
    p.add_argument("--tail", type=int, default=40, help="log lines shown from a failed pod")
    _engine_argument(p)

    p = sub.add_parser("status", help="each stage's Job state and _SUCCESS for a run")
    _common_arguments(p)
    _cluster_arguments(p)


def _settings_from_args(args: argparse.Namespace) -> dict[str, str]:
    return run_settings(
        args.run_id,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        recipe=args.recipe,
        model=args.model,
        artifact_root=args.artifact_root,
        raw_input=args.raw_input,
        extra=args.setting,
    )


def _plan_from_args(args: argparse.Namespace) -> Plan:
    settings = _settings_from_args(args)
    objects = render_objects(
        args.overlay, settings=settings, registry=args.registry, tag=args.tag, k8s_dir=args.k8s_dir, dpo=args.dpo
    )
    return plan(objects)


def _print(line: str) -> None:
    print(line, flush=True)


def _render_command(args: argparse.Namespace) -> int:
    settings = _settings_from_args(args)
    if args.engine == "argo":
        import yaml

        run = _plan_from_args(args)
        sys.stdout.write(yaml.safe_dump_all([run.config, argo_template(run)], sort_keys=False))
        return 0
    sys.stdout.write(
        render(
            args.overlay,
            stage=args.stage,
            settings=settings,
            registry=args.registry,
            tag=args.tag,
            k8s_dir=args.k8s_dir,
            dpo=args.dpo,
        )
    )
    return 0


@contextlib.contextmanager
def _fast_store_checks():
    """The store check is a convenience: a store unreachable from here should fail fast, not retry for a
    minute. Only for this command: the process's environment is restored after it (a caller that goes on,
    a notebook or a test, keeps its own S3 retries)."""
    before = os.environ.get("CMV_S3_MAX_ATTEMPTS")
    os.environ.setdefault("CMV_S3_MAX_ATTEMPTS", "2")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CMV_S3_MAX_ATTEMPTS", None)


def _cluster_command(args: argparse.Namespace) -> int:
    """``status`` or ``submit``: render the run, connect, and run the command."""
    with _fast_store_checks():
        return _run_cluster_command(args)


def _run_cluster_command(args: argparse.Namespace) -> int:
    run = _plan_from_args(args)
    cluster = connect(args.namespace, args.context)
    if args.k8s_command == "status":
        rows = status(cluster, run, check_store=not args.no_store_check)
        _print(f"run {run.run_id} in namespace {cluster.namespace} (artifacts: {run.stage_uri('')})")
        _print(f"{'stage':<10} {'job':<32} {'state':<10} {'_SUCCESS':<9} pods")
        for r in rows:
            success = {True: "yes", False: "no", None: "?"}[r.success]
            stale = f"  (to run again: {r.stale})" if r.stale else ""
            _print(f"{r.stage:<10} {r.job:<32} {r.state:<10} {success:<9} {r.pods}{stale}")
        return 0
    if args.engine == "argo":
        return submit_argo(cluster, run, out=_print)
    return submit(
        cluster,
        run,
        stages=args.stages,
        check_store=not args.no_store_check,
        poll_s=args.poll,
        stage_timeout_s=args.stage_timeout,
        tail=args.tail,
        out=_print,
    )


def cli_main(args: argparse.Namespace) -> int:
    try:
        if args.dpo and getattr(args, "engine", "jobs") == "argo":
            raise K8sError(ARGO_HAS_NO_DPO)
        if args.k8s_command == "render":
            return _render_command(args)
        return _cluster_command(args)
    except K8sError as exc:
        print(f"cmv k8s {args.k8s_command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the API's answer after the retries, in one line instead of a traceback
        try:
            from kubernetes.client.exceptions import ApiException
            from urllib3.exceptions import HTTPError
        except ImportError:
            raise exc from None
        if not isinstance(exc, (ApiException, HTTPError)):
            raise
        print(f"cmv k8s {args.k8s_command}: error: {api_error_line(exc)}", file=sys.stderr)
        return 2
