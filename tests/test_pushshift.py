"""Pushshift exports through clean: separate submission and comment record files give exactly the
conversations the Cornell dump gives; duplicates, orphans, bad records, fingerprints, formats, S3."""

from __future__ import annotations

import bz2
import gzip
import json
import random
from pathlib import Path

import pytest
from conftest import run_cmv
from test_clean import read_rejects, read_rows

from cmv_core import storage
from cmv_core.clean.config import CONVERSATIONS, CleanConfig
from cmv_core.clean.readers import input_format
from cmv_core.clean.stage import run_clean
from cmv_core.clean.stats import TooManyRejectsError
from cmv_core.cmv.records import sniff_file
from cmv_core.errors import InputError

ORPHAN_LINK = "t3_zzzzzz"


def pushshift_records(sample_dump) -> tuple[list[dict], list[dict], dict]:
    """The bundled Cornell sample as Pushshift records: submissions without `comments` (every other one
    without `name`), real comments only (no `replies`, no `name`), created_utc an int or a string of
    digits, in shuffled order. Plus a stale duplicate of a submission (read first, no retrieved_on: the
    later one wins), a stale duplicate of a comment (read later but retrieved earlier: the earlier one
    wins) and an orphan comment."""
    subs, comments = [], []
    for i, raw in enumerate(Path(sample_dump).read_bytes().splitlines()):
        thread = json.loads(raw)
        sub = {k: v for k, v in thread.items() if k != "comments"}
        sub["created_utc"] = int(sub["created_utc"]) if i % 2 else str(int(sub["created_utc"]))
        if i % 2:
            del sub["name"]
        subs.append(sub)
        for j, c in enumerate(x for x in thread["comments"] if "body" in x):  # no placeholders or stubs
            c = {k: v for k, v in c.items() if k not in ("replies", "name")}
            c["created_utc"] = int(c["created_utc"]) if j % 2 else str(int(c["created_utc"]))
            comments.append(c)
    random.Random(7).shuffle(comments)

    stale_sub = {**subs[3], "title": "an older title", "selftext": "older text"}
    subs.insert(3, stale_sub)  # read just before the real one; neither has retrieved_on
    kept = next(c for c in comments if c["id"] == "dppsfay")  # 9l7cag's OP delta
    kept["retrieved_on"] = 1_500_000_000
    stale = {**kept, "body": "a stale copy without the delta", "retrieved_on": 1_400_000_000}
    comments.append(stale)  # read later, retrieved earlier
    orphan = {**comments[0], "id": "orphan1", "link_id": ORPHAN_LINK, "parent_id": ORPHAN_LINK}
    comments.insert(5, orphan)
    return subs, comments, {"stale_sub": stale_sub, "orphan": orphan}


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def pushshift_zst(data: bytes) -> bytes:
    """zstd as Pushshift's dumps are written (streamed by zstd --long=31: no content size, a 2 GiB
    window, which zstandard's default decompressor refuses), here in two frames, the second
    starting inside a line."""
    import io

    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)
    half = len(data) // 2 + 7
    out = io.BytesIO()
    for part in (data[:half], data[half:]):
        with zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False) as w:
            w.write(part)
    return out.getvalue()


def write_records(
    directory: Path, subs: list[dict], comments: list[dict], ext: str = "", bad_line: bool = True
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    compress = {
        "": lambda b: b,
        ".gz": lambda b: gzip.compress(b, mtime=0),
        ".bz2": bz2.compress,
        ".zst": pushshift_zst,
    }[ext]
    # the names Pushshift's subreddit dumps have (changemyview_comments.zst)
    name = "{}.zst" if ext == ".zst" else "{}.jsonl" + ext
    sub_path = directory / name.format("changemyview_submissions")
    com_path = directory / name.format("changemyview_comments")
    body = jsonl(comments)
    if bad_line:  # one broken record line among the comments: rejected with its file and line
        head, _, tail = body.partition(b"\n")
        body = head + b'\n{"id": "broken", "body": \n' + tail
    sub_path.write_bytes(compress(jsonl(subs)))
    com_path.write_bytes(compress(body))
    return sub_path, com_path


@pytest.fixture(scope="module")
def cornell_rows(sample_dump, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("cornell") / "clean"
    run_clean([sample_dump], str(out), CleanConfig())
    return read_rows(out)


@pytest.fixture(scope="module")
def records(sample_dump):
    return pushshift_records(sample_dump)


def check_pushshift_output(out, cornell_rows, files: list[str]) -> None:
    subs_file, comments_file = sorted(files, key=lambda f: "comments" in f)
    assert read_rows(out) == cornell_rows  # same threads, order, comments, deltas, winning branches
    stats = json.loads((Path(out) / "stats.json").read_text())
    # 30 submissions and a duplicate; 241 comments, a duplicate and an orphan; one broken line
    assert stats["pushshift"] == {
        "submissions": 31,
        "comments": 243,
        "duplicate_submissions": 1,
        "duplicate_comments": 1,
        "orphan_comments": 1,
    }
    assert stats["lines"] == {"read": 31 + 243 + 1, "blank": 0, "threads_written": 30, "rejected": 1}
    assert stats["rejected_lines_by_reason"] == {"invalid_json": 1}
    assert stats["comments"]["skipped_by_reason"] == {"ancestor_missing": 1, "parent_missing": 1}
    lines_of = {subs_file: 31, comments_file: 244}
    assert [(f["uri"], f["lines"]) for f in stats["files"]] == [(f, lines_of[f]) for f in files]

    rejects = {r["reason"]: r for r in read_rejects(out)}
    assert set(rejects) == {"orphan_comment", "invalid_json", "parent_missing", "ancestor_missing"}
    orphan = rejects["orphan_comment"]
    assert orphan["detail"] == f"no submission {ORPHAN_LINK} in the inputs"
    assert (orphan["file"], orphan["line"], orphan["comment_id"]) == (comments_file, 7, "orphan1")
    assert json.loads(orphan["raw"])["link_id"] == ORPHAN_LINK
    assert (rejects["invalid_json"]["file"], rejects["invalid_json"]["line"]) == (comments_file, 2)
    # a comment dropped from its tree is named at its own record, not at the submission's
    missing = rejects["parent_missing"]
    assert missing["file"] == comments_file and missing["thread_id"] == "o8asbh"
    lines = storage.read_bytes(comments_file)  # decompressed
    assert json.loads(lines.splitlines()[missing["line"] - 1])["id"] == missing["comment_id"]


@pytest.mark.parametrize("ext", ["", ".gz", ".bz2", ".zst"])
def test_pushshift_files_give_the_cornell_conversations(ext, records, cornell_rows, tmp_path):
    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments, ext)
    out = tmp_path / "clean"
    stats = run_clean([str(com_path), str(sub_path)], str(out), CleanConfig())  # comments first: any order
    assert stats is not None
    check_pushshift_output(out, cornell_rows, [str(com_path), str(sub_path)])
    rows = {r["thread_id"]: r for r in read_rows(out)}
    stale_sub = records[2]["stale_sub"]
    assert rows[stale_sub["id"]]["title"] != stale_sub["title"]  # the later-read duplicate submission is kept
    kept = next(c for c in rows["9l7cag"]["comments"] if c["id"] == "dppsfay")
    assert kept["body"] != "a stale copy without the delta"  # the later-retrieved comment, though read first
    assert rows["y4s3xz"]["comments"] == []  # a submission without comments, as in the dump


def test_a_directory_holding_both_and_the_fingerprint(records, cornell_rows, tmp_path, monkeypatch):
    # small fingerprint chunks, so the files span many: the streamed digest must match storage's own
    monkeypatch.setattr(storage, "RAW_CHUNK_BYTES", 4096)
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", 4096)
    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments, ".gz")
    out = tmp_path / "clean"
    assert run_clean([str(tmp_path / "in")], str(out), CleanConfig()) is not None
    check_pushshift_output(out, cornell_rows, [str(com_path), str(sub_path)])  # sorted: comments first
    manifest = json.loads((out / "_SUCCESS").read_text())
    assert manifest["inputs"] == [
        {"uri": str(tmp_path / "in"), "digest": storage.raw_fingerprint(str(tmp_path / "in"))}
    ]
    assert manifest["summary"]["pushshift"]["orphan_comments"] == 1

    assert run_clean([str(tmp_path / "in")], str(out), CleanConfig()) is None  # same content: skipped
    edited = [dict(c) for c in comments]
    edited[10]["body"] += " (edited)"
    write_records(tmp_path / "in", subs, edited, ".gz")
    assert run_clean([str(tmp_path / "in")], str(out), CleanConfig()) is not None  # content changed: reruns


def test_threads_do_not_depend_on_record_or_file_order(records, cornell_rows, tmp_path):
    subs, comments, _ = records
    shuffled = list(comments)
    random.Random(1).shuffle(shuffled)
    half = len(shuffled) // 2
    a = tmp_path / "a"
    sub_path, com_path = write_records(a, subs, shuffled[:half], bad_line=False)
    more = a / "changemyview_comments_2.jsonl"
    more.write_bytes(jsonl(shuffled[half:]))
    inputs = [str(more), str(sub_path), str(com_path)]
    run_clean(inputs, str(tmp_path / "out"), CleanConfig(workers=1))
    assert read_rows(tmp_path / "out") == cornell_rows
    # worker processes take the joined thread lines as they take dump lines: the same bytes
    run_clean(inputs, str(tmp_path / "out2"), CleanConfig(workers=2))
    assert (tmp_path / "out2" / CONVERSATIONS).read_bytes() == (tmp_path / "out" / CONVERSATIONS).read_bytes()


def test_cli_two_inputs_and_mixed_or_comment_only_inputs_refused(records, sample_dump, cornell_rows, tmp_path):
    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments)
    out = tmp_path / "clean"
    run_cmv("clean", "--input", str(sub_path), "--input", str(com_path), "--output", str(out))
    assert read_rows(out) == cornell_rows

    with pytest.raises(InputError, match=r"mix a Cornell thread dump .*sample_cmv.jsonlist.* Pushshift"):
        run_clean([sample_dump, str(com_path)], str(tmp_path / "mixed"), CleanConfig())
    proc = run_cmv("clean", "--input", sample_dump, str(sub_path), "--output", str(tmp_path / "m2"), check=False)
    assert proc.returncode == 2 and "mix a Cornell thread dump" in proc.stderr
    assert not (tmp_path / "m2" / "_SUCCESS").exists()

    with pytest.raises(TooManyRejectsError, match="no Pushshift submission records"):
        run_clean([str(com_path)], str(tmp_path / "only"), CleanConfig())
    assert [r["reason"] for r in read_rejects(tmp_path / "only")].count("orphan_comment") == 242  # once each


def test_bad_records_rejected_with_file_line_and_reason(tmp_path):
    good = {"id": "abc123", "title": "CMV: x", "selftext": "y", "author": "op", "created_utc": "100"}
    lines = [good, {"id": "c1", "body": "z", "link_id": 7, "parent_id": "t3_abc123"}, {"foo": 1}, {"title": "no id"}]
    path = tmp_path / "records.jsonl"
    path.write_bytes(jsonl(lines))
    with pytest.raises(TooManyRejectsError, match="3 of 4 input lines"):
        run_clean([str(path)], str(tmp_path / "out"), CleanConfig())
    got = [(r["line"], r["reason"]) for r in read_rejects(tmp_path / "out")]
    assert got == [(2, "bad_link_id"), (3, "unknown_record"), (4, "missing_id")]


def test_s3_inputs(records, cornell_rows, s3_bucket, tmp_path):
    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments, ".gz")
    for p in (sub_path, com_path):
        with storage.open_write(f"{s3_bucket}/raw/{p.name}", "wb", compress=False) as f:
            f.write(p.read_bytes())
    out = tmp_path / "clean"
    run_clean([f"{s3_bucket}/raw/"], str(out), CleanConfig())
    assert read_rows(out) == cornell_rows
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pushshift"]["orphan_comments"] == 1 and stats["pushshift"]["duplicate_comments"] == 1


def test_a_dump_is_told_from_record_files_by_content(sample_dump, records, tmp_path):
    lines = Path(sample_dump).read_bytes().splitlines(keepends=True)
    first = json.loads(lines[0])
    del first["comments"]  # a dump thread without comments may lack the key: still a dump
    dump = tmp_path / "dump.jsonlist"
    dump.write_bytes(json.dumps(first).encode() + b"\n" + b"".join(lines[1:]))
    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments, ".bz2")
    assert [sniff_file(str(p)) for p in (dump, sub_path, com_path)] == ["cornell", "pushshift", "pushshift"]
    assert input_format([str(sub_path), str(com_path)]) == "pushshift"
    assert input_format([str(dump), sample_dump]) == "cornell"


def test_a_duplicate_submission_keeps_its_first_place_and_the_later_copy(records, cornell_rows, tmp_path):
    subs, comments, extra = records
    real = next(s for s in subs if s["id"] == extra["stale_sub"]["id"] and s is not extra["stale_sub"])
    reordered = [s for s in subs if s is not extra["stale_sub"]]
    reordered.insert(0, {**real, "title": "first seen", "retrieved_on": 2})
    reordered = [{**s, "retrieved_on": 1} if s is real else s for s in reordered]  # read later, retrieved earlier
    sub_path, com_path = write_records(tmp_path / "in", reordered, comments, bad_line=False)
    run_clean([str(sub_path), str(com_path)], str(tmp_path / "out"), CleanConfig())
    rows = read_rows(tmp_path / "out")
    expected_order = [real["id"]] + [r["thread_id"] for r in cornell_rows if r["thread_id"] != real["id"]]
    assert [r["thread_id"] for r in rows] == expected_order
    assert rows[0]["title"] == "first seen"  # the later-retrieved copy, though read first


def test_zst_directory_listing_and_a_truncated_zst(records, cornell_rows, tmp_path):
    """A directory of Pushshift .zst dumps is found by their names; a .zst cut inside a frame is a
    broken stream (EOFError, as for .gz), never a quietly shorter file."""
    import zstandard

    subs, comments, _ = records
    sub_path, com_path = write_records(tmp_path / "in", subs, comments, ".zst")
    out = tmp_path / "clean"
    assert run_clean([str(tmp_path / "in")], str(out), CleanConfig()) is not None
    check_pushshift_output(out, cornell_rows, [str(com_path), str(sub_path)])  # sorted: comments first
    with pytest.raises(zstandard.ZstdError, match="too much memory"):  # the library's default refuses it
        zstandard.ZstdDecompressor().stream_reader(com_path.open("rb")).read()

    data = com_path.read_bytes()
    com_path.write_bytes(data[: len(data) - 40])
    with pytest.raises(EOFError, match="ended inside a frame"):
        storage.read_bytes(str(com_path))
    com_path.write_bytes(b"not zstd at all" * 10)
    with pytest.raises(OSError, match="corrupt zstd stream"):
        storage.read_bytes(str(com_path))
