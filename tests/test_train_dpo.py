"""Train stage, DPO: completion-only mask on a real batch, a tiny run after SFT that learns the preference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import CONFIGS, run_cmv
from train_fixtures import assert_same_adapter, preference, write_format_output

from cmv_core import storage

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_completion_mask_is_exactly_the_chosen_and_rejected_replies(tokenizer, tiny_model_dir, tmp_path):
    """On a batch DPOTrainer really collates, the loss tokens are each reply + its end of turn, nothing else."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from cmv_core.train.chat_template import LabelMaskError, check_completion_mask

    rng = random.Random(3)
    rows = [preference(i, rng) for i in range(6)]
    rows[1]["prompt"].insert(0, {"role": "system", "content": "You are a thoughtful debater."})
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_length=1024, bf16=False, use_cpu=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=__import__("peft").LoraConfig(r=4, target_modules="all-linear"),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    n = len(rows)
    for half, key in ((0, "chosen"), (1, "rejected")):
        for i, row in enumerate(rows):
            ids, mask = batch["input_ids"][half * n + i], batch["completion_mask"][half * n + i].bool()
            # the prompt as the model sees it at generation time, then exactly the reply and its end of turn
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            want = tokenizer(row[key][0]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            assert ids[mask].tolist() == want
            n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            assert not mask[:n_prompt].any() and int(mask.sum()) == len(want)
    stats = check_completion_mask(batch, tokenizer)
    assert 0 < stats["trained_fraction"] < 1
    leaked = dict(batch, completion_mask=batch["completion_mask"].clone())
    leaked["completion_mask"][0, 0] = 1  # the first prompt token in the loss
    with pytest.raises(LabelMaskError, match="covers prompt tokens"):
        check_completion_mask(leaked, tokenizer)
    with pytest.raises(LabelMaskError, match="empty"):
        check_completion_mask(dict(batch, completion_mask=batch["completion_mask"] * 0), tokenizer)


def test_bad_preference_lines_name_file_and_line(tmp_path):
    from cmv_core.train.data import TrainDataError, load_preferences

    good = preference(0, random.Random(0))
    path = tmp_path / "train_preferences.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": []}) + "\n")
    with pytest.raises(TrainDataError, match=r"train_preferences.jsonl:2: 'rejected' must be a non-empty list"):
        load_preferences(str(path))
    two = {**good, "chosen": good["chosen"] * 2}
    path.write_text(json.dumps(two) + "\n")
    with pytest.raises(TrainDataError, match=r":1: 'chosen' must be exactly one assistant message"):
        load_preferences(str(path))


def test_dpo_config_passes_knobs_through_and_rejects_unknown(tmp_path):
    from cmv_core.config import ConfigError, load_recipe
    from cmv_core.train.dpo import dpo_config, dpo_section

    recipe = load_recipe(TINY, ["dpo.dpo_args={beta: 0.05, loss_type: ipo}", "dpo.learning_rate=1.0e-3"])
    cfg = dpo_section(recipe)
    assert cfg.learning_rate == 1e-3 and cfg.lora_r == recipe["train"]["lora_r"]  # dpo over train
    args = dpo_config(cfg, tmp_path, has_eval=False)
    assert args.beta == 0.05 and args.loss_type == ["ipo"]
    from trl import DPOConfig

    assert args.label_smoothing == DPOConfig.label_smoothing  # not set by the recipe: TRL's default
    with pytest.raises(ConfigError, match="dpo.dpo_args"):
        dpo_config(dpo_section(load_recipe(TINY, ["dpo.dpo_args={betta: 0.1}"])), tmp_path, has_eval=False)
    with pytest.raises(ConfigError, match="no dpo: section"):
        dpo_section({"train": {}})


def read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_dpo_after_sft_raises_margin_and_accuracy_and_writes_loadable_model(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    fmt = write_format_output(str(tmp_path / "format"), n_train=24, n_val=4)
    sft, dpo = tmp_path / "train", tmp_path / "dpo"
    run_cmv(
        "train",
        "--input",
        fmt,
        "--output",
        str(sft),
        "--config",
        TINY,
        "--set",
        "train.max_steps=2",
        "--set",
        "train.max_length=256",
    )
    common = [
        "train",
        "--method",
        "dpo",
        "--input",
        fmt,
        "--init",
        str(sft),
        "--output",
        str(dpo),
        "--config",
        TINY,
        "--set",
        "dpo.max_steps=6",
        "--set",
        "dpo.save_steps=3",
        "--set",
        "dpo.eval_on_start=true",
        "--set",
        "dpo.max_length=256",
    ]
    run_cmv(*common)

    # Learned the preference: margin and accuracy on the train pairs (each logged step is measured before its
    # update, so step 1 is the starting value) and on val rise above their starting values
    metrics = json.loads((dpo / "metrics.json").read_text())
    steps = metrics["train_loss"]
    assert [s["step"] for s in steps] == list(range(1, 7)) and metrics["objective"] == "dpo"
    first, last = steps[0], steps[-1]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert last["rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["rewards/accuracies"] > first["rewards/accuracies"]
    assert last["loss"] < first["loss"]
    evals = metrics["eval_loss"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    assert evals[-1]["eval_rewards/accuracies"] > evals[0]["eval_rewards/accuracies"]
    assert {"rewards/chosen", "rewards/rejected"} <= set(last) and "eval_rewards/chosen" in metrics["final_eval"]
    # LoRA: the reference is the same weights with the adapter disabled; one copy of them in memory
    assert metrics["reference_model"] == "adapter_disabled" and metrics["base_weight_copies"] == 1
    assert 0 < metrics["label_mask"]["trained_fraction"] < 1 and metrics["pairs_dropped_prompt_too_long"] == 0
    assert (dpo / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The adapter trained (B starts at zero) and model/ = SFT model + DPO adapter, plain transformers loads it
    adapter = read_tensors(dpo / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    merged = AutoModelForCausalLM.from_pretrained(dpo / "model").state_dict()
    sft_weights = AutoModelForCausalLM.from_pretrained(sft / "model").state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], sft_weights[name])
    assert torch.equal(merged["model.norm.weight"], sft_weights["model.norm.weight"])

    # _SUCCESS records the SFT output's manifest digest, and the model adapter/ goes on (generate reads it)
    manifest = storage.require_success(str(dpo))
    sft_digest = "sha256:" + __import__("hashlib").sha256((sft / "_SUCCESS").read_bytes()).hexdigest()
    assert {"uri": str(sft), "digest": sft_digest} in manifest["inputs"]
    assert manifest["config"]["model"] == storage.join(str(sft), "model") and manifest["stage"] == "train"

    # Same inputs and config: skipped
    before = (dpo / "_SUCCESS").read_bytes()
    assert "skipped" in run_cmv(*common).stderr and (dpo / "_SUCCESS").read_bytes() == before


def test_full_dpo_from_base_loads_a_frozen_reference_copy(tmp_path):
    """The counter behind base_weight_copies == 1 for LoRA sees the second copy that full DPO needs."""
    fmt = write_format_output(str(tmp_path / "format"), n_train=8, n_val=2)
    out = tmp_path / "dpo"
    run_cmv(
        "train",
        "--method",
        "dpo",
        "--init",
        "base",
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "dpo.method=full",
        "--set",
        "dpo.max_steps=1",
        "--set",
        "dpo.learning_rate=1.0e-4",
        "--set",
        "dpo.max_length=256",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference_model"] == "frozen_copy" and metrics["base_weight_copies"] == 2
    assert metrics["trainable_parameters"] == metrics["parameters"] and not (out / "adapter").exists()


# ---------------------------------------------------------------- slow tier: kill/resume on S3, torchrun ZeRO-3
# (SIGTERM -> checkpoint, exit 143, resume is the same code for SFT and DPO (cmv_core.train.checkpoints,
# cmv_core.train.resumable.train_resumably): test_train_distributed covers it once.)


def start_dpo(
    fmt: str,
    init: str,
    out: str,
    log_path: Path,
    max_steps: int = 6,
    save_steps: int = 2,
    extra: tuple[str, ...] = (),
    hold: bool = False,
):
    """DPO training in the background; hold: wait at the first mirrored checkpoint until killed
    (tests/train_hold.py), so that the kill cannot come after training finished."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    entry = [str(Path(__file__).parent / "train_hold.py")] if hold else ["-m", "cmv_core.cli"]
    cmd = [
        sys.executable,
        *entry,
        "train",
        "--method",
        "dpo",
        "--input",
        fmt,
        "--init",
        init,
        "--output",
        out,
        "--config",
        TINY,
        "--set",
        f"dpo.max_steps={max_steps}",
        "--set",
        f"dpo.save_steps={save_steps}",
        "--set",
        "dpo.save_total_limit=2",
        "--set",
        "dpo.max_length=256",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.slow
def test_killed_dpo_run_resumes_from_newest_s3_checkpoint_bit_identical(tmp_path, s3_bucket):
    """SIGKILL after the first checkpoint reached S3; the rerun resumes there and ends as an uninterrupted run."""
    import signal

    from test_train_distributed import complete_steps, wait_for_checkpoint

    fmt = write_format_output(str(tmp_path / "format"), n_train=24, n_val=4)
    sft = f"{s3_bucket}/run/train"
    run_cmv(
        "train",
        "--input",
        fmt,
        "--output",
        sft,
        "--config",
        TINY,
        "--set",
        "train.max_steps=2",
        "--set",
        "train.max_length=256",
    )
    out, max_steps = f"{s3_bucket}/run/dpo", 6
    proc = start_dpo(fmt, sft, out, tmp_path / "first.log", hold=True)
    try:
        wait_for_checkpoint(proc, out)  # held there until killed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumable = complete_steps(out)[-1]
    assert resumable == 2 and not storage.exists(storage.join(out, "_SUCCESS"))

    second = start_dpo(fmt, sft, out, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    assert f"resuming from checkpoint-{resumable}" in (tmp_path / "second.log").read_text()
    metrics = storage.read_json(storage.join(out, "metrics.json"))
    assert metrics["resumed_from_step"] == resumable and metrics["global_step"] == max_steps
    assert [r["step"] for r in metrics["train_loss"]] == list(range(1, max_steps + 1))

    baseline = tmp_path / "baseline"
    third = start_dpo(fmt, sft, str(baseline), tmp_path / "baseline.log")
    assert third.wait(timeout=900) == 0, (tmp_path / "baseline.log").read_text()[-4000:]
    expected = json.loads((baseline / "metrics.json").read_text())
    for key in ("loss", "rewards/margins", "rewards/accuracies"):
        assert [r[key] for r in metrics["train_loss"]] == [r[key] for r in expected["train_loss"]]
    assert_same_adapter(out, baseline, tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes_zero3_dpo_saves_loadable_adapter(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from conftest import REPO
    from peft import PeftModel
    from test_train_distributed import assert_one_writer, audited_env, free_port
    from transformers import AutoModelForCausalLM

    fmt = write_format_output(str(tmp_path / "format"), n_train=16, n_val=4)
    out = tmp_path / "dpo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "cmv_core.cli",
        "train",
        "--method",
        "dpo",
        "--init",
        "base",
        "--input",
        fmt,
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "dpo.deepspeed=zero3",
        "--set",
        "dpo.max_steps=2",
        "--set",
        "dpo.max_length=256",
    ]
    writes = tmp_path / "writes.log"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=audited_env(out, writes))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_one_writer(out, writes)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed"] == "zero3.json" and metrics["global_step"] == 2
    assert metrics["reference_model"] == "adapter_disabled"
    adapter = read_tensors(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    AutoModelForCausalLM.from_pretrained(str(out / "model"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))


@pytest.mark.parametrize("name", ["tiny.yaml", "demo.yaml", "llama-3.2-1b.yaml", "llama-3.2-3b.yaml"])
def test_shipped_recipes_have_a_dpo_section_trl_accepts(name):
    import dataclasses

    from trl import DPOConfig

    from cmv_core.config import load_recipe
    from cmv_core.stages import dpo_enabled
    from cmv_core.train.dpo import dpo_section

    recipe = load_recipe(str(CONFIGS / name))
    cfg = dpo_section(recipe)
    assert dpo_enabled(recipe) and cfg.method == "lora" and cfg.init == "train"
    assert set(cfg.dpo_args or {}) <= {f.name for f in dataclasses.fields(DPOConfig)}
    assert not dpo_enabled(load_recipe(str(CONFIGS / name), ["dpo.enabled=false"]))


@pytest.mark.slow
def test_cmv_run_trains_dpo_after_sft_and_the_report_compares_it(tiny_pipeline_run):
    """The local pipeline on the tiny recipe: SFT, then DPO from it, three variants generated, dpo judged
    (conftest's one `cmv run` of the recipe, which tests/test_k8s_real_outputs.py reads too)."""
    from conftest import TINY_RUN_ID

    root, stdout = tiny_pipeline_run
    run = root / TINY_RUN_ID
    assert "=== dpo: cmv train --method dpo" in stdout
    dpo = storage.require_success(str(run / "dpo"))
    assert {i["uri"] for i in dpo["inputs"]} == {str(run / "format"), str(run / "train")}
    models = {g["model"] for g in storage.read_jsonl(str(run / "generate" / "generations.jsonl"))}
    assert models == {"base", "finetuned", "dpo"}
    report = json.loads((run / "judge" / "report.json").read_text())
    text = json.dumps(report)
    for comparison in ("dpo_vs_finetuned", "dpo_vs_base", "dpo_vs_human", "finetuned_vs_base"):
        assert comparison in text, comparison
    md = (run / "judge" / "report.md").read_text()
    assert "dpo vs finetuned" in md and "dpo vs base" in md and "dpo vs human" in md
