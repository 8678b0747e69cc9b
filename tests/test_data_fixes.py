"""Data fixes behind a fair evaluation, on raw dump lines through clean (clean_line) and format
(build_example / build_pairs): deep winners, challengers' delta edits, double-escaped entities,
the 2013 DeltaBot wordings and Pushshift-style records; the exact branches are pinned."""

from __future__ import annotations

import json

import orjson
import pytest

from cmv_core.clean.rows import clean_line
from cmv_core.cmv import deltas
from cmv_core.cmv.text import unescape
from cmv_core.format.config import FormatConfig
from cmv_core.format.examples import build_example, build_pairs

TID = "1abcde"


def rc(cid, parent, author, body, t, pushshift=False):
    c = {
        "id": cid,
        "parent_id": "t3_" + TID if parent is None else "t1_" + parent,
        "author": author,
        "body": body,
        "link_id": "t3_" + TID,
        "score": 1,
    }
    if pushshift:  # Pushshift: no `replies`, no `name`, created_utc an int or a string of digits
        c["created_utc"] = str(t) if int(t) % 2 else int(t)
    else:
        c.update(name="t1_" + cid, replies="", created_utc=float(t))
    return c


def thread_line(pushshift=False) -> bytes:
    """op's view; alice wins a deep delta (depth 3, 2013 'point' wording, awarded with a
    double-escaped &amp;#8710;) and had edited her comment to thank for it; bob wins a depth-1
    delta ('Confirmed - 1 delta' wording) and edited too; carol is the matched loser (OP replied)."""
    p = pushshift
    comments = [
        rc("a1", None, "alice", "Consider the cost side of it.", 100, p),
        rc("o1", "a1", "op", "Costs are fine, I think.", 101, p),
        rc("a2", "o1", "alice", "Costs fall on the poor.\n\nEDIT: thanks for the &amp;#8710;!", 102, p),
        rc("o2", "a2", "op", "Good point, &amp;#8710; for that.", 103, p),
        rc("d1", "o2", "DeltaBot", "Confirmed - 1 point awarded to /u/alice", 104, p),
        rc("b1", None, "bob", "Look at history instead.\nThanks for the \u2206, by the way.", 105, p),
        rc("o3", "b1", "op", "!delta history convinced me", 106, p),
        rc("d2", "o3", "DeltaBot", "Confirmed - 1 delta awarded to /u/bob", 107, p),
        rc("c1", None, "carol", "Costs and history both matter for the poor.", 108, p),
        rc("o4", "c1", "op", "Not convinced.", 109, p),
    ]
    sub = {
        "id": TID,
        "author": "op",
        "title": "CMV: costs don&amp;#39;t matter",
        "selftext": "My view.",
        "created_utc": "1370000000" if p else 1370000000.0,
        "comments": comments,
    }
    if not p:
        sub["name"] = "t3_" + TID
    return orjson.dumps(sub)


@pytest.mark.parametrize("pushshift", [False, True], ids=["cornell", "pushshift"])
def test_deep_and_2013_deltas_pinned_and_no_delta_text_reaches_a_target(pushshift):
    res = clean_line(thread_line(pushshift))
    assert res.kind == "thread", res
    row = json.loads(res.row)
    assert row["created_utc"] == 1370000000.0 and row["title"] == "CMV: costs don't matter"
    assert [
        (d["awarding_comment_id"], d["rewarded_comment_id"], d["recipient"], d["from_op"], d["confirmed"])
        for d in row["deltas"]
    ] == [
        ("a2", "o1", "op", False, False),  # alice's "thanks for the ∆" edit reads as her award to op (not OP's)
        ("o2", "a2", "alice", True, True),
        ("o3", "b1", "bob", True, True),
    ]
    assert row["winning_branches"] == [
        {"recipient": "alice", "comment_ids": ["a1", "o1", "a2"]},
        {"recipient": "bob", "comment_ids": ["b1"]},
    ]
    by_id = {c["id"]: c for c in row["comments"]}
    # the double-escaped entity ends as the character, not as "&#8710;"
    assert "\u2206" in by_id["o2"]["body"] and "&#8710;" not in by_id["o2"]["body"]

    cfg = FormatConfig(view="multi")
    texts = []
    for branch in row["winning_branches"]:
        example, reason = build_example(row, branch, by_id, cfg)
        assert reason is None
        texts += [m["content"] for m in example["messages"]]
    single = FormatConfig(single_target="branch")
    for branch in row["winning_branches"]:
        example, _ = build_example(row, branch, by_id, single)
        texts.append(example["messages"][-1]["content"])
    assert texts[-2] == "Consider the cost side of it.\n\nCosts fall on the poor."
    assert texts[-1] == "Look at history instead."
    pairs = build_pairs(row, row["winning_branches"], by_id, FormatConfig())
    assert [(p["winner_comment_ids"], p["loser_comment_ids"]) for p in pairs] == [
        (["a1", "o1", "a2"], ["c1"]),
        (["b1"], ["c1"]),
    ]
    texts += [p["winner"] for p in pairs] + [p["loser"] for p in pairs]
    for text in texts:
        assert not deltas.might_contain_delta(text), text
        assert "EDIT" not in text and "DeltaBot" not in text and "awarded" not in text


def test_the_leak_strip_is_an_option():
    line = clean_line(thread_line())
    row = json.loads(line.row)
    by_id = {c["id"]: c for c in row["comments"]}
    keep = FormatConfig(strip_comment_delta_edits=False)
    example, _ = build_example(row, row["winning_branches"][0], by_id, keep)
    assert "EDIT: thanks for the \u2206!" in example["messages"][-1]["content"]


def test_deltabot_2013_wordings_confirm_and_rejections_do_not():
    assert deltas.confirmed_recipient("Confirmed - 1 delta awarded to /u/Some_one") == "Some_one"
    assert deltas.confirmed_recipient("Confirmed - 1 point awarded to /u/bob.") == "bob"
    assert deltas.confirmed_recipient("This delta has been rejected. You cannot award OP a delta.") is None


def test_unescape_double_escaped_entities():
    assert unescape("&amp;#8710;") == "\u2206"
    assert unescape("a &amp;gt; b &amp;amp; c") == "a > b & c"
    assert unescape("&gt; quoted &amp; fine") == "> quoted & fine"
    assert unescape("AT&T; no entity") == "AT&T; no entity"
