"""Generate stage with the tiny random Llama through the transformers backend, plus the vLLM argument mapping."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CONFIGS, run_cmv

from cmv_core import storage
from cmv_core.generate import stage as gen
from cmv_core.generate.config import GenerateConfig, InputError, Reply, Variant, check_config
from cmv_core.generate.hf import reply_from_ids
from cmv_core.generate.prompts import prompt_messages
from cmv_core.generate.stop_tokens import end_of_turn_ids
from cmv_core.generate.variants import parse_variant, variants_from_args
from cmv_core.generate.vllm_engine import (
    adapter_rank,
    reply_from_vllm,
    vllm_engine_kwargs,
    vllm_lora_rank,
    vllm_sampling_kwargs,
)

SYSTEM = "You reply to Change My View posts."
PROMPT_BODIES = [
    "CMV: cats are better than dogs.",
    "CMV: remote work is worse for junior engineers, because they learn less from watching others work.",
    "CMV: tipping should be abolished.",
    "CMV: cities should ban cars from their centres entirely and give the streets to bikes, buses and people.",
    "CMV: pineapple belongs on pizza.",
    "CMV: space exploration is a waste of money while problems on Earth remain unsolved.",
    "CMV: exams measure memory, not understanding.",
]


def _rows() -> list[dict]:
    rows = []
    for i, body in enumerate(PROMPT_BODIES):
        messages = [{"role": "user", "content": body}, {"role": "assistant", "content": f"human reply {i}"}]
        if i % 2 == 0:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        if i == 3:  # a longer thread: the prompt stops before the FIRST assistant turn
            messages += [{"role": "user", "content": "OP answers"}, {"role": "assistant", "content": "second reply"}]
        rows.append({"id": f"p{i}", "thread_id": f"t{i}", "messages": messages, "meta": {"split": "test"}})
    return rows


def write_format_output(uri: str, rows: list[dict] | None = None, raw_lines: list[str] | None = None) -> str:
    """A format stage output: test.jsonl and its _SUCCESS."""
    run = storage.begin_stage("format", uri, inputs=[], config={"fixture": True}, run_id="t")
    if raw_lines is not None:
        storage.write_text(storage.join(uri, "test.jsonl"), "".join(line + "\n" for line in raw_lines))
    else:
        storage.write_jsonl(storage.join(uri, "test.jsonl"), rows if rows is not None else _rows())
    storage.finish_stage(run, {"test": len(rows or [])})
    return uri


@pytest.fixture()
def format_dir(tmp_path) -> str:
    return write_format_output(str(tmp_path / "format"))


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model with larger random weights: greedy decoding then gives varied tokens
    (the stock tiny model answers only newlines, which would make the decoding checks vacuous)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("varied") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def lora_adapter_dir(tmp_path_factory, tiny_model_dir) -> str:
    """A LoRA adapter on the tiny model with random (non-zero) B matrices, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=12, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(out)
    return str(out)


def config(model: str, **kw) -> GenerateConfig:
    base = dict(max_new_tokens=6, shard_size=3, batch_size=4, variants=[{"name": "base", "model": model}])
    return GenerateConfig(**{**base, **kw})


def read_lines(uri: str) -> list[dict]:
    return list(storage.read_jsonl(uri))


# ---------------------------------------------------------------- pure functions


def test_prompt_stops_before_first_assistant_turn():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert prompt_messages(messages) == messages[:2]
    with pytest.raises(ValueError, match="end with a user turn"):
        prompt_messages([{"role": "assistant", "content": "a"}])


def test_reply_cut_at_first_stop_token():
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    stop = reply_from_ids([5, 6, 2, 9, 2], {2}, 11, decode)
    assert stop == Reply("5 6", "stop", 11, 3)  # the stop token counts; what follows is padding
    assert reply_from_ids([5, 6, 7], {2}, 4, decode) == Reply("5 6 7", "length", 4, 3)


def test_end_of_turn_ids_include_chat_end_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = end_of_turn_ids(tok, [7, 8])
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert {7, 8, tok.eos_token_id} <= set(ids)


def test_parse_variant():
    assert parse_variant("ft=s3://b/run/train/model") == ("ft", "s3://b/run/train/model", None)
    assert parse_variant("ft=embedded:x,adapter=/a/b") == ("ft", "embedded:x", "/a/b")
    with pytest.raises(InputError, match="NAME=MODEL"):
        parse_variant("justaname")


def _fake_train_output(root: Path, with_model=True, with_adapter=True, trained_from=None) -> str:
    out = str(root / "train")
    config = {"model": trained_from} if trained_from else {}
    run = storage.begin_stage("train", out, inputs=[], config=config, run_id="r")
    if with_model:
        storage.write_json(storage.join(out, "model", "config.json"), {})
    if with_adapter:
        storage.write_json(storage.join(out, "adapter", "adapter_config.json"), {"r": 8})
    storage.finish_stage(run, {})
    return out


def test_variants_from_train_output(tmp_path):
    trained = _fake_train_output(tmp_path)
    merged = variants_from_args(model=None, recipe_model="embedded:base", trained=trained)
    assert merged == [Variant("base", "embedded:base"), Variant("finetuned", f"{trained}/model")]
    via_adapter = variants_from_args(
        model=None, recipe_model="embedded:base", trained=trained, finetuned_weights="adapter"
    )
    assert via_adapter[1] == Variant("finetuned", "embedded:base", f"{trained}/adapter")
    # A train output given as --model is read as --trained (the base is the recipe's model).
    assert variants_from_args(model=trained, recipe_model="embedded:base") == merged
    # Only an adapter (no merged model/): base + adapter even when merged weights are asked for.
    only_adapter = _fake_train_output(tmp_path / "x", with_model=False)
    assert variants_from_args(model="m", recipe_model="r", trained=only_adapter)[1].adapter == f"{only_adapter}/adapter"
    # The adapter goes on the model the train stage started from, whatever --model says.
    recorded = _fake_train_output(tmp_path / "y", trained_from="embedded:trained-from")
    assert variants_from_args(model="other", recipe_model="r", trained=recorded, finetuned_weights="adapter") == [
        Variant("base", "other"),
        Variant("finetuned", "embedded:trained-from", f"{recorded}/adapter"),
    ]
    explicit = variants_from_args(model=None, recipe_model="r", variant_args=["a=m1", f"b={trained}"])
    assert explicit == [Variant("a", "m1"), Variant("b", f"{trained}/model")]
    with pytest.raises(InputError, match="replaces"):
        variants_from_args(model="m", recipe_model="r", variant_args=["a=m1"])


def test_check_config_rejects_bad_settings():
    with pytest.raises(InputError, match="backend"):
        check_config(config("m", backend="onnx"))
    with pytest.raises(InputError, match="unique"):
        check_config(config("m", variants=[{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]))
    with pytest.raises(InputError, match="variant name"):
        check_config(config("m", variants=[{"name": "a/b", "model": "m"}]))


def test_vllm_engine_kwargs_lora_rank_and_pass_through():
    cfg = config(
        "m", tensor_parallel_size=2, seed=7, vllm_engine_args={"gpu_memory_utilization": 0.8, "max_model_len": 4096}
    )
    kwargs = vllm_engine_kwargs("/models/base", [12, 4], cfg)
    assert kwargs == {
        "model": "/models/base",
        "tensor_parallel_size": 2,
        "seed": 7,
        "enable_lora": True,
        "max_lora_rank": 16,  # 12 rounded up to the next rank vLLM accepts
        "max_loras": 2,
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
    }
    assert "enable_lora" not in vllm_engine_kwargs("/m", [], cfg)
    # The recipe may raise the LoRA limits; it may not set what the stage owns.
    assert vllm_engine_kwargs("/m", [8], config("m", vllm_engine_args={"max_lora_rank": 64}))["max_lora_rank"] == 64
    with pytest.raises(InputError, match="tensor_parallel_size"):
        vllm_engine_kwargs("/m", [], config("m", vllm_engine_args={"tensor_parallel_size": 4}))
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(InputError):
        vllm_lora_rank(1024)


def test_adapter_rank_reads_rank_pattern(tmp_path):
    storage.write_json(str(tmp_path / "adapter_config.json"), {"r": 8, "rank_pattern": {"q_proj": 24}})
    assert adapter_rank(str(tmp_path)) == 24


def test_vllm_sampling_and_output_mapping():
    greedy = vllm_sampling_kwargs(config("m", max_new_tokens=50, top_p=0.9), 2, 100, [2, 3])
    assert greedy == [
        {
            "n": 1,
            "max_tokens": 50,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 100,
            "stop_token_ids": [2, 3],
            "skip_special_tokens": True,
        },
        {
            "n": 1,
            "max_tokens": 50,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 101,
            "stop_token_ids": [2, 3],
            "skip_special_tokens": True,
        },
    ]
    sampled = vllm_sampling_kwargs(config("m", temperature=0.7, top_p=0.9), 1, 5, [2])[0]
    assert (sampled["temperature"], sampled["top_p"]) == (0.7, 0.9)
    out = SimpleNamespace(
        request_id="0",
        prompt_token_ids=[1, 2, 3, 4],
        outputs=[SimpleNamespace(text=" Hello there ", token_ids=[10, 11, 2], finish_reason="stop")],
    )
    assert reply_from_vllm(out) == Reply("Hello there", "stop", 4, 3)
    out.outputs[0].finish_reason = "abort"
    with pytest.raises(RuntimeError, match="abort"):
        reply_from_vllm(out)


def test_bad_test_line_names_file_and_line(tmp_path, tiny_model_dir):
    good = json.dumps(_rows()[0])
    data = write_format_output(str(tmp_path / "format"), raw_lines=[good, "", '{"thread_id": "x", "messages": []}'])
    with pytest.raises(InputError, match=r"test\.jsonl:3: 'messages' must be a non-empty list"):
        gen.run_generate(data, str(tmp_path / "gen"), config(tiny_model_dir))
    assert not storage.exists(str(tmp_path / "gen" / "_SUCCESS"))


def test_refuses_data_without_success(tmp_path, tiny_model_dir):
    storage.write_jsonl(str(tmp_path / "format" / "test.jsonl"), _rows())
    with pytest.raises(storage.MissingInputError, match="_SUCCESS"):
        gen.run_generate(str(tmp_path / "format"), str(tmp_path / "gen"), config(tiny_model_dir))


# ---------------------------------------------------------------- the stage, tiny model


def test_schema_order_and_variants(tmp_path, format_dir, tiny_model_dir, lora_adapter_dir):
    from transformers import AutoTokenizer

    out = str(tmp_path / "gen")
    cfg = config(
        tiny_model_dir,
        variants=[
            {"name": "base", "model": tiny_model_dir},
            {"name": "finetuned", "model": tiny_model_dir, "adapter": lora_adapter_dir},
        ],
    )
    manifest = gen.run_generate(format_dir, out, cfg)
    rows = read_lines(f"{out}/generations.jsonl")
    n = len(PROMPT_BODIES)
    assert [(r["model"], r["id"]) for r in rows] == [(v, f"p{i}") for v in ("base", "finetuned") for i in range(n)]
    assert list(rows[0]) == [
        "id",
        "thread_id",
        "model",
        "model_path",
        "adapter_path",
        "messages",
        "response",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    ]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row, source in zip(rows, _rows() * 2):
        assert row["thread_id"] == source["thread_id"]
        first_assistant = next(i for i, m in enumerate(source["messages"]) if m["role"] == "assistant")
        assert row["messages"] == source["messages"][:first_assistant]
        text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        assert row["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
        assert row["finish_reason"] in ("stop", "length")
        assert 1 <= row["completion_tokens"] <= 6
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == 6
    assert rows[0]["adapter_path"] is None and rows[n]["adapter_path"] == lora_adapter_dir
    # The adapter changes the model: the variants do not answer identically.
    assert [r["response"] for r in rows[:n]] != [r["response"] for r in rows[n:]]

    stats = storage.read_json(f"{out}/stats.json")
    assert stats["generations"] == 2 * n and stats["prompts"] == n
    assert stats["variants"]["base"]["prompts"] == n
    assert stats["variants"]["base"]["completion_tokens"] == sum(r["completion_tokens"] for r in rows[:n])
    assert stats["variants"]["base"]["completion_tokens_per_s"] > 0
    assert manifest["summary"]["generations"] == 2 * n
    assert {f["path"] for f in manifest["files"]} == {"generations.jsonl", "stats.json"}  # shards cleaned up


def test_only_new_tokens_are_decoded(tmp_path, format_dir, varied_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "gen")
    gen.run_generate(format_dir, out, config(varied_model_dir, max_new_tokens=10))
    row = read_lines(f"{out}/generations.jsonl")[1]

    tok = AutoTokenizer.from_pretrained(varied_model_dir)
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir)
    ids = tok(
        tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
        return_tensors="pt",
    )
    with torch.inference_mode():
        direct = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    new = direct[0, ids["input_ids"].shape[1] :]
    assert row["response"] == tok.decode(new, skip_special_tokens=True).strip()
    assert row["response"]
    assert "Change My View" not in row["response"] and "remote work" not in row["response"]


def test_batched_equals_unbatched_greedy(tmp_path, format_dir, varied_model_dir):
    a, b = str(tmp_path / "batched"), str(tmp_path / "single")
    gen.run_generate(format_dir, a, config(varied_model_dir, max_new_tokens=8, batch_size=4, shard_size=7))
    gen.run_generate(format_dir, b, config(varied_model_dir, max_new_tokens=8, batch_size=1, shard_size=7))
    assert storage.read_bytes(f"{a}/generations.jsonl") == storage.read_bytes(f"{b}/generations.jsonl")
    responses = [r["response"] for r in read_lines(f"{a}/generations.jsonl")]
    assert len(set(responses)) == len(responses)  # real, distinct replies, so the equality means something


class Killed(Exception):
    pass


def seeded_two_variant_config(model_dir: str, seed: int):
    # Seeded sampling, so "the same lines" is a real claim and not just greedy determinism.
    variants = [{"name": "base", "model": model_dir}, {"name": "other", "model": model_dir}]
    return config(model_dir, temperature=1.0, seed=seed, variants=variants)


def test_resume_after_kill_is_byte_identical(tmp_path, format_dir, varied_model_dir):
    cfg = seeded_two_variant_config(varied_model_dir, seed=3)
    whole = str(tmp_path / "whole")
    gen.run_generate(format_dir, whole, cfg)

    out = str(tmp_path / "resumed")
    made: list[tuple[str, int]] = []

    def kill_after_third(variant: str, k: int) -> None:
        made.append((variant, k))
        if len(made) == 3:
            raise Killed

    with pytest.raises(Killed):
        gen.run_generate(format_dir, out, cfg, after_shard=kill_after_third)
    assert not storage.exists(f"{out}/_SUCCESS") and not storage.exists(f"{out}/generations.jsonl")
    assert [f for f in storage.list_files(f"{out}/shards") if f.endswith(".jsonl")] == [
        "base-00000.jsonl",
        "base-00001.jsonl",
        "base-00002.jsonl",
    ]

    made.clear()
    manifest = gen.run_generate(format_dir, out, cfg, after_shard=lambda v, k: made.append((v, k)))
    assert made == [("other", 0), ("other", 1), ("other", 2)]  # only the missing shards were made
    assert manifest["summary"]["shards_resumed"] == 3
    assert storage.read_bytes(f"{out}/generations.jsonl") == storage.read_bytes(f"{whole}/generations.jsonl")
    responses = [r["response"] for r in read_lines(f"{whole}/generations.jsonl")]
    assert len(set(responses)) > 1

    # Same inputs and config: skipped. Another config: shards of the old one are not reused.
    made.clear()
    gen.run_generate(format_dir, out, cfg, after_shard=lambda v, k: made.append((v, k)))
    assert made == []
    with pytest.raises(Killed):
        gen.run_generate(format_dir, out, dataclasses.replace(cfg, seed=4), after_shard=kill_after_third)
    made.clear()
    gen.run_generate(format_dir, out, dataclasses.replace(cfg, seed=5), after_shard=lambda v, k: made.append((v, k)))
    assert len(made) == 6


KILL_SCRIPT = """
import json, os, signal, sys
from cmv_core.generate import stage as gen
from cmv_core.generate.config import GenerateConfig
data, out, cfg = sys.argv[1], sys.argv[2], GenerateConfig(**json.loads(sys.argv[3]))
made = []
def kill(variant, k):
    made.append((variant, k))
    if len(made) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no exception, no finally, no cleanup
gen.run_generate(data, out, cfg, after_shard=kill)
"""


def test_resume_after_sigkill_writes_the_same_lines(tmp_path, format_dir, varied_model_dir):
    """A process killed outright (SIGKILL, as the OOM killer or a node loss does) in the middle of a
    variant: the rerun keeps its shards, makes only the rest, and writes the uninterrupted run's lines."""
    import subprocess
    import sys

    cfg = seeded_two_variant_config(varied_model_dir, seed=11)
    whole = str(tmp_path / "whole")
    gen.run_generate(format_dir, whole, cfg)

    out = str(tmp_path / "killed")
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, format_dir, out, json.dumps(dataclasses.asdict(cfg))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(Path(__file__).resolve().parents[1]),
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not storage.exists(f"{out}/_SUCCESS") and not storage.exists(f"{out}/generations.jsonl")
    assert [f for f in storage.list_files(f"{out}/shards") if f.endswith(".jsonl")] == [
        "base-00000.jsonl",
        "base-00001.jsonl",
    ]

    made: list[tuple[str, int]] = []
    manifest = gen.run_generate(format_dir, out, cfg, after_shard=lambda v, k: made.append((v, k)))
    assert made == [("base", 2), ("other", 0), ("other", 1), ("other", 2)]
    assert manifest["summary"]["shards_resumed"] == 2
    assert storage.read_bytes(f"{out}/generations.jsonl") == storage.read_bytes(f"{whole}/generations.jsonl")
    assert len({r["response"] for r in read_lines(f"{whole}/generations.jsonl")}) > 1


def test_s3_input_and_output(s3_bucket, tiny_model_dir):
    data = write_format_output(f"{s3_bucket}/run/format")
    out = f"{s3_bucket}/run/generate"
    manifest = gen.run_generate(data, out, config(tiny_model_dir, max_prompts=4, max_new_tokens=4))
    rows = read_lines(f"{out}/generations.jsonl")
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    assert storage.list_files(out) == ["_SUCCESS", "generations.jsonl", "stats.json"]
    assert manifest["run_id"] == "run"


def test_cli(tmp_path, format_dir, tiny_model_dir):
    out = tmp_path / "gen"
    run_cmv(
        "generate",
        "--data",
        format_dir,
        "--model",
        tiny_model_dir,
        "--output",
        str(out),
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--set",
        "generate.max_new_tokens=3",
        "--set",
        "generate.max_prompts=2",
    )
    rows = read_lines(str(out / "generations.jsonl"))
    assert [(r["model"], r["id"], r["completion_tokens"]) for r in rows] == [("base", "p0", 3), ("base", "p1", 3)]
    bad = run_cmv("generate", "--data", format_dir, "--variant", "x", "--output", str(tmp_path / "g2"), check=False)
    assert bad.returncode == 2 and "NAME=MODEL" in bad.stderr


def test_embedded_tokenizer_is_read_from_the_gguf_once_and_matches_it(tmp_path, monkeypatch):
    """The SmolLM2 tokenizer is converted from the GGUF file once and cached; the cached one encodes
    and renders chat exactly as the GGUF one, and a later load does not read the GGUF again."""
    from transformers import AutoTokenizer

    from cmv_core import models

    monkeypatch.setenv("CMV_CACHE", str(tmp_path / "cache"))
    gguf = models.smollm2_gguf_path()
    direct = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cached = models.load_tokenizer(models.EMBEDDED_DEFAULT)
    text = "CMV: x &amp; y ∆ wörld\n\n  indented\tand 12345"
    chat = [
        {"role": "system", "content": "Judge."},
        {"role": "user", "content": text},
        {"role": "assistant", "content": "A reply."},
    ]
    assert cached.encode(text) == direct.encode(text)
    assert cached.apply_chat_template(chat, tokenize=False) == direct.apply_chat_template(chat, tokenize=False)
    assert (cached.eos_token_id, cached.pad_token_id, len(cached)) == (
        direct.eos_token_id,
        direct.pad_token_id,
        len(direct),
    )

    def no_gguf():
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(models, "smollm2_gguf_path", no_gguf)
    assert models.load_tokenizer(models.TINY_RANDOM).encode(text) == direct.encode(text)
