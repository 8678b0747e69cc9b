"""Generate a large synthetic CMV dump in the raw format of cmv_20161111.jsonlist.

    python benchmarks/synth_dump.py --threads 25000 --output benchmarks/data/synth_cmv_25000.jsonlist

Same line format as the bundled sample (cmv_core/data/make_sample.py): one
submission a line with a flat `comments` list of real comments (all the usual
Reddit API fields, HTML-escaped bodies), "more" placeholders (some colliding
with real ids), "_" stubs, deleted comments, OP deltas confirmed by DeltaBot
in both formats, DeltaBot rejections and non-OP deltas. Comment counts per
thread are skewed like the real data (mostly tens, a few in the thousands);
25,000 threads give about 1.5 million comment objects. Deterministic for a
seed; the text is word salad (this is for speed, not for training). The output
is written through cmv_core.storage, so `.gz`/`.bz2` names compress.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmv_core import storage  # noqa: E402

SUBREDDIT_ID = "t5_2w2s8"
WORDS = (
    "the of and to a in that is it you for not be this are have with as on but they view I would people "
    "think if or an more can what about do there so your their some because all just will one like than "
    "argument point evidence change why how most other when only make also which could should really "
    "government money law policy school children health cost system society study data research world "
    "country history science reason example problem better worse good bad right wrong moral free choice "
    "market work job wage tax vote election language culture religion art music game film book animal "
    "food climate energy car city house rent family friend parent teacher student doctor police court"
).split()


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out


def _bodies(rng: random.Random, n: int = 4000) -> list[str]:
    """A pool of escaped comment bodies, 1-4 paragraphs, some quoting, some with entities."""
    pool = []
    for _ in range(n):
        paras = []
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
            k = max(4, int(rng.lognormvariate(3.4, 0.8)))
            sent = " ".join(rng.choice(WORDS) for _ in range(k))
            paras.append(sent[0].upper() + sent[1:] + ".")
        if rng.random() < 0.15:
            paras.insert(0, "&gt; " + paras[-1][: rng.randint(20, 120)])
        if rng.random() < 0.1:
            paras.append("Costs &amp; benefits: a &lt; b.")
        pool.append("\n\n".join(paras))
    return pool


def _confirm(rng: random.Random, name: str) -> str:
    if rng.random() < 0.5:
        return (
            f"Confirmed: 1 delta awarded to /u/{name}. ^[[History](/r/changemyview/wiki/user/{name})]\n\n"
            "^[[Wiki](http://www.reddit.com/r/changemyview/wiki/index)]"
        )
    return (
        f"Confirmed: 1 delta awarded to /u/{name} ([{rng.randint(1, 90)}\u2206](/r/changemyview/wiki/user/"
        f"{name})).\n\n^[Delta System Explained](https://www.reddit.com/r/changemyview/wiki/deltasystem)"
        f'\n\n[](HTTP://DB3PARAMSSTART\n{{"issues": {{}}, "parentUserName": "{name}"}}\nDB3PARAMSEND)'
    )


REJECT = (
    "This delta has been rejected. The length of your comment suggests that you haven't properly "
    "explained how /u/{} changed your view (comment rule 4)."
)


def _n_comments(rng: random.Random) -> int:
    if rng.random() < 0.002:
        return rng.randint(1500, 3000)  # the rare huge thread
    return min(int(rng.expovariate(1 / 54.0)) + 1, 1200)


def make_thread(rng: random.Random, index: int, bodies: list[str], users: list[str]) -> dict:
    tid = _b36(36**5 + index * 7919 % (36**6 - 36**5))
    link = "t3_" + tid
    op = users[rng.randrange(len(users))] if rng.random() > 0.03 else "[deleted]"
    t0 = 1478000000.0 - index * 17000.0
    comments: list[dict] = []
    real: list[dict] = []
    kids: dict[str, list[str]] = {}
    t = t0
    serial = index * 4000
    for _ in range(_n_comments(rng)):
        serial += 1
        t += rng.randint(5, 900)
        r = rng.random()
        if real and r < 0.005:
            p = real[rng.randrange(len(real))]
            comments.append({"count": 0, "parent_id": "t1_" + p["id"], "children": [], "name": "t1__", "id": "_"})
            continue
        if real and r < 0.025:
            p = real[-rng.randint(1, min(len(real), 10))]
            ghost = [_b36(36**6 + serial * 31 + j) for j in range(rng.randint(1, 5))]
            if rng.random() < 0.3 and kids.get(p["id"]):
                ghost.insert(0, kids[p["id"]][0])  # the id of a real comment listed elsewhere
            comments.append(
                {
                    "count": len(ghost) + rng.randint(0, 20),
                    "parent_id": "t1_" + p["id"],
                    "children": ghost,
                    "name": "t1_" + ghost[0],
                    "id": ghost[0],
                }
            )
            continue
        parent = None if not real or rng.random() < 0.25 else real[-rng.randint(1, min(len(real), 20))]
        if parent is not None and parent["author"] not in (op, "[deleted]", "DeltaBot") and rng.random() < 0.3:
            author = op
        else:
            author = users[rng.randrange(len(users))]
        body = bodies[rng.randrange(len(bodies))]
        deleted = rng.random() < 0.03
        delta = (
            parent is not None
            and author == op
            and not deleted
            and parent["author"] != "DeltaBot"
            and rng.random() < 0.08
        )
        if delta:
            body = "\u2206 " + body if rng.random() < 0.8 else body + "\n\n!delta"
        cid = "d" + _b36(36**6 + serial * 37)
        pid = link if parent is None else "t1_" + parent["id"]
        c = _comment(cid, pid, link, "[deleted]" if deleted else author, "[deleted]" if deleted else body, t, rng)
        comments.append(c)
        real.append(c)
        kids.setdefault(pid[3:], []).append(cid)
        if delta:
            serial += 1
            t += rng.randint(5, 60)
            text = _confirm(rng, parent["author"]) if rng.random() < 0.85 else REJECT.format(parent["author"])
            bot = _comment("d" + _b36(36**6 + serial * 37), "t1_" + cid, link, "DeltaBot", text, t, rng)
            comments.append(bot)
            kids.setdefault(cid, []).append(bot["id"])
    for c in real:
        children = kids.get(c["id"])
        if children:
            c["replies"] = {"kind": "Listing", "data": {"children": children}}
    return _submission(rng, tid, op, t0, bodies, comments, len(real))


def _submission(
    rng: random.Random, tid: str, op: str, t0: float, bodies: list[str], comments: list[dict], n_real: int
) -> dict:
    """The thread's line: a submission with its flat `comments` list."""
    link = "t3_" + tid
    return {
        "domain": "self.changemyview",
        "subreddit": "changemyview",
        "selftext_html": None,
        "selftext": "\n\n".join(bodies[rng.randrange(len(bodies))] for _ in range(3)),
        "id": tid,
        "gilded": 0,
        "author": op,
        "score": rng.randint(0, 900),
        "over_18": False,
        "num_comments": n_real,
        "subreddit_id": SUBREDDIT_ID,
        "edited": False,
        "link_flair_text": None,
        "stickied": False,
        "is_self": True,
        "permalink": f"/r/changemyview/comments/{tid}/",
        "name": link,
        "created": t0 + 28800,
        "url": f"https://www.reddit.com/r/changemyview/comments/{tid}/",
        "author_flair_text": None,
        "title": "CMV: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))),
        "created_utc": t0,
        "ups": 1,
        "distinguished": None,
        "comments": comments,
    }


def _comment(cid: str, pid: str, link: str, author: str, body: str, t: float, rng: random.Random) -> dict:
    score = rng.randint(-5, 80)
    return {
        "subreddit_id": SUBREDDIT_ID,
        "banned_by": None,
        "removal_reason": None,
        "link_id": link,
        "likes": None,
        "replies": "",
        "user_reports": [],
        "saved": False,
        "id": cid,
        "gilded": 0,
        "archived": True,
        "report_reasons": None,
        "author": author,
        "parent_id": pid,
        "score": score,
        "approved_by": None,
        "controversiality": 0,
        "body": body,
        "edited": False,
        "author_flair_css_class": None,
        "downs": 0,
        "stickied": False,
        "subreddit": "changemyview",
        "score_hidden": False,
        "name": "t1_" + cid,
        "created": t + 28800.0,
        "author_flair_text": None,
        "created_utc": t,
        "distinguished": "moderator" if author == "DeltaBot" else None,
        "mod_reports": [],
        "num_reports": None,
        "ups": score,
    }


def generate(output: str, threads: int, seed: int = 2016) -> dict:
    """Write the dump; returns counts (threads, comment objects, bytes)."""
    rng = random.Random(seed)
    bodies = _bodies(rng)
    users = [f"user_{_b36(36**4 + i * 977)}" for i in range(6000)]
    objects = 0
    written = 0
    with storage.open_write(output, "wb") as f:
        for i in range(threads):
            sub = make_thread(rng, i, bodies, users)
            objects += len(sub["comments"])
            line = orjson.dumps(sub) + b"\n"
            written += len(line)
            f.write(line)
    return {"threads": threads, "comment_objects": objects, "bytes": written}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=25000)
    ap.add_argument("--seed", type=int, default=2016)
    ap.add_argument("--output", default=None, help="default: benchmarks/data/synth_cmv_<threads>.jsonlist")
    args = ap.parse_args()
    output = args.output or str(REPO / "benchmarks" / "data" / f"synth_cmv_{args.threads}.jsonlist")
    started = time.monotonic()
    counts = generate(output, args.threads, args.seed)
    print(
        f"wrote {counts['threads']:,} threads, {counts['comment_objects']:,} comment objects, "
        f"{counts['bytes'] / 2**20:,.0f} MiB to {output} in {time.monotonic() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
