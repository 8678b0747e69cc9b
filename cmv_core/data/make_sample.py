"""Write cmv_core/data/sample_cmv.jsonlist: a small CMV dump in the real raw format.

    python cmv_core/data/make_sample.py            # rewrites the bundled sample
    python cmv_core/data/make_sample.py --check    # exits 1 if the file is stale

The threads were written for this project (no Reddit content); their text and shape are in
sample_threads.yaml, next to this script (its header describes the format). Each line is a
submission with a flat `comments` list exactly as in the Cornell dump: real
comments with `parent_id`, `replies` listings of bare ids, HTML-escaped bodies,
"more" placeholders (some colliding with real ids), "_" stubs, deleted and
removed comments, DeltaBot replies in the old and the DB3 format (with
DB3PARAMS blocks), rejections, non-OP deltas, tokens inside quotes and code,
and the moderators' footnote. Output is deterministic (seeded), so the file
only changes when this script or the threads file does. The tests pin the ids they check.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import yaml

OUT = Path(__file__).with_name("sample_cmv.jsonlist")
THREADS_FILE = Path(__file__).with_name("sample_threads.yaml")
SUBREDDIT_ID = "t5_2w2s8"
RAW_ENTITY = "{{RAW_DELTA_ENTITY}}"  # becomes a literal `&#8710;` in the dump (not `&amp;#8710;`)

FOOTNOTE = (
    "\n\n_____\n\n> *Hello, users of CMV! This is a footnote from your moderators. We'd just like to "
    "remind you of a couple of things. Firstly, please remember to* ***[read through our rules]"
    "(http://www.reddit.com/r/changemyview/wiki/rules)***. *If you see a comment that has broken one, it "
    "is more effective to report it than downvote it. Speaking of which,* ***[downvotes don't change views]"
    "(http://www.reddit.com/r/changemyview/wiki/guidelines#wiki_upvoting.2Fdownvoting)****! If you are "
    "thinking about submitting a CMV yourself, please have a look through our* ***[popular topics wiki]"
    "(http://www.reddit.com/r/changemyview/wiki/populartopics)*** *first. Any questions or concerns? Feel "
    "free to* ***[message us](http://www.reddit.com/message/compose?to=/r/changemyview)***. *Happy CMVing!*"
)


# --- the comment trees ---------------------------------------------------------------------------


def c(author: str, body: str, *kids: dict, key: str | None = None, parent: str | None = None) -> dict:
    """A comment node; `parent` overrides the parent_id (for orphans)."""
    return {"author": author, "body": body, "kids": list(kids), "key": key, "parent": parent}


def bot_old(name: str) -> dict:
    return c(
        "DeltaBot",
        f"Confirmed: 1 delta awarded to /u/{name}. ^[[History](/r/changemyview/wiki/user/{name})]\n\n"
        "^[[Wiki](http://www.reddit.com/r/changemyview/wiki/index)][[Code](https://github.com/alexames/DeltaBot)]"
        "[[Subreddit](http://www.reddit.com/r/DeltaBot)]",
    )


def bot_db3(name: str, count: int = 1, escape_name: bool = False) -> dict:
    shown = name.replace("_", "\\_") if escape_name else name
    params = json.dumps(
        {"comment": "https://www.reddit.com/r/changemyview/comments/", "issues": {}, "parentUserName": name}
    )
    return c(
        "DeltaBot",
        f"Confirmed: 1 delta awarded to /u/{shown} ([{count}\u2206](/r/changemyview/wiki/user/{name})).\n\n"
        "^[Delta System Explained](https://www.reddit.com/r/changemyview/wiki/deltasystem) ^| "
        "^[Deltaboards](https://www.reddit.com/r/changemyview/wiki/deltaboards)\n\n"
        f"[](HTTP://DB3PARAMSSTART\n{params}\nDB3PARAMSEND)",
    )


def bot_reject(text: str, name: str = "") -> dict:
    params = json.dumps(
        {
            "comment": "https://www.reddit.com/r/changemyview/comments/",
            "issues": {"rejected": 1},
            "parentUserName": name,
        }
    )
    return c("DeltaBot", f"{text}\n\n[](HTTP://DB3PARAMSSTART\n{params}\nDB3PARAMSEND)")


REJECT_SHORT = (
    "This delta has been rejected. The length of your comment suggests that you haven't properly "
    "explained how /u/{name} changed your view (comment rule 4).\n\nDeltaBot is able to rescan edited "
    "comments. Please edit your comment with the required explanation."
)
REJECT_OP = (
    "This delta has been rejected. You cannot award OP a delta as they are the one whose view is being "
    "challenged. To learn more about how deltas work, see the "
    "[delta system explained](https://www.reddit.com/r/changemyview/wiki/deltasystem)."
)
REJECT_AGAIN = "This delta has been rejected. You have already awarded /u/{name} a delta for this comment."
REJECTIONS = {"short": REJECT_SHORT, "op": REJECT_OP, "again": REJECT_AGAIN}


def deltabot(spec: dict) -> dict:
    """A DeltaBot reply of the threads file: `{deltabot: confirmed | confirmed_db3 | rejected, ...}`."""
    kind, name = spec["deltabot"], spec.get("to", "")
    if kind == "confirmed":
        return bot_old(name)
    if kind == "confirmed_db3":
        return bot_db3(name, spec.get("count", 1), spec.get("escaped", False))
    if kind == "rejected":
        return bot_reject(REJECTIONS[spec["reason"]].format(name=name), name)
    raise ValueError(f"{THREADS_FILE.name}: unknown DeltaBot reply {kind!r}")


def comment(spec: dict) -> dict:
    """A comment of the threads file, with its replies, as a tree node."""
    if "deltabot" in spec:
        return deltabot(spec)
    replies = [comment(r) for r in spec.get("replies") or ()]
    return c(spec["author"], spec["body"], *replies, key=spec.get("key"), parent=spec.get("parent"))


def thread(
    author: str,
    title: str,
    selftext: str,
    comments: list[dict],
    *,
    extras: tuple = (),
    shuffle: bool = False,
    footnote: bool = True,
) -> dict:
    return {
        "author": author,
        "title": title,
        "selftext": selftext + (FOOTNOTE if footnote else ""),
        "comments": comments,
        "extras": extras,
        "shuffle": shuffle,
    }


def load_threads(path: Path = THREADS_FILE) -> list[dict]:
    """The threads of the threads file, in its order, as emit() reads them."""
    with open(path, encoding="utf-8") as f:
        specs = yaml.safe_load(f)
    threads = []
    for spec in specs:
        extras = tuple(
            ("more", list(x["more"]), x["where"], x["count"]) if "more" in x else ("stub", x["stub"])
            for x in spec.get("extras") or ()
        )
        threads.append(
            thread(
                spec["author"],
                spec["title"],
                spec["selftext"],
                [comment(x) for x in spec["comments"]],
                extras=extras,
                shuffle=spec.get("shuffle", False),
                footnote=spec.get("footnote", True),
            )
        )
    return threads


# --- emitting the raw format ---------------------------------------------------------------------


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def escape(text: str) -> str:
    """The dump's escaping: markdown with & < > as HTML entities."""
    out = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return out.replace(RAW_ENTITY, "&#8710;")


def _flair(rng: random.Random, author: str) -> str | None:
    if author in ("[deleted]", "DeltaBot") or rng.random() < 0.6:
        return None
    return f"{rng.randint(1, 40)}\u2206"


def _comment_obj(
    rng: random.Random, cid: str, parent_id: str, link_id: str, node: dict, created: float, kid_ids: list[str]
) -> dict[str, Any]:
    score = rng.randint(-2, 60)
    author = node["author"]
    return {
        "subreddit_id": SUBREDDIT_ID,
        "banned_by": None,
        "removal_reason": None,
        "link_id": link_id,
        "likes": None,
        "replies": {"kind": "Listing", "data": {"children": kid_ids}} if kid_ids else "",
        "user_reports": [],
        "saved": False,
        "id": cid,
        "gilded": 0,
        "archived": True,
        "report_reasons": None,
        "author": author,
        "parent_id": parent_id,
        "score": score,
        "approved_by": None,
        "controversiality": 0,
        "body": escape(node["body"]),
        "edited": False,
        "author_flair_css_class": None,
        "downs": 0,
        "stickied": False,
        "subreddit": "changemyview",
        "score_hidden": False,
        "name": "t1_" + cid,
        "created": created + 28800.0,
        "author_flair_text": _flair(rng, author),
        "created_utc": created,
        "distinguished": "moderator" if author == "DeltaBot" else None,
        "mod_reports": [],
        "num_reports": None,
        "ups": score,
    }


def _add_placeholders(objs: list[dict], extras: list, keyed: dict[str, str], rng: random.Random) -> None:
    """The dump's "more" placeholders and "continue this thread" stubs, where the spec puts them."""
    for extra in extras:
        if extra[0] == "more":
            _, child_keys, where, count = extra
            parent_of_first = next(o["parent_id"] for o in objs if o["id"] == keyed[child_keys[0]])
            children = [keyed.get(k) or "d" + _b36(rng.randint(36**5, 36**6 - 1)) for k in child_keys]
            more = {
                "count": count,
                "parent_id": parent_of_first,
                "children": children,
                "name": "t1_" + children[0],
                "id": children[0],
            }
            objs.insert(0, more) if where == "before" else objs.append(more)
        elif extra[0] == "stub":
            objs.append({"count": 0, "parent_id": "t1_" + keyed[extra[1]], "children": [], "name": "t1__", "id": "_"})


def _submission_obj(spec: dict, thread_id: str, created: float, score: int, objs: list[dict]) -> dict[str, Any]:
    """One dump line: the submission's Reddit API fields and its flat comment list."""
    link_id = "t3_" + thread_id
    real = sum(1 for o in objs if "body" in o)
    return {
        "domain": "self.changemyview",
        "banned_by": None,
        "media_embed": {},
        "subreddit": "changemyview",
        "selftext_html": None,
        "selftext": escape(spec["selftext"]),
        "likes": None,
        "suggested_sort": None,
        "user_reports": [],
        "secure_media": None,
        "link_flair_text": None,
        "id": thread_id,
        "gilded": 0,
        "secure_media_embed": {},
        "clicked": False,
        "report_reasons": None,
        "author": spec["author"],
        "media": None,
        "score": score,
        "approved_by": None,
        "over_18": False,
        "hidden": False,
        "num_comments": real,
        "thumbnail": "self",
        "subreddit_id": SUBREDDIT_ID,
        "hide_score": False,
        "edited": False,
        "link_flair_css_class": None,
        "author_flair_css_class": None,
        "downs": 0,
        "saved": False,
        "removal_reason": None,
        "stickied": False,
        "is_self": True,
        "permalink": f"/r/changemyview/comments/{thread_id}/",
        "name": link_id,
        "created": created + 28800.0,
        "url": f"https://www.reddit.com/r/changemyview/comments/{thread_id}/",
        "author_flair_text": None,
        "quarantine": False,
        "title": escape(spec["title"]),
        "created_utc": created,
        "ups": score,
        "upvote_ratio": 0.87,
        "mod_reports": [],
        "visited": False,
        "num_reports": None,
        "distinguished": None,
        "comments": objs,
    }


def emit(index: int, spec: dict, rng: random.Random) -> dict[str, Any]:
    thread_id = _b36(rng.randint(36**5, 36**6 - 1))
    link_id = "t3_" + thread_id
    created = 1370000000.0 + index * 3_900_000.0 + rng.randint(0, 86_400)
    keyed: dict[str, str] = {}
    objs: list[dict] = []

    def walk(node: dict, parent_id: str, parent_time: float) -> None:
        cid = "d" + _b36(rng.randint(36**5, 36**6 - 1))
        if node["key"]:
            keyed[node["key"]] = cid
        t = parent_time + rng.randint(60, 5400)
        pos = len(objs)
        objs.append({})  # placeholder: parents before children in the listing
        kid_ids: list[str] = []
        for kid in node["kids"]:
            before = len(objs)
            walk(kid, "t1_" + cid, t)
            kid_ids.append(objs[before]["id"])
        objs[pos] = _comment_obj(rng, cid, node["parent"] or parent_id, link_id, node, float(t), kid_ids)

    for top in spec["comments"]:
        walk(top, link_id, created)

    _add_placeholders(objs, spec["extras"], keyed, rng)
    if spec["shuffle"]:
        rng.shuffle(objs)

    score = rng.randint(5, 900)
    return _submission_obj(spec, thread_id, created, score, objs)


def render(threads: list[dict]) -> str:
    """The sample's text: one thread a line, newest first as in cmv_20161111.jsonlist."""
    rng = random.Random(20161111)
    lines = []
    for i, spec in enumerate(threads):
        lines.append(json.dumps(emit(i, spec, rng), ensure_ascii=False))
    return "\n".join(reversed(lines)) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the bundled sample is not what this writes")
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args()
    threads = load_threads()
    text = render(threads)
    if args.check:
        same = Path(args.output).exists() and Path(args.output).read_text(encoding="utf-8") == text
        print("sample is up to date" if same else f"{args.output} is stale: rerun {Path(__file__).name}")
        return 0 if same else 1
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {len(threads)} threads to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
