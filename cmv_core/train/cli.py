"""``cmv train``: the stage's arguments, and the dispatch to SFT (:mod:`cmv_core.train.sft`) or DPO
(:mod:`cmv_core.train.dpo`, ``--method dpo``)."""

from __future__ import annotations

import argparse

from cmv_core.config import load_recipe, model_spec, section
from cmv_core.train.checkpoints import EXIT_PREEMPTED
from cmv_core.train.config import TrainConfig, resolve_deepspeed_config
from cmv_core.train.dpo import dpo_section, run_dpo
from cmv_core.train.sft import run_train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="the format stage's output (dir or URI with _SUCCESS)")
    parser.add_argument("--output", required=True, help="where model/, checkpoints/, metrics.json go (dir or s3://)")
    parser.add_argument(
        "--method",
        choices=("sft", "dpo"),
        default="sft",
        help="sft (the recipe's train: section) or dpo (its dpo: section over train:)",
    )
    parser.add_argument(
        "--init", help="dpo: the train output to start from (the SFT run), or 'base'; default: the recipe's dpo.init"
    )


def cli_main(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.config, args.set)
    if args.method == "dpo":
        cfg = dpo_section(recipe)
    else:
        cfg = section(recipe, "train", TrainConfig)
    if cfg.deepspeed:
        cfg.deepspeed = resolve_deepspeed_config(cfg.deepspeed, recipe.get("_source"))
    if args.method == "dpo":
        result = run_dpo(
            args.input,
            args.output,
            cfg,
            model_spec(recipe),
            init=args.init or cfg.init,
            run_id=args.run_id,
            force=args.force,
        )
    else:
        result = run_train(args.input, args.output, cfg, model_spec(recipe), run_id=args.run_id, force=args.force)
    if result is not None and result.get("preempted"):
        return EXIT_PREEMPTED
    return 0
