"""Reading the dump: inputs, streaming, parsing, text cleaning."""

from __future__ import annotations

import bz2
import gzip
import json
import re

import pytest

from cmv_core.cmv import text as text_mod
from cmv_core.cmv import threads
from cmv_core.cmv.dump import expand_inputs, iter_lines
from cmv_core.cmv.text import clean_op_text, remove_delta_edits, remove_footnote, unescape
from cmv_core.cmv.threads import LineRejected, build_thread, parse_line, thread_id_of

try:  # the parser of re's own patterns (Python 3.11+), to count ambiguities in a pattern
    from re import _constants as C
    from re import _parser as re_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C
    import sre_parse as re_parser

REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT) + ((C.POSSESSIVE_REPEAT,) if hasattr(C, "POSSESSIVE_REPEAT") else ())

FOOTNOTE = (
    "\n\n_____\n\n&gt; *Hello, users of CMV! This is a footnote from your moderators. We'd just like to remind "
    "you of a couple of things.* *Happy CMVing!*"
)


# --- inputs and streaming ----------------------------------------------------------------------------


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(json.dumps({"id": f"t{i}", "comments": []}).encode() + b"\n" for i in range(start, start + n))


def test_plain_gz_bz2_and_directories(tmp_path):
    d = tmp_path / "cmv"
    (d / "all").mkdir(parents=True)
    (d / "pair_task").mkdir()
    (d / "all" / "train_period_data.jsonlist.bz2").write_bytes(bz2.compress(_lines(2, 0)))
    (d / "all" / "heldout_period_data.jsonlist.gz").write_bytes(gzip.compress(_lines(3, 10)))
    (d / "pair_task" / "train_pair_data.jsonlist.bz2").write_bytes(bz2.compress(b'{"op_text": "x"}\n'))
    (d / "README.txt").write_text("not a dump")
    plain = tmp_path / "cmv_20161111.jsonlist"
    plain.write_bytes(_lines(1, 20))

    files = expand_inputs([str(d), str(plain)])
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        "heldout_period_data.jsonlist.gz",
        "train_period_data.jsonlist.bz2",
        "cmv_20161111.jsonlist",
    ]
    got = [(ln.file.rsplit("/", 1)[-1], ln.number, json.loads(ln.raw)["id"]) for ln in iter_lines(files)]
    assert got == [
        ("heldout_period_data.jsonlist.gz", 1, "t10"),
        ("heldout_period_data.jsonlist.gz", 2, "t11"),
        ("heldout_period_data.jsonlist.gz", 3, "t12"),
        ("train_period_data.jsonlist.bz2", 1, "t0"),
        ("train_period_data.jsonlist.bz2", 2, "t1"),
        ("cmv_20161111.jsonlist", 1, "t20"),
    ]


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no thread files"):
        expand_inputs([str(tmp_path)])


def test_truncated_gzip_yields_lines_then_one_error(tmp_path):
    data = gzip.compress(_lines(200))
    path = tmp_path / "cut.jsonlist.gz"
    path.write_bytes(data[: len(data) // 2])
    lines = list(iter_lines([str(path)]))
    assert lines[-1].error is not None and lines[-1].raw == b""
    good = [ln for ln in lines if ln.error is None]
    assert all(json.loads(ln.raw)["id"] == f"t{i}" for i, ln in enumerate(good[:-1]))
    assert lines[-1].number == len(good) + 1


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b'{"id": "abc", "comments": [', "invalid_json"),
        (b"\xff\xfe not utf8", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
    ],
)
def test_parse_line_rejects(raw, reason):
    with pytest.raises(LineRejected) as exc:
        parse_line(raw)
    assert exc.value.reason == reason


def test_thread_id_from_id_or_name():
    assert thread_id_of({"id": "5c8xdc"}) == "5c8xdc"
    assert thread_id_of({"name": "t3_5c8xdc"}) == "5c8xdc"
    with pytest.raises(LineRejected) as exc:
        thread_id_of({"title": "no id"})
    assert exc.value.reason == "missing_id"


def test_comments_must_be_a_list():
    with pytest.raises(LineRejected) as exc:
        build_thread({"id": "a", "comments": {"x": 1}})
    assert exc.value.reason == "bad_comments"


def test_build_thread_fields():
    t = build_thread(
        {
            "id": "a1",
            "author": "op",
            "title": "CMV: A &amp; B",
            "selftext": "Body &lt;3" + FOOTNOTE,
            "created_utc": "1478900000.0",
            "created": 1,
            "comments": [
                {"id": "c1", "parent_id": "t3_a1", "author": None, "body": 5, "created_utc": 3},
            ],
        }
    )
    assert (t.thread_id, t.title, t.op_author, t.op_text, t.created_utc) == (
        "a1",
        "CMV: A & B",
        "op",
        "Body <3",
        1478900000.0,
    )
    assert t.comments == [{"id": "c1", "parent_id": "t3_a1", "author": "[deleted]", "body": "", "created_utc": 3.0}]


# --- text -------------------------------------------------------------------------------------------------------


def test_footnote_removed_with_its_rule_and_quote():
    text = unescape("My view.\n\nSecond paragraph." + FOOTNOTE)
    assert remove_footnote(text) == "My view.\n\nSecond paragraph."
    assert remove_footnote("no footnote > here") == "no footnote > here"


@pytest.mark.parametrize("lead", ["\n\n", "\n\n&gt; ", "\n\n---\n\n&gt;", "\n_____\n&gt; ", "\n\n*****\n\n"])
def test_footnote_removed_whatever_leads_into_it(lead):
    text = "My view.\n\n&gt; a quote I keep" + lead + FOOTNOTE.split("&gt; ", 1)[1] + "\n\nmore footnote"
    assert clean_op_text(text, strip_delta_edits=False) == "My view.\n\n> a quote I keep"


def test_delta_edit_markers_and_a_long_run_of_spaces():
    spaces = "Edit" + " " * 400 + "and then my view changed\n\nEnd."  # no ":" or "-": not an edit marker
    text = "View.\n\nEdit #2 - delta to bob\n\n__Update__: \u2206 given\n\nEDIT 3 **:** cmv'd\n\n" + spaces
    assert remove_delta_edits(text) == "View.\n\n" + spaces
    # The marker patterns must not backtrack over a run of spaces: counted in the pattern, not timed.
    for pattern in (text_mod._EDIT_START, text_mod._ANNOUNCES):
        assert space_ambiguities(pattern) == [], pattern.pattern


def test_the_space_ambiguity_check_finds_a_backtracking_pattern():
    planted = re.compile(r"^[\s*_#~]*(?:edit|update)[\s#\d]*\s*(?:[*_]+\s*)?[:\-]", re.I)
    assert len(space_ambiguities(planted)) == 1
    assert len(space_ambiguities(re.compile(r"(?:\s+)*x"))) == 1
    assert space_ambiguities(re.compile(r"[\s#\d]*(?:[*_]+\s*)?:")) == []


def _matches_space(op, av) -> bool:
    """Whether one single-character item of a parsed pattern matches a space."""
    if op is C.LITERAL:
        return av == 32
    if op is C.NOT_LITERAL:
        return av != 32
    if op is C.ANY:
        return True
    if op is C.IN:
        hit, negate = False, False
        for op2, av2 in av:
            if op2 is C.NEGATE:
                negate = True
            elif op2 is C.LITERAL:
                hit |= av2 == 32
            elif op2 is C.RANGE:
                hit |= av2[0] <= 32 <= av2[1]
            elif op2 is C.CATEGORY:
                hit |= av2 in (C.CATEGORY_SPACE, C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_WORD)
        return hit != negate
    return False


def _starts_with_space(items) -> bool:
    """Whether the parsed sequence can match a text that starts with a space."""
    for op, av in items:
        if op in REPEATS:
            if _starts_with_space(av[2]):
                return True
            if av[0] > 0:
                return False
        elif op is C.SUBPATTERN:
            if _starts_with_space(av[-1]):
                return True
            if av[-1].getwidth()[0] > 0:
                return False
        elif op is C.BRANCH:
            if any(_starts_with_space(b) for b in av[1]):
                return True
            if min(b.getwidth()[0] for b in av[1]) > 0:
                return False
        elif op is not C.AT:
            return _matches_space(op, av)
    return False


def space_ambiguities(pattern: re.Pattern) -> list[str]:
    """The places where a run of spaces can be split between two repeats (a repeat of spaces followed
    by something that can start with a space, or a repeat nested in a repeat of spaces): each makes
    the engine try every split of the run on a failed match."""
    found = []

    def walk(items, in_repeat: bool):
        items = list(items)
        for i, (op, av) in enumerate(items):
            if op in REPEATS:
                spaces = av[1] > 1 and _starts_with_space(av[2])
                if spaces and (_starts_with_space(items[i + 1 :]) or in_repeat):
                    found.append(f"item {i}: {op} {av[:2]}")
                walk(av[2], in_repeat or spaces)
            elif op is C.SUBPATTERN:
                walk(av[-1], in_repeat)
            elif op is C.BRANCH:
                for b in av[1]:
                    walk(b, in_repeat)

    walk(re_parser.parse(pattern.pattern, pattern.flags), False)
    return found


def test_delta_edits_removed_other_edits_kept():
    text = (
        "My view is X.\n\nEdit: formatting.\n\n**EDIT 2:** My view has been changed by /u/bob, thanks!\n"
        "More of the same edit.\n\nUPDATE - \u2206 awarded to alice\n\nClosing line."
    )
    assert remove_delta_edits(text) == "My view is X.\n\nEdit: formatting.\n\nClosing line."
    assert clean_op_text(text, strip_delta_edits=False) == text


def test_op_text_keeps_markdown_structure():
    text = "Points:\n\n* one\n* two\n\n> a quote I agree with\n\n1. numbered"
    assert clean_op_text(text, strip_delta_edits=True) == text


# --- the bundled sample -------------------------------------------------------------------------------------


def test_bundled_sample_is_in_the_raw_format(sample_dump):
    subs = [parse_line(ln.raw) for ln in iter_lines([sample_dump])]
    assert len(subs) >= 24
    kinds = {"more": 0, "stub": 0, "real": 0}
    for s in subs:
        assert s["name"] == "t3_" + s["id"] and isinstance(s["created_utc"], float)
        for c in s["comments"]:
            if c["id"] == "_":
                kinds["stub"] += 1
            elif "body" not in c:
                assert set(c) == {"count", "parent_id", "children", "name", "id"} and c["id"] == c["children"][0]
                kinds["more"] += 1
            else:
                assert c["name"] == "t1_" + c["id"] and c["link_id"] == s["name"]
                assert c["replies"] == "" or all(isinstance(x, str) for x in c["replies"]["data"]["children"])
                kinds["real"] += 1
    assert kinds["more"] >= 2 and kinds["stub"] >= 1 and kinds["real"] > 200


def test_bundled_sample_is_reproducible(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(threads.__file__).parents[1] / "data" / "make_sample.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_input_is_an_error_not_a_reject(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_lines([str(tmp_path / "nope.jsonlist")]))


def test_not_really_gzip_is_an_unreadable_stream(tmp_path):
    fake = tmp_path / "fake.jsonlist.gz"
    fake.write_bytes(b'{"id": "a"}\n')
    lines = list(iter_lines([str(fake)]))
    assert len(lines) == 1 and "BadGzipFile" in lines[0].error
