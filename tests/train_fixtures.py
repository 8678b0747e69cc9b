"""Format-stage output for the training tests, built directly (no dependency on the format stage)."""

from __future__ import annotations

import random

from cmv_core import storage

TOPICS = ["cats", "taxes", "cities", "trains", "coffee", "winter", "music", "remote work", "books", "running"]


def conversation(i: int, rng: random.Random) -> list[dict]:
    topic = TOPICS[i % len(TOPICS)]
    post = f"CMV: {topic} are overrated. " + " ".join(rng.choice(TOPICS) for _ in range(6))
    reply = f"I see why you think so about {topic}, but consider the other side: {topic} help many people every day."
    messages = [{"role": "user", "content": "Write a reply that changes the poster's view.\n\n" + post}]
    if i % 3 == 0:  # some multi-turn branches: two assistant turns, both trained
        messages += [
            {"role": "assistant", "content": f"Have you tried {topic} yourself?"},
            {"role": "user", "content": f"Yes, and I did not like {topic}."},
        ]
    messages.append({"role": "assistant", "content": reply})
    if i % 4 == 1:
        messages.insert(0, {"role": "system", "content": "You are a thoughtful debater."})
    return messages


def preference(i: int, rng: random.Random) -> dict:
    """One pair in TRL's conversational preference format, as the format stage writes it."""
    topic = TOPICS[i % len(TOPICS)]
    post = f"CMV: {topic} are overrated. " + " ".join(rng.choice(TOPICS) for _ in range(6))
    return {
        "prompt": [{"role": "user", "content": "Write a reply that changes the poster's view.\n\n" + post}],
        "chosen": [
            {
                "role": "assistant",
                "content": f"I see why you think so about {topic}, but consider the "
                f"other side: {topic} help many people every day.",
            }
        ],
        "rejected": [{"role": "assistant", "content": f"No. Wrong. {topic} {topic} {topic}, stop posting."}],
    }


def write_format_output(uri: str, n_train: int = 48, n_val: int = 8, seed: int = 0) -> str:
    """train.jsonl / val.jsonl (+ _SUCCESS) under ``uri``, as the format stage writes them."""
    rng = random.Random(seed)
    run = storage.begin_stage("format", uri, inputs=[], config={"fixture": True, "seed": seed}, force=True)
    for name, n, offset in (("train", n_train, 0), ("val", n_val, 10_000)):
        rows = [
            {"thread_id": f"t{offset + i}", "messages": conversation(offset + i, rng), "meta": {"i": i}}
            for i in range(n)
        ]
        storage.write_jsonl(storage.join(uri, f"{name}.jsonl"), rows)
        pairs = [{**preference(offset + i, rng), "thread_id": f"t{offset + i}", "meta": {"i": i}} for i in range(n)]
        storage.write_jsonl(storage.join(uri, f"{name}_preferences.jsonl"), pairs)
    storage.finish_stage(run, {"train": n_train, "val": n_val})
    return uri


def assert_same_adapter(output: str, baseline, scratch) -> None:
    """The adapter under the train output ``output`` (local or S3) is tensor for tensor the one of the
    local train output ``baseline``; ``scratch``: a local folder to copy it into."""
    from safetensors.torch import load_file

    got_path = scratch / "resumed_adapter.safetensors"
    got_path.write_bytes(storage.read_bytes(storage.join(output, "adapter", "adapter_model.safetensors")))
    got, want = load_file(str(got_path)), load_file(str(baseline / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)
