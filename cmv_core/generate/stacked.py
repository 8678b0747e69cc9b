"""Two LoRA adapters, one trained on top of the other, as ONE adapter on the base model.

DPO trains a LoRA on the SFT model, which is the base model plus the SFT adapter:
``W + s1 B1 A1 + s2 B2 A2``. That sum is itself a LoRA of rank ``r1 + r2``:
``A = [A1; A2]``, ``B = [s1 B1 | s2 B2]`` at scaling 1 (PEFT's "cat" combination). As one
adapter on the base model, vLLM serves the DPO model from the base model's engine through
a ``LoRARequest``, beside base and SFT, instead of starting a second engine on the merged SFT
weights; the transformers backend merges the same adapter, so both backends run identical weights.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from cmv_core import storage
from cmv_core.generate.config import InputError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _scaling(cfg: dict, where: str) -> float:
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise InputError(f"{where}: cannot stack a LoRA adapter with {key} set")
    if cfg.get("use_dora") or (cfg.get("bias") or "none") != "none":
        raise InputError(f"{where}: cannot stack a DoRA adapter or one with trained biases")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha") or cfg["r"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _load(adapter: str) -> tuple[dict, dict, int, float]:
    """(config, tensors, rank, scaling) of a PEFT adapter dir or URI."""
    from safetensors.torch import load_file

    local = Path(storage.materialize_dir(adapter))
    if not (local / WEIGHTS).exists():
        raise InputError(f"{adapter}: no {WEIGHTS} (an adapter saved by PEFT with safetensors)")
    cfg = storage.read_json(str(local / CONFIG))
    return cfg, load_file(str(local / WEIGHTS)), int(cfg["r"]), _scaling(cfg, adapter)


def _modules(tensors: dict) -> set[str]:
    return {k.rsplit(".lora_A.", 1)[0] for k in tensors if ".lora_A." in k}


def stacked_tensors(lower: tuple[dict, int, float], upper: tuple[dict, int, float]) -> dict:
    """The rank r1+r2 tensors, scaling 1, of ``lower`` (tensors, rank, scaling) plus ``upper`` on top."""
    import torch

    out = {}
    for module in sorted(_modules(lower[0]) | _modules(upper[0])):
        a_parts, b_parts = [], []
        ref = lower[0] if f"{module}.lora_A.weight" in lower[0] else upper[0]
        d_in = ref[f"{module}.lora_A.weight"].shape[1]
        d_out = ref[f"{module}.lora_B.weight"].shape[0]
        for tensors, rank, scale in (lower, upper):
            a = tensors.get(f"{module}.lora_A.weight")
            b = tensors.get(f"{module}.lora_B.weight")
            # A module only one adapter trains contributes zeros from the other.
            a_parts.append(a.float() if a is not None else torch.zeros(rank, d_in))
            b_parts.append(b.float() * scale if b is not None else torch.zeros(d_out, rank))
        out[f"{module}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        out[f"{module}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    return out


def stack_adapters(lower: str, upper: str, out_dir: str | None = None) -> str:
    """Write ``upper`` stacked on ``lower`` as one PEFT adapter; returns its local directory."""
    from safetensors.torch import save_file

    cfg_lo, t_lo, r_lo, s_lo = _load(lower)
    cfg_up, t_up, r_up, s_up = _load(upper)
    rank = r_lo + r_up
    cfg = {
        **cfg_lo,
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the parts' own scalings are folded into B
        "use_rslora": False,
        "target_modules": sorted(set(cfg_lo.get("target_modules") or []) | set(cfg_up.get("target_modules") or [])),
    }
    out = Path(out_dir or tempfile.mkdtemp(prefix="cmv-stacked-lora-"))
    out.mkdir(parents=True, exist_ok=True)
    save_file(stacked_tensors((t_lo, r_lo, s_lo), (t_up, r_up, s_up)), str(out / WEIGHTS), metadata={"format": "pt"})
    storage.write_json(str(out / CONFIG), cfg)
    return str(out)
