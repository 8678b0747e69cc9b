"""``metrics.json`` and ``loss.png`` of a training run (SFT's loss; DPO's loss and reward margins)."""

from __future__ import annotations

import resource

from cmv_core import storage


def write_loss_plot(history: list[dict], uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    margins = [(h["step"], h["rewards/margins"]) for h in history if "rewards/margins" in h]
    eval_margins = [(h["step"], h["eval_rewards/margins"]) for h in history if "eval_rewards/margins" in h]
    if margins:  # DPO: loss on the left, the reward margin (chosen - rejected) on the right
        fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        right.plot(*zip(*margins), label="train reward margin", marker="." if len(margins) < 50 else None)
        if eval_margins:
            right.plot(*zip(*eval_margins), label="eval reward margin (val)", marker="o", linestyle="--")
        right.axhline(0, color="grey", linewidth=0.8)
        right.set_xlabel("optimizer step")
        right.set_ylabel("reward margin (chosen - rejected)")
        right.grid(alpha=0.3)
        right.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss (val)", marker="o", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss" if margins else "loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version/date: stable bytes
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()), "peak_memory_kind": "cuda_allocated"}
    return {
        "peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "peak_memory_kind": "cpu_max_rss",
    }


TRAIN_LOG_KEYS = (
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "num_tokens",
    "mean_token_accuracy",
    "num_input_tokens_seen",
)
# What DPOTrainer logs besides the loss (train; "eval_" + these on val)
PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def build_metrics(state, throughput, *, final_eval: dict | None, extra: dict) -> dict:
    history = state.log_history
    train_loss = [{k: h[k] for k in TRAIN_LOG_KEYS + PREFERENCE_KEYS if k in h} for h in history if "loss" in h]
    # the final evaluate() repeats the last periodic eval when they fall on the same step: keep one per step
    eval_keys = ("eval_loss",) + tuple("eval_" + k for k in PREFERENCE_KEYS)
    eval_loss = list(
        {
            h["step"]: {"step": h["step"], **{k: h[k] for k in eval_keys if k in h}}
            for h in history
            if "eval_loss" in h
        }.values()
    )
    return {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "final_eval_loss": (final_eval or {}).get("eval_loss"),
        "final_eval": {k: v for k, v in (final_eval or {}).items() if k in eval_keys},
        "tokens_seen": int(state.num_input_tokens_seen),
        "tokens_per_second": throughput.tokens_per_second(),
        **peak_memory(),
        **extra,
    }
