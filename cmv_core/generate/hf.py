"""The transformers backend: batched ``generate()`` on CPU or GPU.

Prompts sorted by length so a batch wastes little padding, left padding, the
model's chat template, stop at the end-of-turn token(s), only the new tokens
decoded. A LoRA adapter is merged into the model once at load.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from cmv_core import models, storage
from cmv_core.generate.config import GenerateConfig, GenerateFn, Prompt, Reply, Variant
from cmv_core.generate.stop_tokens import end_of_turn_ids

log = logging.getLogger(__name__)


def reply_from_ids(new_ids: list[int], stop_ids, prompt_tokens: int, decode: Callable[[list[int]], str]) -> Reply:
    """Cut the generated ids at the first end-of-turn token; what comes after is padding."""
    for j, token in enumerate(new_ids):
        if token in stop_ids:
            return Reply(decode(new_ids[:j]).strip(), "stop", prompt_tokens, j + 1)
    return Reply(decode(new_ids).strip(), "length", prompt_tokens, len(new_ids))


def torch_setup(config: GenerateConfig):
    """The device and dtype ``auto`` stand for: bfloat16 on a GPU, float32 on the CPU."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return device, dtype


def generation_config(config: GenerateConfig, stop_ids: list[int], pad_token_id: int):
    """A ``GenerationConfig`` with every setting that shapes the output explicit.

    generate() fills unset ones from the model's generation_config.json (Llama
    3.2 Instruct ships temperature 0.6, top_p 0.9), which would make this
    backend differ from vLLM's.
    """
    from transformers import GenerationConfig

    sampling = config.temperature > 0
    return GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=sampling,
        temperature=config.temperature if sampling else None,
        top_p=config.top_p if sampling else None,
        top_k=0 if sampling else None,  # off, as in vLLM
        repetition_penalty=1.0,
        num_return_sequences=config.n,
        eos_token_id=stop_ids,
        pad_token_id=pad_token_id,
    )


def _load(variant: Variant, dtype):
    """The variant's tokenizer (left padding) and model, its adapter merged in."""
    tokenizer = models.load_tokenizer(variant.model)
    tokenizer.padding_side = "left"  # decoder-only: new tokens follow the prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = models.load_causal_lm(variant.model, dtype=dtype)
    if variant.adapter:
        from peft import PeftModel

        # Merged once at load: generation then runs at the plain model's speed.
        model = PeftModel.from_pretrained(model, storage.materialize_dir(variant.adapter)).merge_and_unload()
    return tokenizer, model


@contextlib.contextmanager
def open_transformers(variant: Variant, config: GenerateConfig) -> Iterator[GenerateFn]:
    import torch
    from transformers import set_seed

    device, dtype = torch_setup(config)
    started = time.perf_counter()
    tokenizer, model = _load(variant, dtype)
    model.to(device).eval()
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config.eos_token_id)
    gen_config = generation_config(config, stop_ids, tokenizer.pad_token_id)
    log.info(
        "%s: loaded %s on %s (%s) in %.1f s", variant.name, variant.model, device, dtype, time.perf_counter() - started
    )

    def generate(v: Variant, prompts: list[Prompt], seed: int) -> list[Reply]:
        texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
        # The template already holds the special tokens (BOS etc.): add none.
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        # Longest first: similar lengths share a batch, and an out-of-memory shows up at once.
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
        n = config.n
        replies: list[Reply | None] = [None] * (len(prompts) * n)  # sample j of prompt i at i * n + j
        for b, start in enumerate(range(0, len(order), config.batch_size)):
            idx = order[start : start + config.batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt")
            set_seed(seed + b)
            with torch.inference_mode():
                out = model.generate(**batch.to(device), generation_config=gen_config)
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            # generate() returns the n sequences of each input together
            for r, row in enumerate(new):
                i = idx[r // n]
                replies[i * n + r % n] = reply_from_ids(row, stop_ids, len(encoded[i]), _decoder(tokenizer))
        return replies

    try:
        yield generate
    finally:
        # Clears the name generate() closes over too, so the model is freed while a
        # caller still holds generate (rebound, not deleted: ruff reads a deleted
        # closed-over name as undefined, F821).
        model = None
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _decoder(tokenizer) -> Callable[[list[int]], str]:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
