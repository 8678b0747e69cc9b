"""The judge's configuration (``JudgeConfig``, the recipe's ``judge`` section), its constants
(rubric version, criteria, variant names, prices) and its errors."""

from __future__ import annotations

from dataclasses import dataclass, field

from cmv_core import errors

# Bump when a prompt, rubric or form changes: it is part of every cache key and of the report.
RUBRIC_VERSION = "cmv-likert7-v1"
LIKERT = [1, 2, 3, 4, 5, 6, 7]
HUMAN = "human"  # the variant name of the human reply that won the delta (from test.jsonl)
HUMAN_NONDELTA = "human_nondelta"  # the matched reply of an ordinary commenter that won no delta (pairs.jsonl)

# Anchored descriptions (1, 4, 7) so that scores mean the same thing across replies and runs.
CRITERIA = {
    "persuasiveness": (
        "Persuasiveness to this OP: how likely is the reply to change this OP's view, at least in "
        "part (to earn a delta from them)? 1 = no chance: ignores or restates the OP's reasons, or "
        "would make them dig in. 4 = raises a relevant point, but unlikely to move this OP by itself. "
        "7 = engages the OP's own stated reasons with a specific, strong argument or evidence they "
        "have not considered; a reasonable OP would likely change at least part of their view."
    ),
    "relevance": (
        "Relevance to the post: does the reply address this post's actual view and reasoning? "
        "1 = off-topic, or generic text that could be posted under any view. 4 = on topic, but "
        "addresses the view loosely or only a side point. 7 = squarely addresses the OP's central "
        "claim and the specific reasons they gave."
    ),
    "civility": (
        "Civility and good faith: 1 = hostile, insulting or mocking, or arguing in bad faith "
        "(straw man, misrepresenting the OP). 4 = mostly civil, with some condescension or an "
        "uncharitable reading. 7 = respectful, reads the OP charitably, honest about uncertainty."
    ),
    "fluency": (
        "Fluency: is the reply clear, coherent, well-formed English? 1 = incoherent, repetitive, "
        "truncated or broken text. 4 = understandable, with noticeable errors, repetition or "
        "awkward passages. 7 = clear, well organized, natural prose."
    ),
}


# USD per million tokens. Local models cost nothing; unknown models are reported as unpriced.
DEFAULT_PRICES = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    "gpt-4.1-nano": {"input": 0.10, "output": 0.40},
    # Batch API: half the synchronous price (OpenAI's published batch discount)
    "gpt-4o-mini@batch": {"input": 0.075, "output": 0.30},
    "gpt-4o@batch": {"input": 1.25, "output": 5.00},
    "gpt-4.1-mini@batch": {"input": 0.20, "output": 0.80},
    "gpt-4.1-nano@batch": {"input": 0.05, "output": 0.20},
}


@dataclass
class JudgeConfig:
    backend: str = "openai"  # "openai" (any OpenAI-compatible endpoint), "openai-batch" or "local"
    model: str = "gpt-4o-mini"  # judge model name, or a model spec for the local backend
    base_url: str | None = None  # default: $OPENAI_BASE_URL, else OpenAI
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    concurrency: int = 16  # judge calls in flight at once
    max_retries: int = 6  # the openai client's own retries (429/5xx/timeouts)
    timeout_s: float = 60.0  # per request
    # aiohttp: less client CPU per call than httpx (3.2 vs 4.1 ms, benchmarks/bench_judge.py), which
    # bounds throughput at high concurrency | httpx: the openai client's default transport
    http_transport: str = "aiohttp"
    parse_retries: int = 2  # extra asks after an unparseable verdict
    temperature: float = 0.0
    max_tokens: int = 400  # sent as token_limit_param
    token_limit_param: str = "max_completion_tokens"  # or "max_tokens" for servers that only take that
    api_seed: int | None = 0  # sent as `seed` (best-effort determinism), recorded per call
    response_format: str = "json_schema"  # json_schema | json_object | none
    logprobs: bool = True  # ask for top log-probabilities (weighted Likert score)
    top_logprobs: int = 10
    criteria: list[str] = field(default_factory=lambda: list(CRITERIA))
    single: bool = True
    grade_human: bool = True  # also grade the human delta-winning reply
    pairwise: bool = True
    # "finetuned" is the SFT model; "dpo" (when generated) the DPO model trained from it. A comparison whose
    # variant no item has (no DPO in this run) is left out.
    comparisons: list[list[str]] = field(
        default_factory=lambda: [
            ["finetuned", "base"],
            ["finetuned", HUMAN],
            ["base", HUMAN],
            ["finetuned", HUMAN_NONDELTA],
            ["base", HUMAN_NONDELTA],
            ["dpo", "finetuned"],
            ["dpo", "base"],
            ["dpo", HUMAN],
        ]
    )
    # Which test prompts get a human reference: "depth1" keeps only winners that reply to the post
    # itself (the judge sees all they answered); "all" also deep winners, which in the single view
    # answer OP turns the judge never sees (unfair to the human side).
    human_reference: str = "depth1"
    nondelta_reference: bool = True  # add variant human_nondelta: the matched reply that won no delta
    # Percentile vs humans (README, "Reading the report"): up to this many human replies of each test thread
    # (the delta winners and matched losers of pairs.jsonl) are graded like the variants' replies, which are
    # ranked among them. 10: the format stage gives two per winning branch, so it rarely binds and only caps
    # the calls on threads with many winning branches; most are the validation rubric's own calls (cached).
    # 0: off. Needs single: true.
    human_replies: int = 10
    calibration: bool = True
    validate_instruments: bool = True  # also run the pairwise prompt and the rubric on the delta pairs
    length_probe_items: int = 20  # prompts whose reply is judged against its own trimmed version
    validation_split_date: str | None = None  # time-split view; default: format's test_after when split: time
    # Time split: train-period pairs (pairs_before.jsonl) judged by every instrument (seeded sample). None: as
    # many as max_calibration_pairs, or as the test pairs judged when that is unset; 0: none.
    max_before_pairs: int | None = None
    max_cost_usd: float | None = None  # stop before planned new calls would cost more than this
    batch_poll_s: float = 30.0  # openai-batch: seconds between polls of a running batch
    # openai-batch: "api" (OpenAI's Batch API: upload, create, poll) | "files": the batch input file is written
    # under the cache for a batch runner of one's own (vLLM's `python -m vllm.entrypoints.openai.run_batch`),
    # and its output file, once there beside it, is read back (README, "Judging on a self-hosted server")
    batch_runner: str = "api"
    max_items: int | None = None  # cap on test prompts judged (seeded sample)
    max_calibration_pairs: int | None = None  # cap on calibration pairs (seeded sample)
    # Published pair sets judged by every instrument beside the format stage's pairs (README "Reading the
    # report"): paths or URIs of Tan et al.'s *_pair_data.jsonlist[.bz2] or of a ConvoKit winning-args
    # corpus directory, told apart by content; max_pair_file_pairs: seeded sample per file (None: all).
    pair_files: list[str] = field(default_factory=list)
    max_pair_file_pairs: int | None = None
    max_text_chars: int = 6000  # longer post/reply texts are cut (and marked) in prompts
    local_rationale_tokens: int = 0  # local backend: greedy rationale tokens before scores
    local_batch_size: int = 8  # local backend: calls answered together (1 = one at a time)
    # local backend: auto = bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16: its matmuls
    # ~2.8x, the judge stage ~1.4x faster), else float32 | float32 | bfloat16. Part of the cache key.
    local_dtype: str = "auto"
    # The dry run counts prompt tokens with this tokenizer (a Hugging Face name or directory, chat template
    # applied as the server applies it): the served model's own, for a self-hosted server. None: characters / 4
    # for an API model; the local backend always counts with its model's.
    tokenizer: str | None = None
    max_failed_fraction: float = 0.2  # more failed calls than this fails the stage
    cache: str | None = None  # cache URI (default: <output>/cache)
    cache_flush_every: int = 50  # S3 cache: entries per uploaded shard
    bootstrap_samples: int = 2000
    seed: int = 0
    prices: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))


class InputError(errors.InputError):
    """An input file line lacks what the judge needs."""


class VerdictError(ValueError):
    """A judge answer that is not a usable verdict."""


class JudgeCallError(errors.StageFailed):
    """A judge call failed after the client's own retries."""


class JudgeConfigError(errors.StageFailed):
    """The endpoint refuses every call (bad key, no access, unknown model): the stage stops."""


class JudgeBudgetError(errors.StageFailed):
    """The planned calls would cost more than judge.max_cost_usd: nothing is sent."""


class JudgeBatchPending(errors.StageFailed):
    """judge.batch_runner=files: a batch input file waits for its runner (the message says how)."""


class JudgeFailed(errors.StageFailed):
    """Too many judge calls failed for the results to mean much."""


def price_name(cfg: JudgeConfig) -> str:
    """The price table entry: the Batch API has its own (half) prices, under "<model>@batch"."""
    return f"{cfg.model}@batch" if cfg.backend == "openai-batch" else cfg.model


def call_cost(cfg: JudgeConfig, prompt_tokens: int, completion_tokens: int) -> float:
    if cfg.backend == "local":
        return 0.0
    price = cfg.prices.get(price_name(cfg))
    if price is None:
        return 0.0
    return (prompt_tokens * price["input"] + completion_tokens * price["output"]) / 1e6
