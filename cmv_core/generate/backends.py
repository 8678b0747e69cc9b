"""Which backend serves which variants: one engine per group, opened as a context around its shards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from cmv_core.generate.config import GenerateConfig, GenerateFn, Variant
from cmv_core.generate.hf import open_transformers
from cmv_core.generate.vllm_engine import open_vllm


def engine_groups(variants: list[Variant], backend: str) -> list[list[Variant]]:
    """vLLM: variants on the same base model share one engine (adapters via LoRA). transformers: one each."""
    if backend != "vllm":
        return [[v] for v in variants]
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.model, []).append(v)
    return list(groups.values())


@contextlib.contextmanager
def open_backend(variants: list[Variant], config: GenerateConfig) -> Iterator[GenerateFn]:
    if config.backend == "vllm":
        with open_vllm(variants, config) as fn:
            yield fn
    else:
        (variant,) = variants
        with open_transformers(variant, config) as fn:
            yield fn
