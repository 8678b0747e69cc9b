"""TRL's SFT step against a bare PyTorch loop on the same batches and the same model, in one process.

    .venv/bin/python benchmarks/train_vs_bare.py --format DIR --config demo --steps 6

The trainer is built exactly as the train stage builds it (cmv_core.train.sft: the training chat template,
the LoRA config, SFTConfig from the recipe). Its first ``steps`` collated batches are taken from its own
dataloader; then, alternating so that both see the same machine load:

- TRL: ``trainer.train()`` for ``steps`` optimizer steps, timed per step by a callback (``on_step_begin`` to
  ``on_step_end``: forward with TRL's fused LM head, metrics, backward, clipping, optimizer, scheduler);
- bare: a fresh copy of the same base model with the same LoRA adapter (same seed), ``model(**batch).loss``
  (transformers' own loss), ``backward``, ``clip_grad_norm_`` (the recipe's max_grad_norm), AdamW ``step``,
  ``zero_grad``, on those same batches.

Tokens/s counts the attention mask's ones (real tokens) over steps 2..N (the first is warm-up). Prints the
ratio TRL / bare beside the target (>= 0.85x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 0.85


def build_trainer(fmt: str, recipe: dict, steps: int, scratch: Path):
    """The stage's SFTTrainer (same template, datasets, LoRA, args), no checkpoints, no eval; its step timer."""
    import dataclasses

    from transformers import TrainerCallback

    from cmv_core.config import section
    from cmv_core.models import load_tokenizer, resolve_model
    from cmv_core.train.config import TrainConfig
    from cmv_core.train.sft import load_conversations, sft_config, sft_datasets, sft_trainer, use_training_template

    cfg = section(recipe, "train", TrainConfig)
    cfg = dataclasses.replace(cfg, max_steps=steps, save_steps=10_000, eval_steps=None, eval_on_start=False)
    args = sft_config(cfg, scratch, has_eval=False)
    args.eval_strategy, args.save_strategy = "no", "no"
    train_rows, _ = load_conversations(fmt, cfg)
    model_path = resolve_model(recipe["model"])
    tokenizer = load_tokenizer(model_path)
    _, masking = use_training_template(tokenizer, train_rows)
    train_ds, _ = sft_datasets(train_rows, [], masking)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.tokens: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.t0)
            self.tokens.append(state.num_input_tokens_seen - self.seen)

    timer = StepTimer()
    trainer = sft_trainer(model_path, cfg, args, train_ds, None, tokenizer, [timer])
    return trainer, timer, cfg, model_path


def bare_loop(model_path: str, cfg, batches: list[dict], seed: int) -> list[float]:
    """Seconds per step of forward/backward/clip/AdamW on ``batches`` with a fresh LoRA model."""
    import torch
    from peft import get_peft_model

    from cmv_core.train.model import load_model, lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_model(model_path, cfg), lora_config(cfg))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    seconds = []
    for batch in batches:
        t0 = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
    return seconds


def compare(fmt: str, config: str, steps: int, scratch: Path) -> float:
    """Print TRL vs bare tokens/s for one recipe; returns the ratio."""
    from itertools import islice

    from cmv_core.config import load_recipe

    recipe = load_recipe(str(REPO / "configs" / f"{config}.yaml"))
    trainer, timer, cfg, model_path = build_trainer(fmt, recipe, steps, scratch)
    batches = [dict(b) for b in islice(trainer.get_train_dataloader(), steps)]
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    trainer.train()
    bare = bare_loop(model_path, cfg, batches, seed=trainer.args.seed)
    # the trainer's own count (non-padding tokens) of the batches it drew: the same as ``tokens`` when its
    # seeded sampler drew the same ones
    if timer.tokens != tokens:
        print(f"  note: TRL drew batches of {timer.tokens} tokens, the bare loop ran {tokens}")
    trl_tps = sum(timer.tokens[1:]) / sum(timer.seconds[1:])
    bare_tps = sum(tokens[1:]) / sum(bare[1:])
    ratio = trl_tps / bare_tps
    print(
        f"{config:<8} TRL SFT {trl_tps:8.1f} tokens/s ({sum(timer.seconds[1:]):.2f} s), bare loop {bare_tps:8.1f} "
        f"tokens/s ({sum(bare[1:]):.2f} s) over steps 2..{steps}: TRL/bare {ratio:.2f}x (target >= {TARGET}x)",
        flush=True,
    )
    return ratio


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default=None, help="a format-stage output (default: bench_train's synthetic threads)")
    p.add_argument("--configs", nargs="+", default=["tiny", "demo"])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bare-") as work:
        fmt = args.format
        if fmt is None:
            from bench_train import write_data

            fmt = write_data(str(Path(work) / "format"), n_train=64, n_val=2, mean_words=150)
        for config in args.configs:
            scratch = Path(work) / config
            scratch.mkdir()
            compare(fmt, config, args.steps, scratch)


if __name__ == "__main__":
    main()
