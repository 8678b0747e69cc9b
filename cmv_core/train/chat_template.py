"""Chat templates with generation markers, and the check that a collated batch trains only the reply.

TRL builds the assistant-only loss mask of SFT from ``{% generation %}`` markers in the chat template; SmolLM2's
and Llama 3.2's templates have none, so training swaps in a template that renders byte-identically to the
model's own (checked on the data) and has them. Whatever builds the mask (SFT's markers, DPO's prompt /
completion split), :func:`check_label_mask` then verifies a real collated batch: some tokens are trained and
none of them is prompt structure.
"""

from __future__ import annotations

import logging

from cmv_core.config import ConfigError
from cmv_core.errors import InputError

log = logging.getLogger(__name__)


class LabelMaskError(InputError):
    """The loss mask is empty or covers prompt tokens: training would be silently wrong."""


# SmolLM2-Instruct's ChatML template (as in its GGUF / tokenizer_config) and the same with generation markers:
# the assistant's words and its <|im_end|> (so it learns to stop) are trained, nothing else.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA32_MESSAGE_LINE = (
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}"
)


def llama32_templates() -> tuple[str, str]:
    """(Llama 3.2 Instruct's template as TRL ships it byte-identically, the same with generation markers)."""
    from trl.chat_template_utils import llama3_2_chat_template as original

    if original.count(_LLAMA32_MESSAGE_LINE) != 1:
        raise RuntimeError("TRL's llama3_2 template changed; update chat_template.llama32_templates")
    patched = original.replace(
        _LLAMA32_MESSAGE_LINE,
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + _LLAMA32_MESSAGE_LINE + "{%- endif %}",
    )
    return original, patched


def training_chat_template(tokenizer) -> str | None:
    """A chat template with ``{% generation %}`` markers for ``tokenizer``'s own template, or None if unknown."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template is None:
        return None
    if has_generation_markers(template):
        return template
    if template == SMOLLM2_TEMPLATE:
        return SMOLLM2_TRAINING_TEMPLATE
    llama_original, llama_training = llama32_templates()
    if template == llama_original:
        return llama_training
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        return None


def renders_identically(tokenizer, original: str, training: str, conversations: list[list[dict]]) -> bool:
    """The training template must not change a single character of what the model sees."""
    for conv in conversations:
        a = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=original)
        b = tokenizer.apply_chat_template(conv, tokenize=False, chat_template=training)
        if a != b:
            return False
    return True


def ensure_chat_template(tokenizer) -> str:
    """Give a template-less (base) tokenizer the Llama 3.2 template; returns the template to ship in model/."""
    if tokenizer.chat_template is not None:
        return tokenizer.chat_template
    if "<|start_header_id|>" in tokenizer.get_vocab():
        tokenizer.chat_template = llama32_templates()[0]
        log.info("the tokenizer has no chat template: using Llama 3.2's (its special tokens are in the vocabulary)")
        return tokenizer.chat_template
    raise ConfigError("the model's tokenizer has no chat template; use an instruct model (e.g. *-Instruct)")


def end_of_turn_ids(tokenizer) -> set[int]:
    """Special tokens that legitimately end an assistant turn (and so are trained)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_label_mask(batch: dict, tokenizer) -> dict:
    """Verify a collated batch: some tokens are trained, and none of them is prompt structure.

    Prompt structure = the special tokens that open a turn (``<|im_start|>``, ``<|start_header_id|>``, BOS,
    ...) and the first token of every sequence: a mask that covered the prompt would include them. Only the
    end-of-turn token is allowed among the trained special tokens.
    """
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    trained = labels != -100
    n_trained = int(trained.sum())
    if n_trained == 0:
        raise LabelMaskError(
            "the label mask of a real training batch is empty: no assistant token would be trained. The chat "
            "template's {% generation %} markers do not match the data (or every reply was truncated away by "
            "train.max_length)."
        )
    if "position_ids" in batch:  # packed / padding-free: a sequence starts wherever the position restarts
        starts = batch["position_ids"] == 0
        real = torch.ones_like(trained) if "attention_mask" not in batch else batch["attention_mask"].bool()
    else:
        starts = torch.zeros_like(trained)
        starts[:, 0] = True
        real = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(trained)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    structural = sorted(special - end_of_turn_ids(tokenizer))
    on_structure = trained & torch.isin(input_ids, torch.tensor(structural, dtype=input_ids.dtype))
    on_start = trained & starts
    bad = on_structure | on_start
    if bool(bad.any()):
        row, pos = (int(x) for x in bad.nonzero()[0])
        context = tokenizer.decode(input_ids[row, max(0, pos - 8) : pos + 8])
        raise LabelMaskError(
            f"the label mask covers prompt tokens (row {row}, position {pos}, around {context!r}): the loss would "
            "be computed on the prompt, not only on the assistant's reply"
        )
    n_real = int(real.sum())
    if n_trained >= n_real:
        raise LabelMaskError("the label mask covers every token of the batch, the prompt included")
    return {"trained_tokens": n_trained, "tokens": n_real, "trained_fraction": round(n_trained / n_real, 4)}


def check_completion_mask(batch: dict, tokenizer) -> dict:
    """:func:`check_label_mask` for a preference batch (DPO): ``completion_mask`` marks the trained tokens."""
    labels = batch["input_ids"].masked_fill(~batch["completion_mask"].bool(), -100)
    return check_label_mask(
        {"input_ids": batch["input_ids"], "labels": labels, "attention_mask": batch["attention_mask"]}, tokenizer
    )
