"""Train stage: loss mask, data validation, and a real (tiny) fine-tuning run on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONFIGS, run_cmv
from train_fixtures import conversation, write_format_output

from cmv_core import storage
from cmv_core.train.chat_template import (
    SMOLLM2_TEMPLATE,
    SMOLLM2_TRAINING_TEMPLATE,
    LabelMaskError,
    check_label_mask,
    llama32_templates,
    renders_identically,
    training_chat_template,
)
from cmv_core.train.data import TrainDataError, load_split

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def conversations(n: int = 12) -> list[list[dict]]:
    import random

    rng = random.Random(1)
    return [conversation(i, rng) for i in range(n)]


def expected_label_ids(tokenizer, text: str, conv: list[dict], end: str, strip: bool) -> list[int]:
    """Token ids of exactly the assistant contents and their end-of-turn tokens, found by character offsets."""
    spans, pos = [], 0
    for m in conv:
        if m["role"] == "assistant":
            piece = (m["content"].strip() if strip else m["content"]) + end
            start = text.index(piece, pos)
            spans.append((start, start + len(piece)))
            pos = start + len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [
        tid for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if any(s <= a and b <= e for s, e in spans)
    ]


@pytest.mark.parametrize("family", ["smollm2", "llama3.2"])
def test_label_mask_covers_exactly_the_assistant_tokens(tokenizer, tmp_path, family):
    """What SFTTrainer really trains on (labels != -100) is every assistant turn + its end token, nothing else."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    if family == "llama3.2":
        # Llama 3's structural tokens, as single special tokens like in its real tokenizer
        tok.add_special_tokens(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
            }
        )
        tok.chat_template, expected_training = llama32_templates()
        end, strip = "<|eot_id|>", True
    else:
        assert tok.chat_template == SMOLLM2_TEMPLATE  # the embedded model's own template, unpatched
        expected_training, end, strip = SMOLLM2_TRAINING_TEMPLATE, "<|im_end|>", False
    original = tok.chat_template
    convs = conversations()
    training = training_chat_template(tok)
    assert training == expected_training
    assert renders_identically(tok, original, training, convs)

    tok.chat_template = training
    model = AutoModelForCausalLM.from_pretrained(tokenizer.name_or_path)
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        report_to="none",
        max_length=1024,
        gradient_checkpointing=False,
        bf16=False,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in convs]), processing_class=tok
    )
    n_multi = 0
    for conv, row in zip(convs, trainer.train_dataset):
        text = tok.apply_chat_template(conv, tokenize=False, chat_template=original)
        assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert trained == expected_label_ids(tok, text, conv, end, strip)
        assert [lab for lab in row["labels"] if lab != -100] == trained  # labels are the ids themselves
        n_multi += sum(m["role"] == "assistant" for m in conv) > 1
    assert n_multi >= 2  # multi-turn examples were covered: both assistant turns trained

    stats = check_label_mask(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]), tok)
    assert 0 < stats["trained_fraction"] < 1


def test_label_mask_check_rejects_empty_and_prompt_masks(tokenizer):
    import torch

    convs = conversations(2)
    batch_ids, batch_labels = [], []
    for conv in convs:
        out = tokenizer.apply_chat_template(
            conv,
            chat_template=SMOLLM2_TRAINING_TEMPLATE,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = list(out["input_ids"])
        batch_ids.append(ids)
        batch_labels.append([t if m else -100 for t, m in zip(ids, out["assistant_masks"])])
    width = max(map(len, batch_ids))

    def batch(labels):
        pad = tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch_ids]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch_ids]),
        }

    assert check_label_mask(batch(batch_labels), tokenizer)["trained_tokens"] > 0
    with pytest.raises(LabelMaskError, match="empty"):
        check_label_mask(batch([[-100] * len(lab) for lab in batch_labels]), tokenizer)
    with pytest.raises(LabelMaskError, match="covers prompt tokens"):
        check_label_mask(batch([list(ids) for ids in batch_ids]), tokenizer)  # loss on everything
    # one prompt token leaked into an otherwise correct mask (a user turn's <|im_start|>) is caught too
    leaked = [list(lab) for lab in batch_labels]
    first_user = next(
        i for i, t in enumerate(batch_ids[0]) if i > 0 and t == tokenizer.convert_tokens_to_ids("<|im_start|>")
    )
    leaked[0][first_user] = batch_ids[0][first_user]
    with pytest.raises(LabelMaskError, match="covers prompt tokens"):
        check_label_mask(batch(leaked), tokenizer)


def test_unknown_template_falls_back_to_prompt_completion(tokenizer):
    from cmv_core.train.data import to_prompt_completion

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert training_chat_template(tok) is None
    conv = conversations(1)[0]
    row = to_prompt_completion(conv)
    assert row["completion"] == [conv[-1]] and row["prompt"] == conv[:-1]


def test_bad_lines_name_file_and_line(tmp_path):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(TrainDataError, match=r"train.jsonl:2: not valid JSON"):
        load_split(str(path))
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(TrainDataError, match=r"train.jsonl:2: no assistant turn"):
        load_split(str(path))
    path.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(TrainDataError, match=r"train.jsonl:1: messages\[0\]"):
        load_split(str(path))


def test_bad_input_fails_cleanly_without_output(tmp_path):
    fmt = write_format_output(str(tmp_path / "format"), n_train=4, n_val=2)
    # the bad line comes from an attempt of the format stage (an edit after _SUCCESS is refused as tampering)
    run = storage.begin_stage("format", fmt, inputs=[], config={"bad": True}, force=True)
    with open(tmp_path / "format" / "train.jsonl", "a") as f:
        f.write('{"messages": [{"role": "user", "content": "only a prompt"}]}\n')
    storage.finish_stage(run, {})
    out = tmp_path / "train"
    proc = run_cmv("train", "--input", fmt, "--output", str(out), "--config", TINY, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.jsonl:5: no assistant turn" in proc.stdout + proc.stderr
    assert not (out / "_SUCCESS").exists() and not (out / "model").exists()


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_tiny_lora_run_learns_and_writes_loadable_model(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fmt = write_format_output(str(tmp_path / "format"))
    out = tmp_path / "train"
    common = [
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_steps=3",
        "--set",
        "train.eval_on_start=true",
        "--set",
        "train.per_device_train_batch_size=4",
        "--set",
        "train.max_length=256",
    ]
    run_cmv("train", *common)

    # Learned: eval loss on val fell from before training to after; train loss fell
    metrics = json.loads((out / "metrics.json").read_text())
    evals = metrics["eval_loss"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert metrics["final_eval_loss"] < evals[0]["eval_loss"] - 0.05
    losses = [r["loss"] for r in metrics["train_loss"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert metrics["global_step"] == 6 and metrics["loss_masking"] == "assistant_turns"
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert 0 < metrics["label_mask"]["trained_fraction"] < 1
    assert 0 < metrics["trainable_parameters"] < metrics["parameters"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Trainable parameters changed: LoRA B matrices start at zero, every one moved
    adapter = read_tensors(out / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())

    # model/ is plain merged weights: loads with transformers alone, differs from the base where LoRA applied
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])
    assert torch.equal(merged.state_dict()["model.norm.weight"], base.state_dict()["model.norm.weight"])
    # the shipped tokenizer keeps the model's own chat template (generation markers are training-only)
    assert AutoTokenizer.from_pretrained(out / "model").chat_template == SMOLLM2_TEMPLATE

    # Checkpoints mirrored as complete units; manifest last
    marker = json.loads((out / "checkpoints" / "checkpoint-6" / "_COMPLETE").read_text())
    assert marker["step"] == 6 and {f["path"] for f in marker["files"]} >= {"optimizer.pt", "trainer_state.json"}
    manifest = storage.require_success(str(out))
    assert {"model/model.safetensors", "adapter/adapter_model.safetensors", "metrics.json"} <= {
        f["path"] for f in manifest["files"]
    }

    # Rerun with the same inputs and config: skipped, nothing rewritten
    before = (out / "_SUCCESS").read_bytes()
    proc = run_cmv("train", *common)
    assert "skipped" in proc.stderr
    assert (out / "_SUCCESS").read_bytes() == before


def test_tiny_full_finetune_with_packing(tmp_path, tiny_model_dir):
    """Full fine-tuning (every weight trains) on packed sequences; no adapter."""
    from safetensors.torch import load_file

    fmt = write_format_output(str(tmp_path / "format"))
    out = tmp_path / "train"
    run_cmv(
        "train",
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "train.method=full",
        "--set",
        "train.packing=true",
        "--set",
        "train.max_steps=4",
        "--set",
        "train.learning_rate=3.0e-3",
        "--set",
        "train.eval_on_start=true",
        "--set",
        "train.max_length=256",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packing"] is True and metrics["method"] == "full"
    assert metrics["trainable_parameters"] == metrics["parameters"]
    assert metrics["final_eval_loss"] < metrics["eval_loss"][0]["eval_loss"]
    assert not (out / "adapter").exists()
    trained = load_file(str(out / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert trained.keys() == base.keys()
    unchanged = [k for k in base if (trained[k].float() - base[k].float()).abs().max() == 0]
    assert not unchanged, f"weights that did not train: {unchanged}"


def test_checkpoint_selection_ignores_incomplete_foreign_and_wrong_world_size(tmp_path):
    """Only a checkpoint with its _COMPLETE marker, from this run's inputs+config, is resumed; pruning keeps N."""
    from cmv_core.train.checkpoints import list_checkpoints, newest_resumable, prune_checkpoints

    out = str(tmp_path / "train")

    def checkpoint(step: int, fingerprint: str | None, world_size: int = 1) -> None:
        base = storage.join(out, "checkpoints", f"checkpoint-{step}")
        storage.write_bytes(storage.join(base, "optimizer.pt"), b"x" * step)
        if fingerprint is not None:
            storage.write_json(
                storage.join(base, "_COMPLETE"),
                {"step": step, "fingerprint": fingerprint, "world_size": world_size, "files": []},
            )

    checkpoint(2, "mine")
    checkpoint(4, "mine", world_size=2)
    checkpoint(6, "other-config")
    checkpoint(8, None)  # killed while uploading
    assert newest_resumable(out, "mine", world_size=1, deepspeed=False)[0] == 4
    assert newest_resumable(out, "mine", world_size=1, deepspeed=True)[0] == 2  # ZeRO shards are per world size
    assert newest_resumable(out, "nobody", world_size=1, deepspeed=False) is None

    prune_checkpoints(out, keep=2)
    assert {s: m is not None for s, m in list_checkpoints(out).items()} == {4: True, 6: True, 8: False}
    checkpoint(10, "mine")
    prune_checkpoints(out, keep=1)
    assert list(list_checkpoints(out)) == [10]  # older complete ones and the stale incomplete one are gone


def test_recipe_asking_for_missing_hardware_fails_early():
    import importlib.util

    import torch

    from cmv_core.config import ConfigError
    from cmv_core.train.config import TrainConfig
    from cmv_core.train.launch import check_hardware

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
        pytest.skip("this machine can run QLoRA")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU and the bitsandbytes package"):
        check_hardware(TrainConfig(method="qlora"))
    with pytest.raises(ConfigError, match="unknown|must be one of"):
        TrainConfig(method="prefix-tuning")
