"""Which backend serves which variants: one engine per group, opened as a context around its shards."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from cmv_core.generate.config import GenerateConfig, GenerateFn, Variant
from cmv_core.generate.hf import open_transformers
from cmv_core.generate.stacked import stack_adapters
from cmv_core.generate.vllm_engine import open_vllm


def engine_groups(variants: list[Variant], backend: str) -> list[list[Variant]]:
    """vLLM: variants on the same base model share one engine (adapters via LoRA). transformers: one each."""
    if backend != "vllm":
        return [[v] for v in variants]
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.model, []).append(v)
    return list(groups.values())


def unstacked(v: Variant) -> Variant:
    """A variant whose adapter is stacked on another as one adapter on its base model (same name)."""
    if not v.stacked_on:
        return v
    return dataclasses.replace(v, adapter=stack_adapters(v.stacked_on, v.adapter), stacked_on=None)


@contextlib.contextmanager
def open_backend(variants: list[Variant], config: GenerateConfig) -> Iterator[GenerateFn]:
    """The group's generate function; it is called with the variants as given (rows name their adapters)."""
    served = [unstacked(v) for v in variants]
    if config.backend == "vllm":
        with open_vllm(served, config) as fn:
            yield fn
    else:
        (variant,) = served
        with open_transformers(variant, config) as fn:
            yield fn
