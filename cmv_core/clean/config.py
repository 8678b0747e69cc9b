"""The clean stage's recipe section (`clean:`) and the names of the files it writes."""

from __future__ import annotations

from dataclasses import dataclass

CONVERSATIONS = "conversations.jsonl.gz"
REJECTS = "rejects.jsonl.gz"
STATS = "stats.json"
MESSAGE_REJECTS = 3  # rejected lines named (file:line: reason) in the reject-limit error


@dataclass
class CleanConfig:
    # Fail the stage when more than this fraction of the non-blank input lines
    # cannot be used as threads (malformed JSON, no id, duplicates, ...).
    max_reject_fraction: float = 0.01
    # Drop "EDIT: ... delta ..." blocks from the OP text: they were written after
    # the view changed and would leak the outcome into the prompt.
    strip_delta_edits: bool = True
    # Processes that parse and rebuild threads. 0: one per usable CPU (at most 4),
    # or none for inputs under 64 MB; 1: everything in this process. The output
    # is byte-identical whatever the number.
    workers: int = 0
