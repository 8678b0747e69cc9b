"""The format stage's settings (the recipe's ``format:`` section), its drop reasons and its input error.

What each setting changes in the data is explained in the module docstring of cmv_core/format/stage.py.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cmv_core.config import ConfigError, parse_utc
from cmv_core.errors import InputError

DEFAULT_INSTRUCTION = (
    "Below is a post from the Change My View subreddit. Write a response that you think will change the author's view."
)
SPLITS = ("train", "val", "test")

# Drop reasons, in the order they are checked (stats.json lists them all, zeros included).
DROP_REASONS = (
    "duplicate_thread",  # the same thread_id seen before in the input (overlapping dumps)
    "duplicate_branch",  # the same rewarded comment twice in one thread
    "deleted_post",  # the OP's text is [deleted]/[removed]
    "deleted_target",  # an assistant turn is [deleted]/[removed]
    "deleted_context",  # an OP turn in the branch is [deleted]/[removed]
    "empty_target",  # nothing left of the target after cleaning (e.g. only quotes)
    "duplicate",  # exact duplicate after normalization
    "too_long",  # rendered conversation over max_tokens
    "target_too_short",  # target under min_target_tokens
)


class FormatInputError(InputError):
    """The clean output is not what the format stage expects (names file, line and reason)."""


@dataclass
class FormatConfig:
    view: str = "single"  # single | multi
    instruction: str = DEFAULT_INSTRUCTION
    instruction_role: str = "user"  # user (prepended to the post) | system
    post_template: str = "{title}\n\n{text}"
    single_target: str = "rewarded"  # rewarded | branch
    others: str = "drop"  # multi-turn: drop | merge (other users' comments join the user side)
    keep_quotes: bool = False
    strip_op_edits: bool = True
    strip_comment_delta_edits: bool = True  # delta-announcing edits and ∆ lines out of every comment turn
    dedupe: str = "messages"  # messages | target | off
    split: str = "hash"  # hash | time
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.1  # split: hash only
    test_after: str | None = None  # split: time; "YYYY-MM-DD" (UTC) or ISO datetime
    max_tokens: int = 2048
    min_target_tokens: int = 0
    token_batch_size: int = 256
    preference_pairs: bool = True  # train/val preference pairs for DPO (train_preferences.jsonl, val_preferences.jsonl)
    preference_max_length_ratio: float | None = None  # keep pairs with longer/shorter reply tokens <= this (None: all)

    def __post_init__(self) -> None:
        choices = {
            "view": ("single", "multi"),
            "instruction_role": ("user", "system"),
            "single_target": ("rewarded", "branch"),
            "others": ("drop", "merge"),
            "dedupe": ("messages", "target", "off"),
            "split": ("hash", "time"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"format.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if isinstance(self.test_after, (dt.date, dt.datetime)):  # YAML reads 2015-05-08 as a date
            self.test_after = self.test_after.isoformat()
        if self.split == "time":
            if not self.test_after:
                raise ConfigError("format.split: time needs format.test_after (e.g. 2015-05-08)")
            parse_utc(self.test_after)
        if not (
            0 <= self.val_fraction <= 1 and 0 <= self.test_fraction <= 1 and self.val_fraction + self.test_fraction <= 1
        ):
            raise ConfigError("format.val_fraction and format.test_fraction must be in [0, 1] and sum to at most 1")
        if self.max_tokens <= 0 or self.token_batch_size <= 0:
            raise ConfigError("format.max_tokens and format.token_batch_size must be positive")
        if self.preference_max_length_ratio is not None and float(self.preference_max_length_ratio) < 1:
            raise ConfigError("format.preference_max_length_ratio must be at least 1 (or null: no balancing)")
