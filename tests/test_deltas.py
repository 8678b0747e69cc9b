"""Every delta rule and every placeholder/deletion case of docs/DATA.md, with the exact ids found.

Threads are built as raw dump objects (the format of cmv_20161111.jsonlist) and go
through threads.build_thread, so tree rebuilding and the delta rules are tested together.
"""

from __future__ import annotations

import itertools

import pytest

from cmv_core.cmv import deltas as D
from cmv_core.cmv.threads import build_thread

TID = "5abcde"
OLD = "Confirmed: 1 delta awarded to /u/{}. ^[[History](/r/changemyview/wiki/user/{})]"
DB3 = (
    "Confirmed: 1 delta awarded to /u/{} ([1\u2206](/r/changemyview/wiki/user/{})).\n\n"
    "^[Delta System Explained](https://www.reddit.com/r/changemyview/wiki/deltasystem)\n\n"
    '[](HTTP://DB3PARAMSSTART\n{{"comment": "x", "issues": {{}}, "parentUserName": "{}"}}\nDB3PARAMSEND)'
)


def old(name: str) -> str:
    return OLD.format(name, name)


def db3(name: str) -> str:
    return DB3.format(name, name, name)


_clock = itertools.count(1000)


def rc(cid: str, parent: str | None, author: str, body: str, t: float | None = None) -> dict:
    """A raw real comment; parent None means a top-level reply to the submission."""
    return {
        "id": cid,
        "name": "t1_" + cid,
        "link_id": "t3_" + TID,
        "subreddit_id": "t5_2w2s8",
        "parent_id": "t3_" + TID if parent is None else "t1_" + parent,
        "author": author,
        "body": body,
        "created_utc": float(next(_clock) if t is None else t),
        "replies": "",
        "score": 1,
        "ups": 1,
        "edited": False,
        "distinguished": None,
        "author_flair_text": "3\u2206",
    }


def more(parent: str, children: list[str], count: int = 2) -> dict:
    return {
        "count": count,
        "parent_id": "t1_" + parent,
        "children": children,
        "name": "t1_" + children[0],
        "id": children[0],
    }


STUB = {"count": 0, "parent_id": "t1_c1", "children": [], "name": "t1__", "id": "_"}


def analyse(comments: list, op: str = "op"):
    sub = {
        "id": TID,
        "name": "t3_" + TID,
        "author": op,
        "title": "CMV: t",
        "selftext": "view",
        "created_utc": 1.0,
        "comments": comments,
    }
    thread = build_thread(sub)
    found = D.find_deltas(thread.comments, thread.op_author)
    # build_thread's pre-filtered candidates must give exactly the same deltas
    assert D.find_deltas(thread.comments, thread.op_author, thread.delta_candidates) == found
    return thread, found, D.winning_branches(found, thread.comments)


def branch_ids(branches) -> list[list[str]]:
    return [b["comment_ids"] for b in branches]


def summary(found) -> list[tuple]:
    return [
        (d.awarding_comment_id, d.rewarded_comment_id, d.recipient, d.from_op, d.confirmed, d.rejected_by_deltabot)
        for d in found
    ]


# --- tokens -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "\u2206",
        "thanks \u0394 for that",
        "&#8710;",
        "&amp;#8710;",
        "!delta",
        "!DELTA",
        "you win !Delta.",
        "> quoted\nmy own \u2206",
        "`code` and then \u2206",
        "  \u2206 indented less than four",
    ],
)
def test_token_counts(text):
    assert D.has_delta_token(text)


@pytest.mark.parametrize(
    "text",
    [
        "delta",
        "no token here",
        "> \u2206",
        "   > !delta",
        "&gt; \u2206 quoted while still escaped",
        "    !delta",
        "\t\u2206",
        "type `!delta` to award",
        "``\u2206``",
        "> a\n>\n> \u2206\n\nnothing of mine",
    ],
)
def test_token_ignored(text):
    assert not D.has_delta_token(text)


# --- DeltaBot ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,name",
    [
        (old("Bob_1"), "Bob_1"),
        (db3("bob-2"), "bob-2"),
        ("Confirmed: 1 delta awarded to u/carol.", "carol"),
        ("Confirmed: 1 delta awarded to /u/deep\\_thinker\\_42 ([1\u2206](/r/cmv)).", "deep_thinker_42"),
        ("This delta has been rejected. You have already awarded /u/bob a delta for this comment.", None),
        (
            "This delta has been rejected. The length of your comment suggests that you haven't properly "
            "explained how /u/bob changed your view (comment rule 4).",
            None,
        ),
        ("You cannot award OP a delta as they are the one whose view is being challenged.", None),
        ("Confirmed: 1 delta awarded to Alice.", "Alice"),  # no /u/ at all
        ("Confirmed: 1 delta awarded to /U/Alice.", "Alice"),
        # rejections and removals that still name someone after "delta awarded to"
        ("The delta awarded to /u/bob has been removed.", None),
        ("This delta has been rejected: the delta awarded to /u/bob earlier on this comment stands.", None),
        # the hidden DB3PARAMS block is ignored, whatever it holds
        (
            'Confirmed: 1 delta awarded to /u/bob.\n\n[](HTTP://DB3PARAMSSTART\n{"issues": {"rejected": 0}}\n'
            "DB3PARAMSEND)",
            "bob",
        ),
        (
            'This delta has been rejected.\n\n[](HTTP://DB3PARAMSSTART\n{"note": "delta awarded to bob"}\n'
            "DB3PARAMSEND)",
            None,
        ),
    ],
)
def test_confirmed_recipient(text, name):
    assert D.confirmed_recipient(text) == name


# --- OP deltas and confirmation ------------------------------------------------------------------------


def test_confirmed_op_delta_old_format():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "argument"),
            rc("o1", "c1", "op", "good point \u2206"),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, True, False)]
    assert branches == [{"recipient": "alice", "comment_ids": ["c1"]}]
    assert found[0].to_record() == {
        "awarding_comment_id": "o1",
        "awarder": "op",
        "rewarded_comment_id": "c1",
        "recipient": "alice",
        "from_op": True,
        "confirmed": True,
    }


def test_confirmed_op_delta_db3_format_case_insensitive_name():
    _, found, branches = analyse(
        [
            rc("c1", None, "Alice_B", "argument"),
            rc("o1", "c1", "op", "!delta, you changed my view"),
            rc("b1", "o1", "DeltaBot", db3("alice_b")),
        ]
    )
    assert summary(found) == [("o1", "c1", "Alice_B", True, True, False)]
    assert branch_ids(branches) == [["c1"]]


# Each token as the dump spells it (bodies are HTML-escaped: a typed `&#8710;` is `&amp;#8710;`).
@pytest.mark.parametrize(
    "raw_body",
    [
        "\u2206",
        "\u0394 thanks",
        "&#8710;",
        "&amp;#8710;",
        "&amp;amp;#8710;",
        "!delta",
        "!DELTA",
        "ok !Delta",
        "&gt; your point\n\nThat changed my mind \u2206",
    ],
)
def test_every_token_spelling_wins_the_branch(raw_body):
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "argument"),
            rc("o1", "c1", "op", raw_body),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, True, False)]
    assert branch_ids(branches) == [["c1"]]


# Quoted lines as the dump spells them (`&gt;`, once or twice escaped), code lines and code spans.
@pytest.mark.parametrize(
    "raw_body",
    [
        "&gt; \u2206",
        "  &gt; !delta",
        "&gt;&gt; nested \u0394",
        "&amp;gt; &amp;#8710; still a quote",
        "&gt; give me a &amp;#8710;\n\nNo.",
        "    !delta",
        "\t\u2206",
        "use `!delta` to award",
        "``&#8710;``",
    ],
)
def test_token_only_in_quote_or_code_wins_nothing_even_when_deltabot_confirms(raw_body):
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "argument"),
            rc("o1", "c1", "op", raw_body),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ]
    )
    assert found == [] and branches == []


@pytest.mark.parametrize("name", ["/u/alice", "u/alice", "alice", "/u/ALICE", "/U/Alice"])
def test_confirmation_names_the_recipient_in_any_form(name):
    _, found, branches = analyse(
        [
            rc("c1", None, "Alice", "argument"),
            rc("o1", "c1", "op", "\u2206"),
            rc("b1", "o1", "DeltaBot", f"Confirmed: 1 delta awarded to {name}. ^[[History](/r/changemyview/wiki)]"),
        ]
    )
    assert summary(found) == [("o1", "c1", "Alice", True, True, False)]
    assert branch_ids(branches) == [["c1"]]


def test_confirmation_text_by_someone_other_than_deltabot_does_not_count():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "op", "\u2206"),
            rc("f1", "o1", "DeltaBot_fan", old("alice")),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, False, False)]
    assert branches == []


def test_unconfirmed_without_deltabot_reply():
    _, found, branches = analyse([rc("c1", None, "alice", "x"), rc("o1", "c1", "op", "\u2206")])
    assert summary(found) == [("o1", "c1", "alice", True, False, False)]
    assert branches == []


@pytest.mark.parametrize(
    "bot_text",
    [
        "This delta has been rejected. The length of your comment suggests that you haven't properly explained "
        "how /u/alice changed your view (comment rule 4).",
        "This delta has been rejected. You have already awarded /u/alice a delta for this comment.",
        old("mallory"),  # confirms somebody else
        "The delta awarded to /u/alice has been removed.",  # taken back: names alice, confirms nothing
    ],
)
def test_deltabot_rejection_is_not_confirmation(bot_text):
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "op", "\u2206"),
            rc("b1", "o1", "DeltaBot", bot_text),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, False, True)]
    assert branches == []


def test_confirmation_must_be_a_direct_reply_to_the_delta_comment():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "op", "\u2206"),
            rc("z1", "o1", "zed", "nice"),
            rc("b1", "z1", "DeltaBot", old("alice")),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, False, False)]
    assert branches == []


def test_rejected_then_confirmed_gives_one_branch():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "op", "\u2206"),
            rc("b1", "o1", "DeltaBot", "This delta has been rejected. The length of your comment suggests ..."),
            rc("o2", "c1", "op", "\u2206 because the point about X changed my view"),
            rc("b2", "o2", "DeltaBot", db3("alice")),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, False, True), ("o2", "c1", "alice", True, True, False)]
    assert branch_ids(branches) == [["c1"]]


def test_top_level_op_comment_with_token_is_not_a_delta():
    _, found, _ = analyse([rc("o1", None, "op", "\u2206 to everyone"), rc("b1", "o1", "DeltaBot", old("op"))])
    assert found == []


def test_op_replying_to_self_is_not_a_delta():
    _, found, _ = analyse([rc("o1", None, "op", "more context"), rc("o2", "o1", "op", "\u2206 for me")])
    assert found == []


def test_op_replying_to_deltabot_is_not_a_delta():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "op", "\u2206 thanks"),
            rc("b1", "o1", "DeltaBot", db3("alice") + " ^[75\u2206]"),
            rc("o2", "b1", "op", "good bot \u2206"),
        ]
    )
    assert summary(found) == [("o1", "c1", "alice", True, True, False)]
    assert branch_ids(branches) == [["c1"]]


def test_deltabot_is_never_an_awarder():
    _, found, _ = analyse([rc("c1", None, "alice", "x"), rc("b1", "c1", "DeltaBot", "This user has 5\u2206")])
    assert found == []


@pytest.mark.parametrize(
    "author,body",
    [
        ("[deleted]", "[deleted]"),
        ("alice", "[removed]"),
        ("[deleted]", "text"),
        ("alice", "[deleted]"),
        ("[removed]", "[removed]"),
        ("alice", " [removed]\n"),
    ],
)
def test_deleted_or_removed_comment_is_never_a_recipient(author, body):
    _, found, branches = analyse(
        [
            rc("c1", None, author, body),
            rc("o1", "c1", "op", "\u2206"),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ]
    )
    assert found == [] and branches == []


def test_deleted_awarder_is_never_counted():
    _, found, _ = analyse([rc("c1", None, "alice", "x"), rc("o1", "c1", "[deleted]", "\u2206")])
    assert found == []


def test_token_in_quote_or_code_is_not_a_delta():
    _, found, _ = analyse(
        [
            rc("c1", None, "alice", "give me a \u2206 if I convince you"),
            rc("o1", "c1", "op", "> give me a \u2206 if I convince you\n\nNot yet."),
            rc("o2", "c1", "op", "you type it like\n\n    !delta\n\nor `\u2206` right?"),
        ]
    )
    assert found == []


def test_unknown_op_makes_every_delta_non_op():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "x"),
            rc("o1", "c1", "maybe_op", "\u2206"),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ],
        op="[deleted]",
    )
    assert summary(found) == [("o1", "c1", "alice", False, True, False)]
    assert branches == []


# --- non-OP deltas -----------------------------------------------------------------------------------------


def test_non_op_delta_is_recorded_but_wins_no_branch():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "argument"),
            rc("n1", "c1", "bystander", "that convinced me too \u2206"),
            rc("b1", "n1", "DeltaBot", old("alice")),
        ]
    )
    assert summary(found) == [("n1", "c1", "alice", False, True, False)]
    assert branches == []


def test_non_op_awarding_the_op_is_rejected_by_deltabot():
    _, found, _ = analyse(
        [
            rc("o1", None, "op", "clarification"),
            rc("n1", "o1", "bystander", "!delta"),
            rc("b1", "n1", "DeltaBot", "This delta has been rejected. You cannot award OP a delta."),
        ]
    )
    assert summary(found) == [("n1", "o1", "op", False, False, True)]


# --- winning branches -------------------------------------------------------------------------------------


def test_deep_branch_includes_op_intermediate_replies():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "a"),
            rc("o1", "c1", "op", "b"),
            rc("c2", "o1", "alice", "c"),
            rc("o2", "c2", "op", "d"),
            rc("c3", "o2", "alice", "e"),
            rc("o3", "c3", "op", "\u2206 yes"),
            rc("b1", "o3", "DeltaBot", db3("alice")),
        ]
    )
    assert branches == [{"recipient": "alice", "comment_ids": ["c1", "o1", "c2", "o2", "c3"]}]


def test_several_branches_in_delta_order_and_a_prefix_branch():
    _, found, branches = analyse(
        [
            rc("c1", None, "alice", "a", t=10),
            rc("o1", "c1", "op", "\u2206 one", t=20),
            rc("b1", "o1", "DeltaBot", old("alice"), t=21),
            rc("k1", "o1", "carol", "joining alice's branch", t=30),
            rc("o2", "k1", "op", "\u2206 two", t=40),
            rc("b2", "o2", "DeltaBot", db3("carol"), t=41),
            rc("d1", None, "dave", "other", t=15),
            rc("o3", "d1", "op", "\u2206 three", t=50),
            rc("b3", "o3", "DeltaBot", old("dave"), t=51),
        ]
    )
    assert branch_ids(branches) == [["c1"], ["c1", "o1", "k1"], ["d1"]]
    assert [b["recipient"] for b in branches] == ["alice", "carol", "dave"]


def test_branch_through_deleted_comment():
    _, found, branches = analyse(
        [
            rc("x1", None, "[deleted]", "[deleted]"),
            rc("o1", "x1", "op", "reply"),
            rc("c1", "o1", "alice", "point"),
            rc("o2", "c1", "op", "\u2206"),
            rc("b1", "o2", "DeltaBot", old("alice")),
        ]
    )
    assert branch_ids(branches) == [["x1", "o1", "c1"]]


# --- placeholders, stubs, order, orphans ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_more_placeholder_never_shadows_the_real_comment(where):
    comments = [
        rc("c1", None, "alice", "a"),
        rc("c2", "c1", "bob", "the rewarded one"),
        rc("o1", "c2", "op", "\u2206"),
        rc("b1", "o1", "DeltaBot", old("bob")),
    ]
    placeholder = more("c1", ["c2", "c9"])
    comments = [placeholder, *comments] if where == "before" else [*comments, placeholder]
    thread, found, branches = analyse(comments)
    c2 = next(c for c in thread.comments if c["id"] == "c2")
    assert c2["author"] == "bob" and c2["body"] == "the rewarded one"
    assert thread.more_placeholders == 1
    assert [c["id"] for c in thread.comments] == ["c1", "c2", "o1", "b1"]
    assert branch_ids(branches) == [["c1", "c2"]]


def test_more_placeholder_alone_is_dropped_and_continue_stub_skipped():
    thread, found, branches = analyse([rc("c1", None, "alice", "a"), more("c1", ["c7", "c8"]), STUB])
    assert [c["id"] for c in thread.comments] == ["c1"]
    assert (thread.more_placeholders, thread.continue_stubs) == (1, 1)
    assert thread.skipped == []


def test_children_listed_before_parents_give_the_same_branch():
    ordered = [
        rc("c1", None, "alice", "a", t=1),
        rc("o1", "c1", "op", "b", t=2),
        rc("c2", "o1", "alice", "c", t=3),
        rc("o2", "c2", "op", "\u2206", t=4),
        rc("b1", "o2", "DeltaBot", old("alice"), t=5),
    ]
    thread, _, branches = analyse(list(reversed(ordered)))
    assert [c["id"] for c in thread.comments] == ["c1", "o1", "c2", "o2", "b1"]  # chronological
    assert branch_ids(branches) == [["c1", "o1", "c2"]]


def test_orphans_are_dropped_with_their_subtree_and_reasons():
    thread, found, branches = analyse(
        [
            rc("c1", None, "alice", "a"),
            {**rc("x1", None, "lost", "parent not in dump"), "parent_id": "t1_zz9"},
            rc("x2", "x1", "bob", "reply to the orphan"),
            rc("x3", "x2", "op", "\u2206 inside an orphaned subtree"),
            {**rc("y1", None, "other", "other thread"), "parent_id": "t3_otherthread"},
        ]
    )
    assert [c["id"] for c in thread.comments] == ["c1"]
    assert sorted((s.comment_id, s.reason) for s in thread.skipped) == [
        ("x1", "parent_missing"),
        ("x2", "ancestor_missing"),
        ("x3", "ancestor_missing"),
        ("y1", "parent_missing"),
    ]
    assert found == [] and branches == []


def test_deleted_comment_keeps_its_children_in_the_tree():
    thread, _, _ = analyse([rc("x1", None, "[deleted]", "[deleted]"), rc("c1", "x1", "alice", "still here")])
    assert [(c["id"], c["parent_id"]) for c in thread.comments] == [("x1", "t3_" + TID), ("c1", "t1_x1")]


def test_duplicate_ids_keep_the_first_and_cycles_are_dropped():
    thread, _, _ = analyse(
        [
            rc("c1", None, "alice", "first"),
            rc("c1", None, "alice", "second copy"),
            {**rc("p1", None, "x", "a"), "parent_id": "t1_p2"},
            {**rc("p2", None, "y", "b"), "parent_id": "t1_p1"},
            {"id": None, "body": "no id"},
            "not an object",
        ]
    )
    assert [(c["id"], c["body"]) for c in thread.comments] == [("c1", "first")]
    assert sorted(s.reason for s in thread.skipped) == [
        "ancestor_missing",
        "comment_missing_id",
        "comment_not_an_object",
        "duplicate_comment",
        "parent_cycle",
    ]


def test_html_entities_are_unescaped_and_a_double_escaped_token_ends_as_the_character():
    thread, found, _ = analyse(
        [
            rc("c1", None, "alice", "x &lt; y &amp;&amp; y &gt; z"),
            rc("o1", "c1", "op", "thanks &amp;#8710;"),
            rc("b1", "o1", "DeltaBot", old("alice")),
        ]
    )
    assert thread.comments[0]["body"] == "x < y && y > z"
    assert thread.comments[1]["body"] == "thanks \u2206"  # `&amp;#8710;`: escaped twice, undone twice
    assert D.has_delta_token("thanks &#8710;")  # a once-unescaped spelling (older outputs) still counts
    assert summary(found) == [("o1", "c1", "alice", True, True, False)]


# --- losing-branch helpers ---------------------------------------------------------------------------------


def test_losing_branch_candidates():
    thread, found, _ = analyse(
        [
            rc("w1", None, "winner", "won", t=1),
            rc("o1", "w1", "op", "\u2206", t=2),
            rc("b1", "o1", "DeltaBot", old("winner"), t=3),
            rc("l1", None, "loser", "lost", t=4),
            rc("o2", "l1", "op", "no", t=5),
            rc("l2", "o2", "loser", "yes", t=6),
            rc("o3", "l2", "op", "still no", t=7),
            rc("z1", "o3", "zed", "third party", t=8),
            rc("q1", None, "quiet", "OP never replied", t=9),
            rc("m1", None, "mixed", "a", t=10),
            rc("o4", "m1", "op", "b", t=11),
            rc("m2", "o4", "mixed", "c", t=12),
            rc("o5", "m2", "op", "\u2206", t=13),
        ]
    )
    records = [d.to_record() for d in found]
    got = D.losing_branch_candidates(thread.comments, "op", records)
    # w1: won; m1's subtree holds an (unconfirmed) OP delta; q1: the OP never replied.
    assert got == [{"recipient": "loser", "comment_ids": ["l1", "o2", "l2"]}]


def test_jaccard():
    assert D.jaccard("the cat sat", "the cat ran") == pytest.approx(2 / 4)
    assert D.jaccard("", "") == 0.0
