"""The token ids that end a reply, shared by both backends."""

from __future__ import annotations

# Tokens that end an assistant turn in the chat templates we meet (Llama 3:
# <|eot_id|>; SmolLM2/ChatML: <|im_end|>; others). Stopping on any of them is
# always right for a reply; the model's own eos ids are added to these.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>")


def end_of_turn_ids(tokenizer, eos_token_id: int | list[int] | None = None) -> list[int]:
    """Every token id that ends a reply: the model's eos id(s) and known end-of-turn tokens."""
    ids: set[int] = set()
    for value in (eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(i) for i in value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)
