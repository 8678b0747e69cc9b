"""The dump's files and lines: which files an input names, and every line of them, streamed.

Reading is streaming (one line = one thread is the unit of memory); a compressed stream
(`.gz`, `.bz2`, `.zst`: storage.open_read) that breaks gives one marked line, not an exception.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cmv_core import storage

# Thread files inside an input directory. Tan et al.'s archive also holds
# pair_task/ and op_task/ files in another line format: those are not threads.
# Cornell thread files; Pushshift's subreddit dumps (changemyview_submissions.zst) and monthly ones (RS_2015-01.zst)
_THREAD_FILE = re.compile(
    r"\.(?:jsonlist|jsonl|json)(?:\.gz|\.bz2|\.zst)?$"
    r"|(?:_submissions|_comments|(?:^|/)R[SC]_\d{4}-\d{2})\.zst$"
)
_NOT_THREADS = re.compile(r"(?:^|/)(?:pair_task|op_task)/|_pair_data\.|_op_data\.")


def _is_dir(uri: str) -> bool:
    if uri.endswith("/"):
        return True
    if storage.is_s3(uri):
        return not storage.exists(uri)  # a prefix, not an object
    return storage.local_path(uri).is_dir()


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files to read, in order: each input as given; a directory (or prefix) becomes
    its thread files (`*.jsonlist`, `*.jsonl`, `*.json`, optionally `.gz`/`.bz2`/`.zst`, and
    Pushshift's `*_submissions.zst`, `*_comments.zst`, `RS_YYYY-MM.zst`, `RC_YYYY-MM.zst`),
    sorted, skipping Tan et al.'s pair_task/op_task files."""
    files: list[str] = []
    for uri in inputs:
        if not _is_dir(uri):
            files.append(uri)
            continue
        found = [
            storage.join(uri, rel)
            for rel in storage.list_files(uri)
            if _THREAD_FILE.search(rel) and not _NOT_THREADS.search(rel)
        ]
        if not found:
            raise FileNotFoundError(
                f"no thread files (*.jsonlist[.gz|.bz2|.zst], *.jsonl..., *_comments.zst) under {uri}"
            )
        files.extend(found)
    return files


@dataclass(slots=True)
class Line:
    file: str
    number: int  # 1-based
    raw: bytes
    error: str | None = None  # the stream itself broke here (truncated .gz/.bz2)


def iter_lines(files: Iterable[str]) -> Iterator[Line]:
    """Every line of every file, streamed. A compressed stream that ends early or is
    corrupt yields one `Line` with `error` set and reading goes on with the next file
    (a file that cannot be opened at all is an error, raised)."""
    for uri in files:
        number = 0
        with storage.open_read(uri, "rb") as f:
            try:
                for raw in f:
                    number += 1
                    yield Line(uri, number, raw)
            except (EOFError, OSError, zlib.error) as e:
                yield Line(uri, number + 1, b"", error=f"{type(e).__name__}: {e}")
