"""The clean stage end to end: schema, stats, rejects, the reject limit, reruns, determinism."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest
from conftest import CONFIGS, run_cmv

from cmv_core import storage
from cmv_core.clean.config import CONVERSATIONS, REJECTS, STATS, CleanConfig
from cmv_core.clean.rows import clean_line
from cmv_core.clean.stage import run_clean
from cmv_core.clean.stats import TooManyRejectsError

TINY = str(CONFIGS / "tiny.yaml")
THREAD_KEYS = {"thread_id", "title", "op_author", "op_text", "created_utc", "comments", "deltas", "winning_branches"}
COMMENT_KEYS = {"id", "parent_id", "author", "body", "created_utc"}
OUTPUTS = (CONVERSATIONS, REJECTS, STATS)
DELTA_KEYS = {"awarding_comment_id", "awarder", "rewarded_comment_id", "recipient", "from_op", "confirmed"}


def read_rows(directory) -> list[dict]:
    with gzip.open(Path(directory) / "conversations.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_rejects(directory) -> list[dict]:
    with gzip.open(Path(directory) / "rejects.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sample_lines(sample_dump) -> list[bytes]:
    return Path(sample_dump).read_bytes().splitlines(keepends=True)


# --- the bundled sample through the real CLI (conftest's clean_output) ---------------------------------


def test_schema_and_tree_invariants(clean_output, sample_dump):
    rows = read_rows(clean_output)
    assert [r["thread_id"] for r in rows] == [json.loads(x)["id"] for x in sample_lines(sample_dump)]  # input order
    for r in rows:
        assert set(r) == THREAD_KEYS
        ids = [c["id"] for c in r["comments"]]
        assert len(ids) == len(set(ids))
        times = [c["created_utc"] for c in r["comments"]]
        assert times == sorted(times)  # chronological
        known = {"t3_" + r["thread_id"]} | {"t1_" + i for i in ids}
        for c in r["comments"]:
            assert set(c) == COMMENT_KEYS and c["parent_id"] in known  # every comment rooted
        for d in r["deltas"]:
            assert set(d) == DELTA_KEYS
        by_id = {c["id"]: c for c in r["comments"]}
        for b in r["winning_branches"]:
            assert set(b) == {"recipient", "comment_ids"}
            path = b["comment_ids"]
            assert by_id[path[0]]["parent_id"] == "t3_" + r["thread_id"]  # top-level first
            assert all(by_id[c]["parent_id"] == "t1_" + p for p, c in zip(path, path[1:]))
            assert by_id[path[-1]]["author"] == b["recipient"]
        assert "footnote from your moderators" not in r["op_text"]
        assert "&gt;" not in r["op_text"] and all("&gt;" not in c["body"] for c in r["comments"])


def test_exact_branches_in_the_sample(clean_output):
    rows = {r["thread_id"]: r for r in read_rows(clean_output)}
    branches = {tid: [b["comment_ids"] for b in r["winning_branches"]] for tid, r in rows.items()}
    assert branches["w6jatj"] == [["dvq5ahb"], ["dk23o6e", "d3pbab2", "d6m5qzc"]]  # two challengers
    assert branches["idlsu7"] == [["djjjida"], ["djjjida", "d7jfbhu", "dxmc25g"]]  # a branch and its extension
    assert branches["tncucu"] == [["d9nh072", "dsi2jgc", "d4rjftl", "dc2tgej", "ddcz4ww"]]  # depth 5
    assert branches["qcy9u2"] == [["d142l0k", "dcv60wk", "d9gi616", "dpubyyo", "dqec3v3"]]  # via a [deleted]
    assert branches["e55xai"] == [["dhvjvt2", "dpjzqej", "dmj0jnq"]]  # "more" placeholder shares dmj0jnq
    assert branches["b82ahm"] == [["d2qpjmg"]]  # placeholder listed after the real comment
    assert branches["jfgp1i"] == [] and rows["jfgp1i"]["deltas"] == []  # OP deleted their account
    assert branches["8969b0"] == []  # a debate with no delta
    assert rows["y4s3xz"]["comments"] == []  # a thread with no comments
    edited = rows["tp3us3"]["op_text"]
    assert "Edit: formatting." in edited and "My view has been changed" not in edited


# Every thread of the bundled sample (sample_threads.yaml scenario in the comment): its winning branches and
# its deltas as (awarding, rewarded, from_op, confirmed), exactly.
SAMPLE_EXPECTED = {
    "9l7cag": ([["dpmfhrw"]], [("dppsfay", "dpmfhrw", True, True)]),  # 1 basic, old format
    "tncucu": (
        [["d9nh072", "dsi2jgc", "d4rjftl", "dc2tgej", "ddcz4ww"]],
        [("dydre5g", "ddcz4ww", True, True)],
    ),  # 2 depth 5, DB3
    "w6jatj": (
        [["dvq5ahb"], ["dk23o6e", "d3pbab2", "d6m5qzc"]],
        [("dmo98qj", "dvq5ahb", True, True), ("dqqr7wi", "d6m5qzc", True, True)],
    ),  # 3 two challengers
    "idlsu7": (
        [["djjjida"], ["djjjida", "d7jfbhu", "dxmc25g"]],
        [("d7jfbhu", "djjjida", True, True), ("dcjl41r", "dxmc25g", True, True)],
    ),  # 4 two in one chain
    "l3bmnp": ([["dl44ray"]], [("dx4qtaz", "dl44ray", True, False), ("dzndkqt", "dl44ray", True, True)]),  # 5
    "gktr4a": (
        [["dqtn7t5", "dx1b5fy", "d3hzio0"]],  # 6 non-OP deltas (one to the OP, rejected)
        [("dnrj016", "ddc096e", False, False), ("d4sabct", "d3hzio0", False, True), ("dv3ayyj", "d3hzio0", True, True)],
    ),
    "wacla6": ([["ddub73b", "dcwuwze", "dqro10z"]], [("da74pxw", "dqro10z", True, True)]),  # 7 quotes, code
    "gjffgz": ([["dt8xprj"]], [("djudnl1", "dt8xprj", True, True)]),  # 8 DeltaBot's own ∆, OP answers it
    "e55xai": ([["dhvjvt2", "dpjzqej", "dmj0jnq"]], [("d86p850", "dmj0jnq", True, True)]),  # 9 placeholder first
    "b82ahm": ([["d2qpjmg"]], [("d9zleoz", "d2qpjmg", True, True)]),  # 10 placeholder after
    "ev7a5i": ([["dglkqwa", "doamyoh", "dody9xg"]], [("dl7se2k", "dody9xg", True, True)]),  # 11 deleted/removed
    "jfgp1i": ([], []),  # 12 OP deleted their account
    "2j830d": ([["d6j4qbv"]], [("d10a2pt", "d6j4qbv", True, True)]),  # 13 removed post
    "eohips": ([["dpfdnvu"]], [("dpw105x", "dpfdnvu", True, True)]),  # 14 !Delta
    "sbh82p": ([["d3idggk"]], [("d2zqtrw", "d3idggk", True, True)]),  # 15 &amp;#8710;
    "tp3us3": ([["dyxa4dy"]], [("dfow63r", "dyxa4dy", True, True)]),  # 16 raw &#8710;, EDIT in the post
    "pyk3n5": ([["d1fk07j"]], [("dboie86", "d1navj5", True, False), ("d9g6vvz", "d1fk07j", True, True)]),  # 17
    "s4gg5w": ([["dul9bvw"]], [("d2p4i1z", "dul9bvw", True, False), ("d3hbs0n", "dul9bvw", True, True)]),  # 18
    "o8asbh": ([["dfew6zm"]], [("d8erxht", "dfew6zm", True, True)]),  # 19 shuffled order, orphans
    "8969b0": ([], []),  # 20 no delta
    "y4s3xz": ([], []),  # 21 no comments
    "pt3og0": ([["db0okas"]], [("d9s9idq", "db0okas", True, True)]),  # 22 escaped underscores
    "9mc227": ([["daoqf7v"]], [("dak05vj", "daoqf7v", True, True)]),  # 23 OP replying to self
    "nyf4zc": ([["dn84l3q"]], [("dw4v21s", "dn84l3q", True, True)]),  # 24 top-level OP token
    "dqjtek": ([["db2eum7", "dfdceh8", "dovyfhc", "depmgcw", "dn41ufa"]], [("do7oxmb", "dn41ufa", True, True)]),  # 25
    "gdgrtc": ([["dvuvdsx"]], [("d7r8foc", "dvuvdsx", False, True), ("drwemjl", "dvuvdsx", True, True)]),  # 26
    "h5kqge": ([["dyllm6j", "dj8gm41", "de5m0vl"]], [("d62yway", "de5m0vl", True, True)]),  # 27 third user wins
    "lunj10": ([["d2m93q1"]], [("d9ecyz2", "d2m93q1", True, True)]),  # 28 "deltabot" in another case
    "wt28kd": ([["d7i4j62"]], [("dk1obao", "d7i4j62", True, True), ("d9ysblw", "dwqueq6", True, False)]),  # 29
    "qcy9u2": (
        [["d142l0k", "dcv60wk", "d9gi616", "dpubyyo", "dqec3v3"]],
        [("dq2k9r0", "dqec3v3", True, True)],
    ),  # 30 via an author deleted mid-branch
}


def test_every_sample_thread_has_exactly_its_branches_and_deltas(clean_output):
    got = {
        r["thread_id"]: (
            [b["comment_ids"] for b in r["winning_branches"]],
            [(d["awarding_comment_id"], d["rewarded_comment_id"], d["from_op"], d["confirmed"]) for d in r["deltas"]],
        )
        for r in read_rows(clean_output)
    }
    assert got == SAMPLE_EXPECTED


def test_stats_and_comment_rejects(clean_output):
    stats = json.loads((Path(clean_output) / "stats.json").read_text())
    assert stats["lines"] == {"read": 30, "blank": 0, "threads_written": 30, "rejected": 0}
    assert stats["rejected_lines_by_reason"] == {}
    assert stats["comments"]["skipped_by_reason"] == {"ancestor_missing": 1, "parent_missing": 1}
    assert (stats["comments"]["more_placeholders"], stats["comments"]["continue_stubs"]) == (2, 1)
    assert stats["deltas"] == {
        "op_confirmed": 29,
        "op_unconfirmed": 4,
        "non_op": 3,
        "non_op_confirmed": 2,
        "rejected_by_deltabot": 4,
    }
    assert stats["winning_branches"] == 29 and stats["threads"]["op_deleted"] == 1
    rejects = read_rejects(clean_output)
    assert sorted((r["reason"], r["level"], r["thread_id"]) for r in rejects) == [
        ("ancestor_missing", "comment", "o8asbh"),
        ("parent_missing", "comment", "o8asbh"),
    ]
    orphan = next(r for r in rejects if r["reason"] == "parent_missing")
    assert json.loads(orphan["raw"])["parent_id"] == "t1_zz99zzz" and "subreddit_id" in json.loads(orphan["raw"])
    assert orphan["file"].endswith("sample_cmv.jsonlist") and orphan["line"] == 12
    manifest = json.loads((Path(clean_output) / "_SUCCESS").read_text())
    assert {f["path"] for f in manifest["files"]} == {"conversations.jsonl.gz", "rejects.jsonl.gz", "stats.json"}
    assert manifest["summary"]["threads_written"] == 30


# --- bad input ---------------------------------------------------------------------------------------------


def test_truncated_line_is_rejected_and_the_rest_unchanged(tmp_path, sample_dump):
    lines = sample_lines(sample_dump)
    bad = tmp_path / "bad.jsonlist"
    bad.write_bytes(b"".join(lines[:4] + [lines[4][:500] + b"\n", b"\n", b"[1, 2]\n"] + lines[5:]))
    run_clean([sample_dump], str(tmp_path / "good"), CleanConfig())
    stats = run_clean([str(bad)], str(tmp_path / "bad"), CleanConfig(max_reject_fraction=0.1))

    broken = json.loads(lines[4])["id"]
    assert read_rows(tmp_path / "bad") == [r for r in read_rows(tmp_path / "good") if r["thread_id"] != broken]
    line_rejects = [r for r in read_rejects(tmp_path / "bad") if r.get("level") != "comment"]
    assert [(r["reason"], r["line"], r["file"]) for r in line_rejects] == [
        ("invalid_json", 5, str(bad)),
        ("not_an_object", 7, str(bad)),
    ]
    assert line_rejects[0]["raw"].encode() == lines[4][:500] and line_rejects[0]["detail"]
    assert stats["rejected_lines_by_reason"] == {"invalid_json": 1, "not_an_object": 1}
    assert stats["lines"] == {"read": 31, "blank": 1, "threads_written": 29, "rejected": 2}


def test_too_many_rejects_fails_with_a_clear_message(tmp_path, sample_dump):
    lines = sample_lines(sample_dump)
    bad = tmp_path / "bad.jsonlist"
    bad.write_bytes(b"".join(lines[:10] + [b'{"title": "no id", "comments": []}\n', b"{oops\n"] + lines[10:]))
    out = tmp_path / "run" / "clean"
    proc = run_cmv(
        "clean",
        "--input",
        str(bad),
        "--output",
        str(out),
        "--config",
        TINY,
        "--set",
        "clean.max_reject_fraction=0.05",
        check=False,
    )
    assert proc.returncode == 2  # bad input
    assert "2 of 32 input lines (6.25%) were rejected" in proc.stderr
    assert "max_reject_fraction=0.05" in proc.stderr and "invalid_json 1" in proc.stderr
    assert "missing_id 1" in proc.stderr and "rejects.jsonl.gz" in proc.stderr
    # the message itself names the file, line and reason of the rejected lines
    assert f"{bad}:11: missing_id" in proc.stderr and f"{bad}:12: invalid_json (" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl.gz", "stats.json"]  # no conversations, no _SUCCESS
    assert [r["line"] for r in read_rejects(out) if r.get("level") != "comment"] == [11, 12]


def test_no_thread_lines_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonlist"
    empty.write_bytes(b"\n\n")
    with pytest.raises(TooManyRejectsError, match="no thread lines"):
        run_clean([str(empty)], str(tmp_path / "out"), CleanConfig())


def test_truncated_gzip_keeps_what_was_read_and_goes_on(tmp_path, sample_dump):
    lines = sample_lines(sample_dump)
    data = gzip.compress(b"".join(lines[:20]))
    cut = tmp_path / "cut.jsonlist.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    rest = tmp_path / "rest.jsonlist.bz2"
    rest.write_bytes(bz2.compress(b"".join(lines[20:])))
    stats = run_clean([str(cut), str(rest)], str(tmp_path / "out"), CleanConfig(max_reject_fraction=0.5))

    got = [r["thread_id"] for r in read_rows(tmp_path / "out")]
    n_cut = stats["files"][0]["lines"]
    assert 0 < n_cut < 20 and got == [json.loads(x)["id"] for x in lines[:n_cut] + lines[20:]]
    line_rejects = [r for r in read_rejects(tmp_path / "out") if r.get("level") != "comment"]
    assert [(r["reason"], r["file"], r["line"]) for r in line_rejects] == [("unreadable_stream", str(cut), n_cut + 1)]
    assert "EOFError" in line_rejects[0]["detail"]


def test_duplicate_threads_across_inputs_are_rejected(tmp_path, sample_dump):
    again = tmp_path / "again.jsonlist.gz"
    again.write_bytes(gzip.compress(b"".join(sample_lines(sample_dump)[:3])))
    stats = run_clean([sample_dump, str(again)], str(tmp_path / "out"), CleanConfig(max_reject_fraction=0.1))
    assert stats["rejected_lines_by_reason"] == {"duplicate_thread": 3}
    line_rejects = [r for r in read_rejects(tmp_path / "out") if r.get("level") != "comment"]
    assert [(r["file"], r["line"]) for r in line_rejects] == [(str(again), 1), (str(again), 2), (str(again), 3)]
    assert len(read_rows(tmp_path / "out")) == 30


def test_a_batch_mixing_duplicates_and_new_threads_keeps_only_the_new_ones(tmp_path, sample_dump):
    """A duplicate is found in the main process, after a worker cleaned its batch: only the new threads
    are written, and the bytes do not depend on the number of workers."""
    lines = sample_lines(sample_dump)
    first, second = tmp_path / "first.jsonlist", tmp_path / "second.jsonlist"
    first.write_bytes(b"".join(lines[:25]))
    second.write_bytes(b"".join(lines[20:]))  # 5 seen before, then 5 new, in one batch
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        stats = run_clean([str(first), str(second)], str(out), CleanConfig(workers=workers, max_reject_fraction=0.2))
        assert stats["rejected_lines_by_reason"] == {"duplicate_thread": 5}
        assert [r["thread_id"] for r in read_rows(out)] == [json.loads(x)["id"] for x in lines]
        outputs.append((out / "conversations.jsonl.gz").read_bytes())
    assert outputs[0] == outputs[1]


# --- reruns, inputs, determinism ---------------------------------------------------------------------------


def test_rerun_is_skipped_via_the_manifest_and_force_reruns(tmp_path, sample_dump, capsys):
    out = str(tmp_path / "clean")
    assert run_clean([sample_dump], out, CleanConfig()) is not None
    before = {p.name: p.read_bytes() for p in Path(out).iterdir()}
    assert run_clean([sample_dump], out, CleanConfig()) is None
    assert {p.name: p.read_bytes() for p in Path(out).iterdir()} == before
    assert run_clean([sample_dump], out, CleanConfig(max_reject_fraction=0.2)) is not None  # config changed
    assert run_clean([sample_dump], out, CleanConfig(max_reject_fraction=0.2), force=True) is not None
    assert (Path(out) / "conversations.jsonl.gz").read_bytes() == before["conversations.jsonl.gz"]


def test_only_a_possible_skip_hashes_the_dump_before_the_run(tmp_path, sample_dump, monkeypatch):
    """A forced rerun, or one whose config changed, takes the dump's fingerprint while it cleans it
    (one read of the dump, not two); the same fingerprint."""
    out = str(tmp_path / "clean")
    run_clean([sample_dump], out, CleanConfig())
    digest = storage.require_success(out)["inputs"][0]["digest"]
    hashed = []
    raw_file_digest = storage.raw_file_digest
    monkeypatch.setattr(
        "cmv_core.storage.digests.raw_file_digest", lambda uri: (hashed.append(uri), raw_file_digest(uri))[1]
    )
    assert run_clean([sample_dump], out, CleanConfig(), force=True) is not None
    assert run_clean([sample_dump], out, CleanConfig(max_reject_fraction=0.2)) is not None
    assert hashed == [] and storage.require_success(out)["inputs"][0]["digest"] == digest
    assert run_clean([sample_dump], out, CleanConfig(max_reject_fraction=0.2)) is None
    assert len(hashed) == 1  # the skip check


def test_directory_of_compressed_files_gives_the_same_conversations(tmp_path, sample_dump):
    lines = sample_lines(sample_dump)
    d = tmp_path / "cmv" / "all"
    d.mkdir(parents=True)
    (d / "a_part.jsonlist.bz2").write_bytes(bz2.compress(b"".join(lines[:12])))
    (d / "b_part.jsonlist.gz").write_bytes(gzip.compress(b"".join(lines[12:])))
    (tmp_path / "cmv" / "pair_task").mkdir()
    (tmp_path / "cmv" / "pair_task" / "train_pair_data.jsonlist").write_text('{"op_text": "not a thread"}\n')
    run_clean([sample_dump], str(tmp_path / "plain"), CleanConfig())
    run_clean([str(tmp_path / "cmv")], str(tmp_path / "dir"), CleanConfig())
    assert (tmp_path / "dir" / "conversations.jsonl.gz").read_bytes() == (
        tmp_path / "plain" / "conversations.jsonl.gz"
    ).read_bytes()


def test_worker_processes_give_byte_identical_output(tmp_path, sample_dump, monkeypatch):
    lines = sample_lines(sample_dump)
    big = tmp_path / "big.jsonlist"
    big.write_bytes(b"".join(lines[:8] + [b"{broken\n"] + lines[8:]))
    monkeypatch.setattr(storage, "RAW_CHUNK_BYTES", 40_000)  # several batches in flight
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", 40_000)
    for workers in (1, 2):
        run_clean([str(big)], str(tmp_path / f"w{workers}"), CleanConfig(workers=workers, max_reject_fraction=0.1))
    for name in ("conversations.jsonl.gz", "rejects.jsonl.gz", "stats.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


# --- plain files: the workers read their own byte ranges ---------------------------------------------------


def awkward_dump(sample_dump) -> tuple[bytes, int]:
    """The sample with CRLF line ends, blank lines, a broken line, a duplicate thread and no newline at
    the end; and a chunk size at which the first chunk ends exactly on a newline (after two lines)."""
    lines = sample_lines(sample_dump)
    crlf = [ln.rstrip(b"\n") + b"\r\n" for ln in lines[3:6]]
    data = b"".join(
        lines[:3] + crlf + [b"\n", b" \t\r\n", b"{broken\n"] + lines[6:29] + [lines[2]] + [lines[29].rstrip(b"\n")]
    )
    return data, len(lines[0]) + len(lines[1])


def streamed_cuts(path: Path, chunk: int) -> list[tuple[int, int]]:
    """Where the streamed lines cut a file into fingerprint chunks (storage.RawDigest's definition)."""
    cuts, start, pos = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            pos += len(line)
            if pos - start >= chunk:
                cuts.append((start, pos))
                start = pos
    return cuts + ([(start, pos)] if pos > start else [])


def test_raw_chunks_cut_where_the_streamed_lines_do(tmp_path, sample_dump, monkeypatch):
    data, on_newline = awkward_dump(sample_dump)
    plain, packed = tmp_path / "dump.jsonlist", tmp_path / "dump.jsonlist.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))  # streamed (decompressed line by line): the reference digest
    (tmp_path / "empty.jsonlist").write_bytes(b"")
    for chunk in (1, 2, on_newline - 1, on_newline, on_newline + 1, 40_000, len(data), 10**9):
        monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", chunk)
        cuts = list(storage.raw_chunks(str(plain)))
        assert cuts == streamed_cuts(plain, chunk), chunk
        assert b"".join(storage.read_range(str(plain), a, b) for a, b in cuts) == data
        assert storage.raw_file_digest(str(plain)) == storage.raw_file_digest(str(packed)), chunk
        assert list(storage.raw_chunks(str(tmp_path / "empty.jsonlist"))) == []
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", on_newline)
    assert list(storage.raw_chunks(str(plain)))[0] == (0, on_newline)  # the boundary on a newline itself
    assert storage.plain_local(str(plain)) and not storage.plain_local(str(packed))
    with pytest.raises(OSError, match="the file changed"):
        storage.read_range(str(plain), len(data) - 10, len(data) + 10)


def test_byte_ranges_give_the_streamed_output_and_fingerprint(tmp_path, sample_dump, monkeypatch):
    """A plain dump read by byte ranges in the workers gives the bytes and the fingerprint that
    streaming it through the main process gives, whatever the number of workers."""
    data, on_newline = awkward_dump(sample_dump)
    dump = tmp_path / "dump.jsonlist"
    dump.write_bytes(data)
    monkeypatch.setattr(storage, "RAW_CHUNK_BYTES", on_newline)  # ~2 lines a chunk: many in flight
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", on_newline)
    chunked = []
    raw_chunks = storage.raw_chunks
    monkeypatch.setattr(storage, "raw_chunks", lambda uri: (chunked.append(uri), raw_chunks(uri))[1])
    monkeypatch.setattr("cmv_core.storage.digests.raw_chunks", lambda uri: (chunked.append(uri), raw_chunks(uri))[1])
    outputs = {}
    for path in ("ranges", "streamed"):
        if path == "streamed":
            monkeypatch.setattr("cmv_core.clean.workers._ranged", lambda uri: False)
        for workers in (1, 2):
            chunked.clear()
            out = tmp_path / f"{path}{workers}"
            run_clean([str(dump)], str(out), CleanConfig(workers=workers, max_reject_fraction=0.1))
            assert chunked == ([str(dump)] if path == "ranges" else [])
            outputs[path, workers] = {name: (out / name).read_bytes() for name in OUTPUTS} | {
                "digest": storage.require_success(str(out))["inputs"][0]["digest"]
            }
    assert all(o == outputs["streamed", 1] for o in outputs.values())
    assert outputs["ranges", 2]["digest"] == storage.raw_fingerprint(str(dump))

    lines = data.splitlines(keepends=True)
    rejects = [r for r in read_rejects(tmp_path / "ranges2") if r.get("level") != "comment"]
    assert [(r["reason"], r["line"], r["raw"]) for r in rejects] == [
        ("invalid_json", 9, "{broken"),
        ("duplicate_thread", 33, lines[2].decode().rstrip("\n")),
    ]  # read back from the file
    stats = json.loads(outputs["ranges", 2]["stats.json"])
    assert stats["files"] == [{"uri": str(dump), "lines": 34}] and stats["lines"]["blank"] == 2
    rows = read_rows(tmp_path / "ranges2")
    assert [r["thread_id"] for r in rows] == [json.loads(x)["id"] for x in sample_lines(sample_dump)]


def test_a_byte_range_that_cannot_be_read_rejects_the_rest_of_its_file(tmp_path, sample_dump, monkeypatch):
    lines = sample_lines(sample_dump)
    first, second = tmp_path / "first.jsonlist", tmp_path / "second.jsonlist"
    first.write_bytes(b"".join(lines[:20]))
    second.write_bytes(b"".join(lines[20:]))
    monkeypatch.setattr(storage, "RAW_CHUNK_BYTES", len(lines[0]) + len(lines[1]) + 1)  # 3 lines a chunk
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", len(lines[0]) + len(lines[1]) + 1)
    read_range = storage.read_range

    def failing(uri, start, end):
        if uri == str(first) and start > 0:
            raise OSError(5, "Input/output error")
        return read_range(uri, start, end)

    monkeypatch.setattr(storage, "read_range", failing)
    monkeypatch.setattr("cmv_core.storage.digests.read_range", failing)
    out = tmp_path / "out"
    stats = run_clean([str(first), str(second)], str(out), CleanConfig(workers=1, max_reject_fraction=0.5))
    assert [r["thread_id"] for r in read_rows(out)] == [json.loads(x)["id"] for x in lines[:3] + lines[20:]]
    line_rejects = [r for r in read_rejects(out) if r.get("level") != "comment"]
    assert [(r["reason"], r["file"], r["line"]) for r in line_rejects] == [("unreadable_stream", str(first), 4)]
    assert "Input/output error" in line_rejects[0]["detail"]
    assert stats["files"] == [{"uri": str(first), "lines": 3}, {"uri": str(second), "lines": 10}]


def test_clean_line_is_pure_and_reports_malformed_fields():
    ok = clean_line(
        b'{"id": "a", "author": "op", "comments": [{"id": "c", "parent_id": "t3_a", '
        b'"author": "x", "body": "hi", "created_utc": 1.0}]}\n'
    )
    assert ok.kind == "thread" and json.loads(ok.row)["comments"][0]["body"] == "hi"
    assert ok.counts["comments_kept"] == 1 and ok.counts["threads_written"] == 1
    odd = clean_line(
        b'{"id": "a", "author": "op", "comments": [{"id": "c", "parent_id": "t3_a", '
        b'"author": 5, "body": "!delta", "created_utc": 1.0}, {"id": "d", "parent_id": "t1_c", '
        b'"author": 7, "body": "\\u2206", "created_utc": 2.0}]}'
    )
    assert (odd.kind, odd.reason) == ("reject", "malformed_thread") and "int" in odd.detail
    assert clean_line(b"  \n").kind == "blank"


def test_s3_output(s3_bucket, sample_dump, tmp_path):
    run_clean([sample_dump], str(tmp_path / "local"), CleanConfig())
    run_clean([sample_dump], f"{s3_bucket}/run/clean", CleanConfig())
    assert storage.list_files(f"{s3_bucket}/run/clean") == [
        "_SUCCESS",
        "conversations.jsonl.gz",
        "rejects.jsonl.gz",
        "stats.json",
    ]
    assert storage.read_bytes(f"{s3_bucket}/run/clean/conversations.jsonl.gz") == gzip.decompress(
        (tmp_path / "local" / "conversations.jsonl.gz").read_bytes()
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_zst_dump_is_decompressed_not_read_by_byte_range(tmp_path, sample_dump, workers, monkeypatch):
    """A Cornell dump compressed as .zst streams through the decompressor (never the plain-file
    byte-range path) and gives the plain dump's conversations, rejects and stats counts."""
    import zstandard

    monkeypatch.setattr(storage, "RAW_CHUNK_BYTES", 8192)  # many batches for the workers
    monkeypatch.setattr("cmv_core.storage.digests.RAW_CHUNK_BYTES", 8192)
    data = Path(sample_dump).read_bytes()
    packed = tmp_path / "dump.jsonlist.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(data))
    assert not storage.plain_local(str(packed)) and storage.plain_local(sample_dump)
    plain_stats = run_clean([sample_dump], str(tmp_path / "plain"), CleanConfig(workers=workers))
    zst_stats = run_clean([str(packed)], str(tmp_path / "zst"), CleanConfig(workers=workers))
    assert read_rows(tmp_path / "zst") == read_rows(tmp_path / "plain")
    assert zst_stats["lines"] == plain_stats["lines"] and zst_stats["deltas"] == plain_stats["deltas"]
