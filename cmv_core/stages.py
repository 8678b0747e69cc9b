"""The one stage graph: every stage's name, inputs, outputs, image, extra and entry.

The CLI (``cmv <stage>``, ``cmv run``), the hand-off contract (``storage``), the Kubernetes
renderer and submitter, the Argo template and the image builds all read this table, so a new
stage is added here once (docs/ARCHITECTURE.md, "Adding a stage"). Plain data: nothing here
imports a stage package; entries are module names, imported only by the command that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    # The ``cmv`` subcommand (and the ``_SUCCESS`` stage name) that runs this step: dpo is ``cmv train --method dpo``.
    command: str
    # The module with ``add_arguments(parser)`` and ``cli_main(args)``; what ``jobs/<command>.py`` runs.
    entry: str
    # The pyproject extra that the stage's image installs (images/<command>.Dockerfile).
    extra: str
    # The pipeline steps whose outputs this step reads (besides the raw dump for clean).
    reads: tuple[str, ...]
    # Files its ``_SUCCESS`` must list, and patterns of the files it may also write.
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    # The recipe section that configures it, as "module:Class" (imported only when validated).
    config: str | None = None
    # Runs only when the recipe asks for it (``dpo_enabled``).
    opt_in: bool = False


_TRAIN_OUTPUTS = (("metrics.json", "loss.png", "model/config.json"), ("model/*", "adapter/*", "checkpoints/*"))

# In pipeline order: ``cmv run`` runs them top to bottom, the submitter creates their Jobs in this order.
PIPELINE: tuple[Stage, ...] = (
    Stage(
        name="clean",
        help="raw CMV dump -> conversations with deltas and winning branches",
        command="clean",
        entry="cmv_core.clean.stage",
        extra="clean",
        reads=(),
        required=("conversations.jsonl.gz", "rejects.jsonl.gz", "stats.json"),
        config="cmv_core.clean.config:CleanConfig",
    ),
    Stage(
        name="format",
        help="conversations -> SFT train/val/test + judge calibration pairs",
        command="format",
        entry="cmv_core.format.stage",
        extra="format",
        reads=("clean",),
        required=("train.jsonl", "val.jsonl", "test.jsonl", "pairs.jsonl", "stats.json"),
        optional=("train_preferences.jsonl", "val_preferences.jsonl", "pairs_before.jsonl"),
        config="cmv_core.format.config:FormatConfig",
    ),
    Stage(
        name="train",
        help="SFT (LoRA or full) with TRL, PEFT, DeepSpeed",
        command="train",
        entry="cmv_core.train.cli",
        extra="train",
        reads=("format",),
        required=_TRAIN_OUTPUTS[0],
        optional=_TRAIN_OUTPUTS[1],
        config="cmv_core.train.config:TrainConfig",
    ),
    Stage(
        name="dpo",
        help="DPO from the SFT model on the train split's preference pairs",
        command="train",
        entry="cmv_core.train.cli",
        extra="train",
        reads=("format", "train"),
        required=_TRAIN_OUTPUTS[0],
        optional=_TRAIN_OUTPUTS[1],
        # read over train: (dpo_over_train)
        config="cmv_core.train.config:TrainConfig",
        opt_in=True,
    ),
    Stage(
        name="generate",
        help="replies for every test prompt, per model variant",
        command="generate",
        entry="cmv_core.generate.stage",
        extra="generate",
        reads=("format", "train"),
        required=("generations.jsonl", "stats.json"),
        optional=("shards/*",),
        config="cmv_core.generate.config:GenerateConfig",
    ),
    Stage(
        name="judge",
        help="LLM-as-judge scores, pairwise comparisons, calibration, report",
        command="judge",
        entry="cmv_core.judge.stage",
        extra="judge",
        reads=("generate", "format"),
        required=("judgments.jsonl", "report.json", "report.md"),
        optional=("*.png", "*.json", "*.md", "*.csv", "cache/*"),
        config="cmv_core.judge.config:JudgeConfig",
    ),
)
STAGES: dict[str, Stage] = {s.name: s for s in PIPELINE}
# The ``cmv`` subcommands, one image each (images/<command>.Dockerfile, k8s/base/<command>/).
COMMANDS: tuple[str, ...] = tuple(dict.fromkeys(s.command for s in PIPELINE))
OPT_IN: tuple[str, ...] = tuple(s.name for s in PIPELINE if s.opt_in)


def upstream(step: str, dpo: bool = False) -> list[str]:
    """The pipeline steps whose outputs ``step`` reads; generate reads the dpo output too in a run with dpo."""
    return list(STAGES[step].reads) + (["dpo"] if dpo and step == "generate" else [])


def accepted_inputs(command: str) -> tuple[str, ...]:
    """The ``_SUCCESS`` stage names that a ``cmv <command>`` accepts as inputs (dpo's manifest says train)."""
    steps = [s for s in PIPELINE if s.command == command]
    reads = [STAGES[r].command for s in steps for r in (*s.reads, *(["dpo"] if s.name == "generate" else []))]
    return tuple(dict.fromkeys(reads))


def outputs(command: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional patterns) of the files a ``cmv <command>`` output holds."""
    stage = next(s for s in PIPELINE if s.command == command)
    return stage.required, stage.optional


def dpo_enabled(recipe: dict) -> bool:
    """Whether a run has the dpo step: a ``dpo:`` section whose ``enabled`` is not false."""
    dpo = recipe.get("dpo")
    return isinstance(dpo, dict) and dpo.get("enabled", True) is not False


def dpo_over_train(recipe: dict) -> dict:
    """The recipe's ``dpo:`` section over its ``train:`` section (dpo wins), as written (no defaults).

    What the dpo step trains with, and what ``cmv k8s submit`` compares with a dpo ``_SUCCESS``."""
    train, dpo = recipe.get("train") or {}, recipe.get("dpo") or {}
    merged = {k: v for k, v in train.items() if k not in ("packing", "packing_strategy")}  # SFT-only
    return {**merged, **dpo}
