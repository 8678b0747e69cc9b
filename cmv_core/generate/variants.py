"""Model variants from the command line: the base model, train stage outputs (SFT, DPO), adapters."""

from __future__ import annotations

import logging

from cmv_core import storage
from cmv_core.generate.config import InputError, Variant

log = logging.getLogger(__name__)


def parse_variant(text: str) -> tuple[str, str, str | None]:
    """``NAME=MODEL[,adapter=ADAPTER]`` -> (name, model, adapter)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise InputError(f"--variant {text!r}: expected NAME=MODEL[,adapter=ADAPTER]")
    model, _, adapter = rest.partition(",adapter=")
    return name.strip(), model.strip(), (adapter.strip() or None)


def is_train_output(uri: str) -> bool:
    """A finished train stage output (its ``_SUCCESS`` says stage train)."""
    if not uri or uri.startswith("embedded:"):
        return False
    try:
        return storage.require_success(uri).get("stage") == "train"
    except (storage.MissingInputError, OSError, ValueError):
        return False


def trained_variant(name: str, trained: str, base_model: str, finetuned_weights: str) -> Variant:
    """The variant a train stage output stands for: its merged ``model/``, or base + its ``adapter/``."""
    manifest = storage.require_success(trained)
    files = {f["path"] for f in manifest.get("files", [])}
    has_model = "model/config.json" in files
    has_adapter = "adapter/adapter_config.json" in files
    # An adapter goes on the model it was trained from, as the train manifest records it.
    recorded = manifest.get("config") or {}
    trained_from = recorded.get("model")
    if isinstance(trained_from, str) and trained_from:
        base_model = trained_from
    if finetuned_weights == "adapter" and has_adapter:
        stacked = _stacked_on_init(name, trained, recorded)
        if stacked is not None:
            return stacked
        return Variant(name, base_model, storage.join(trained, "adapter"))
    if has_model:
        if finetuned_weights == "adapter":
            log.info("%s has no adapter/ (a full fine-tune?): using its merged model/", trained)
        return Variant(name, storage.join(trained, "model"))
    if has_adapter:
        return Variant(name, base_model, storage.join(trained, "adapter"))
    raise InputError(f"{trained}: the train output has neither model/config.json nor adapter/adapter_config.json")


def _stacked_on_init(name: str, trained: str, recorded: dict) -> Variant | None:
    """DPO trained a LoRA on the SFT output's merged model/: when that SFT output has its own adapter on the
    base model, the DPO adapter goes on the base model stacked on the SFT adapter (one engine for all)."""
    init = recorded.get("init")
    if not isinstance(init, str) or init == "base" or not is_train_output(init):
        return None
    sft = trained_variant(name, init, recorded.get("base_model") or "", "adapter")
    if not sft.adapter or sft.stacked_on:
        return None
    return Variant(name, sft.model, storage.join(trained, "adapter"), stacked_on=sft.adapter)


def variants_from_args(
    *,
    model: str | None,
    recipe_model: str,
    trained: str | None = None,
    adapter: str | None = None,
    variant_args: list[str] = (),
    finetuned_weights: str = "merged",
    dpo: str | None = None,
) -> list[Variant]:
    """The variants a command line asks for.

    Explicit ``--variant``s win (a train output as MODEL is read as one).
    Otherwise ``base`` (``--model``, default the recipe's model) plus
    ``finetuned`` when a train output or an adapter is given, plus ``dpo`` when a
    DPO train output is given (its adapter goes on the model it was trained from,
    the SFT model). A train output passed as ``--model`` counts as ``--trained``;
    its base is the recipe's model.
    """
    if variant_args:
        if model or trained or adapter or dpo:
            raise InputError("--variant replaces --model/--trained/--adapter: give one or the other")
        return _explicit_variants(variant_args, recipe_model, finetuned_weights)
    if model and is_train_output(model):
        if trained:
            raise InputError(f"--model {model} is a train output and --trained is given too")
        trained, model = model, None
    if trained and adapter:
        raise InputError("give --trained or --adapter, not both")
    base = model or recipe_model
    variants = [Variant("base", base)]
    if trained:
        variants.append(trained_variant("finetuned", trained, base, finetuned_weights))
    elif adapter:
        variants.append(Variant("finetuned", base, adapter))
    if dpo:
        variants.append(trained_variant("dpo", dpo, base, finetuned_weights))
    return variants


def _explicit_variants(variant_args: list[str], recipe_model: str, finetuned_weights: str) -> list[Variant]:
    """``--variant NAME=MODEL[,adapter=ADAPTER]`` each; a train output as MODEL stands for its trained model."""
    out = []
    for text in variant_args:
        name, spec, adapter_uri = parse_variant(text)
        if not adapter_uri and is_train_output(spec):
            out.append(trained_variant(name, spec, recipe_model, finetuned_weights))
        else:
            out.append(Variant(name, spec, adapter_uri))
    return out
