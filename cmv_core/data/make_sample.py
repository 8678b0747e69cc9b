"""Write cmv_core/data/sample_cmv.jsonlist: a small CMV dump in the real raw format.

    python cmv_core/data/make_sample.py            # rewrites the bundled sample
    python cmv_core/data/make_sample.py --check    # exits 1 if the file is stale

The threads were written for this project (no Reddit content). Each line is a
submission with a flat `comments` list exactly as in the Cornell dump: real
comments with `parent_id`, `replies` listings of bare ids, HTML-escaped bodies,
"more" placeholders (some colliding with real ids), "_" stubs, deleted and
removed comments, DeltaBot replies in the old and the DB3 format (with
DB3PARAMS blocks), rejections, non-OP deltas, tokens inside quotes and code,
and the moderators' footnote. Output is deterministic (seeded), so the file
only changes when this script does. The tests pin the ids they check.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("sample_cmv.jsonlist")
SUBREDDIT_ID = "t5_2w2s8"
RAW_ENTITY = "\x00RAWENT\x00"  # becomes a literal `&#8710;` in the dump (not `&amp;#8710;`)

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


# --- the tree DSL ---------------------------------------------------------------------------


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
    params = json.dumps({"comment": "https://www.reddit.com/r/changemyview/comments/", "issues": {},
                         "parentUserName": name})
    return c(
        "DeltaBot",
        f"Confirmed: 1 delta awarded to /u/{shown} ([{count}\u2206](/r/changemyview/wiki/user/{name})).\n\n"
        "^[Delta System Explained](https://www.reddit.com/r/changemyview/wiki/deltasystem) ^| "
        "^[Deltaboards](https://www.reddit.com/r/changemyview/wiki/deltaboards)\n\n"
        f"[](HTTP://DB3PARAMSSTART\n{params}\nDB3PARAMSEND)",
    )


def bot_reject(text: str, name: str = "") -> dict:
    params = json.dumps({"comment": "https://www.reddit.com/r/changemyview/comments/",
                         "issues": {"rejected": 1}, "parentUserName": name})
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
REJECT_AGAIN = (
    "This delta has been rejected. You have already awarded /u/{name} a delta for this comment."
)


def thread(author: str, title: str, selftext: str, comments: list[dict], *, extras: tuple = (),
           shuffle: bool = False, footnote: bool = True) -> dict:
    return {"author": author, "title": title, "selftext": selftext + (FOOTNOTE if footnote else ""),
            "comments": comments, "extras": extras, "shuffle": shuffle}


# --- the threads ---------------------------------------------------------------------------------
# Scenario notes say which delta rule or data case each thread exercises.

THREADS: list[dict] = []

# 1. Basic: top-level comment rewarded (old DeltaBot format), a losing challenger, footnote.
THREADS.append(thread(
    "saltwater_sam", "CMV: Tipping in US restaurants should be abolished and replaced with higher menu prices",
    "I worked as a server for two years and I still think the whole tipping system is broken. Customers are "
    "asked to do math at the end of a meal to decide how much a stranger gets paid, and the number swings "
    "wildly based on things the server can't control: the kitchen being slow, the customer being in a bad "
    "mood, or frankly the server's looks and race.\n\nIf restaurants just raised menu prices by 20% and paid "
    "a real wage, the total cost to the customer would be the same, servers would have a predictable income, "
    "and nobody would have to feel awkward about it. Most of the developed world already works this way and "
    "their restaurants seem fine.\n\nThe only people who benefit from tipping are owners who get to shift "
    "labor costs onto customers. Change my view.",
    [
        c("brine_and_bread",
          "I was a bartender for six years, and the part of your argument that doesn't hold is \"the total cost "
          "would be the same.\" It wouldn't be the same for the *best* servers, and those are exactly the people "
          "restaurants need to keep.\n\nA good server at a busy place clears far more in tips than any owner "
          "would pay as a flat wage, because the owner has to budget for the slow Tuesday too. Several "
          "well-known restaurants tried hospitality-included pricing and quietly reversed it: their "
          "experienced staff left for places that still took tips, and the menu prices scared off customers who "
          "compare the sticker price, not the final bill.\n\nSo the problem isn't that tipping can't be "
          "replaced in theory, it's that the first restaurant to switch is punished twice: by its staff and by "
          "its customers. That's a coordination problem, and it's why a ban would have to be a law, not a "
          "choice individual owners make.",
          c("saltwater_sam",
            "That's a fair point about the coordination problem. I was imagining each restaurant just deciding "
            "to switch, and you're right that the first movers get punished. I still think it should be gone, "
            "but I now think the argument has to be for a law rather than for owners doing it voluntarily, and "
            "that's a real change in what I believe. \u2206",
            bot_old("brine_and_bread")),
          key="win1"),
        c("quietmarmot",
          "Tipping lets customers reward good service directly. If you remove it, servers have no incentive to "
          "be attentive, and you'll get the indifferent service you see in a lot of European restaurants.",
          c("saltwater_sam",
            "I've had great service in Japan, where tipping is basically considered rude. I think service "
            "quality comes from management and training far more than from the chance of an extra 5%.",
            c("quietmarmot",
              "Japan has a very particular service culture, though. You can't import that by changing how the "
              "bill is paid. In the US the tip is the only feedback the server actually feels.")),
          key="lose1"),
        c("a_fork_in_the_road",
          "Owners would just pocket the difference. Menu prices go up 20%, wages go up 10%."),
    ]))

# 2. Deep branch: the rewarded comment is five levels down (DB3 format with DB3PARAMS).
THREADS.append(thread(
    "clock_skeptic", "CMV: Daylight saving time does more harm than good and should be abolished",
    "Every spring we lose an hour of sleep and every fall the evenings go dark at 4:30. Studies have linked "
    "the spring change to more heart attacks and car crashes in the following week, and the energy savings "
    "that were the original justification seem to be close to zero now that we use air conditioning.\n\n"
    "Beyond that, it's just a hassle: clocks in cars, software bugs, scheduling meetings across countries "
    "that change on different dates. I don't see anyone who actually benefits from switching twice a year.\n\n"
    "I'd be happy with either permanent standard time or permanent daylight time, I just want the switching "
    "to stop.",
    [
        c("meridian_mike",
          "You say you'd be happy with either permanent option, but those two are very different, and the choice "
          "matters more than the switching.\n\nPermanent daylight time means sunrise after 8:30 or even 9 a.m. in "
          "winter across much of the northern US. The US actually tried this in 1974 and repealed it within a "
          "year, because parents were furious about kids waiting for school buses in the dark.",
          c("clock_skeptic",
            "I didn't know about 1974. But that still sounds like an argument for permanent standard time, "
            "not for keeping the switch.",
            c("meridian_mike",
              "Permanent standard time has the opposite problem: in June the sun would rise at 4:15 a.m. in "
              "Boston and set before 8. People really like long summer evenings; that's why every poll shows "
              "majorities wanting permanent *daylight* time, the option that already failed once.",
              c("clock_skeptic",
                "Okay, but surely some discomfort in one season is better than the health costs of switching?",
                c("meridian_mike",
                  "That's the real trade-off, and it's why I'd say DST isn't pure harm. The switch is a crude "
                  "compromise between two permanent options that each make a large group miserable for half "
                  "the year. The heart-attack studies are about the week after the change; the dark-morning "
                  "costs of permanent DST (school commutes, winter crashes in the morning) last for months.\n\n"
                  "Abolishing the switch is reasonable, but only if you pick standard time and accept the "
                  "summer-evening complaints. \"Just stop switching\" without choosing is how you end up with "
                  "1974 again.",
                  c("clock_skeptic",
                    "This changed my view in a specific way: I was treating \"abolish DST\" as obviously good, "
                    "and now I see the switch as a compromise with real reasons behind it. I still lean toward "
                    "permanent standard time, but I no longer think the current system has no benefits. "
                    "\u2206",
                    bot_db3("meridian_mike")),
                  key="win2"))))),
        c("lumen_and_lux",
          "Farmers hate DST, retailers love it. It exists because evening daylight is good for shopping and "
          "golf. It has nothing to do with energy.",
          c("clock_skeptic",
            "That's interesting history but it doesn't really argue for keeping it. If the main beneficiaries "
            "are retailers, that makes me more sure it should go.",
            c("lumen_and_lux",
              "Retail and recreation are a big part of the economy, though. Evening light has real value to "
              "a lot of people, not just shop owners.")),
          key="lose2"),
    ]))

# 3. Two winning branches in one thread (two challengers, old and DB3 formats).
THREADS.append(thread(
    "paw_print_pam", "CMV: Zoos are unethical and should be phased out",
    "Keeping wild animals in enclosures for people to look at is hard to justify. Elephants walk dozens of "
    "kilometres a day in the wild; orcas and polar bears show stereotypic behaviour like pacing and head "
    "bobbing in captivity. We wouldn't accept this for a dog.\n\nThe conservation argument feels like "
    "marketing to me. Most zoo animals aren't endangered, and the breeding programs rarely release anything "
    "back into the wild. If we care about species, the money should go to protecting habitat.\n\nI think "
    "zoos should stop acquiring new animals and be phased out over a generation.",
    [
        c("kestrel_notes",
          "Some species exist today only because of zoo breeding. The California condor got down to 27 birds; "
          "every one was captured and bred in zoos, and there are now hundreds flying in the wild. The "
          "Arabian oryx, Przewalski's horse and the black-footed ferret have similar stories.\n\nYou're right "
          "that most animals in a typical zoo aren't part of a release program. But those programs need the "
          "expertise, the vets and the facilities that only exist because ordinary zoos pay for them with "
          "ticket sales.",
          c("paw_print_pam",
            "I knew about the condor but not the ferret or the oryx. I assumed these were one-off stories. If "
            "the breeding programs depend on the rest of the zoo existing, then phasing out zoos would kill "
            "the part I actually support. \u2206",
            bot_old("kestrel_notes")),
          key="win3a"),
        c("enclosure_engineer",
          "Your elephant and orca examples are real, but they're the worst cases, not the typical animal. "
          "Modern accredited zoos have already stopped keeping orcas and several have sent their elephants to "
          "sanctuaries.",
          c("paw_print_pam",
            "Sure, but isn't the right answer to keep going until there's nothing left in cages?",
            c("enclosure_engineer",
              "The better answer is to sort species by welfare. Reptiles, many birds, small primates and "
              "insects do measurably well in good facilities: they breed, live longer than in the wild and "
              "show normal behaviour. Wide-ranging species do badly. \"Phase out zoos\" treats a tortoise like "
              "an elephant. \"Phase out the species that suffer\" is a policy you could actually defend.",
              c("paw_print_pam",
                "That's a distinction I wasn't making, and it's a good one. I'm changing my position to "
                "phasing out the wide-ranging species rather than zoos in general. \u2206",
                bot_db3("enclosure_engineer")),
              key="win3b"))),
        c("gravel_and_grit",
          "Kids who see animals in person grow up caring about conservation. A documentary isn't the same.",
          c("paw_print_pam",
            "Is there any evidence for that? It sounds intuitive but I've never seen it measured.",
            c("gravel_and_grit",
              "There are visitor surveys showing higher concern for wildlife after zoo visits, but I'll admit "
              "they mostly measure attitudes right at the exit.")),
          key="lose3"),
    ]))

# 4. Two deltas in one chain: the top-level comment and a third user's reply below it.
THREADS.append(thread(
    "lane_keeper", "CMV: Once self-driving cars are safer than humans, human driving should be banned on public roads",
    "Roughly 40,000 people die on US roads every year, and almost all crashes involve human error: "
    "distraction, drunk driving, speeding, fatigue. If an automated system can drive more safely than the "
    "average person, letting humans keep driving is choosing to accept thousands of preventable deaths.\n\n"
    "We already restrict dangerous behaviour when safer alternatives exist. I think once the data shows "
    "self-driving cars are safer, human driving on public roads should be phased out over a decade or so.",
    [
        c("torque_curve",
          "\"Safer than the average human\" is the wrong bar for a ban. The average includes drunk drivers and "
          "teenagers. A sober, careful, experienced driver is far safer than average, and you'd be banning "
          "them in favour of a system that might be worse than *them*.",
          c("lane_keeper",
            "Hm, that's true. The comparison should be to the drivers who'd actually be banned, and the "
            "careful ones are the ones who'd lose the most. \u2206 for that. But doesn't that just mean waiting "
            "until the systems beat the best drivers?",
            bot_db3("torque_curve"),
            c("actuarial_annie",
              "Even then, a ban is a blunt tool. Insurance does this job better: once automated cars are "
              "clearly safer, premiums for manual driving rise until only people who really value it keep "
              "doing it, and they pay for the extra risk they create. You get most of the safety without "
              "banning rural drivers, classic cars or people who can't afford a new vehicle.",
              c("lane_keeper",
                "I hadn't considered pricing the risk instead of banning it. That gets most of the benefit "
                "without the fairness problems, so I've moved off \"ban\" entirely. \u2206",
                bot_db3("actuarial_annie")),
              key="win4b")),
          key="win4a"),
        c("rustbelt_rover",
          "What about places where the software doesn't work, like snowy rural roads with no lane markings?",
          c("lane_keeper",
            "I'd say the ban only applies where the systems are proven, so that's covered by the premise.",
            c("rustbelt_rover",
              "Then it's not really a ban on human driving, it's a ban on human driving in cities, which is "
              "a much weaker claim than your title.")),
          key="lose4"),
    ]))

# 5. The OP awards the same comment twice: the second is rejected by DeltaBot, one branch.
THREADS.append(thread(
    "coach_carla", "CMV: Participation trophies teach kids that effort doesn't matter",
    "I coach under-10 soccer and every kid gets the same trophy at the end of the season whether they showed "
    "up to every practice or skipped half of them. I think that teaches kids that results and effort are "
    "irrelevant.\n\nLife doesn't hand out trophies for showing up. I'd rather kids learn early that winning "
    "takes work, and that losing is part of playing.",
    [
        c("small_sided_game",
          "At under-10 the trophy isn't a reward for results, it's a souvenir of the season, like a photo. Kids "
          "that age know perfectly well who won; research on motivation shows young kids drop out of sport "
          "mostly because it stops being fun, not because rewards were too equal. Keeping them playing until "
          "12 or 13 is what actually builds skill, and that's when competitive rewards start to mean "
          "something to them.",
          c("[deleted]", "[removed]"),
          c("coach_carla",
            "The souvenir framing makes sense to me. The trophy isn't doing what I thought it was doing, so "
            "it isn't teaching what I thought either. \u2206",
            bot_old("small_sided_game")),
          c("coach_carla",
            "Also, forgot to say: the point about dropout age really got me. \u2206",
            bot_reject(REJECT_AGAIN.format(name="small_sided_game"), "small_sided_game")),
          key="win5"),
        c("bench_warmer_99",
          "Kids aren't stupid. They know the trophy is meaningless, so it doesn't teach them anything at all.",
          c("coach_carla",
            "If they know it's meaningless, why do some of them cry when they don't get one?",
            c("bench_warmer_99",
              "Because it's a shiny thing everybody else has. That's about belonging, not about effort.")),
          key="lose5"),
    ]))

# 6. Non-OP deltas: a third user awards a challenger (confirmed); a user tries to award the OP (rejected).
THREADS.append(thread(
    "ledger_lane", "CMV: Public college tuition should be free for everyone",
    "Higher education is a public good. Graduates earn more, pay more tax, are healthier and participate more "
    "in civic life. Making people take on tens of thousands in debt to get it makes no sense when high school "
    "is already free.\n\nCountries like Germany have free tuition and still have excellent universities. I "
    "think US public colleges should be tuition-free for every student, funded from general taxes.",
    [
        c("marginal_mara",
          "Free tuition for *everyone* is regressive. Students at four-year public universities come "
          "disproportionately from higher-income families; a universal subsidy sends most of the money to "
          "people who were going to attend anyway and could afford it.\n\nIf the goal is access, the same money "
          "spent on means-tested grants, community colleges and living costs (which are often bigger than "
          "tuition for poor students) reaches the students who are actually priced out.",
          c("ledger_lane",
            "I see the regressive argument, but universal programs tend to be more politically durable than "
            "means-tested ones.",
            c("marginal_mara",
              "That's true for things everybody uses, like Social Security. Fewer than half of adults get a "
              "bachelor's degree, so here the universal program is a transfer from people who don't go to "
              "college to people who do. The durability argument cuts the other way.",
              c("ledger_lane",
                "That's the point I didn't have an answer to. A universal benefit that most people never use "
                "isn't really universal. I now think targeted aid plus free community college is the better "
                "policy. \u2206",
                bot_db3("marginal_mara")),
              c("econ_lurker",
                "This is the clearest explanation of why free tuition is regressive that I've read. "
                "\u2206",
                bot_db3("marginal_mara", count=2)),
              key="win6"))),
        c("econ_lurker",
          "Germany also sends a much smaller share of students to university and has a strong apprenticeship "
          "system. You can't copy the tuition part without the rest.",
          c("ledger_lane",
            "Isn't that an argument for building the apprenticeship system, not against free tuition?",
            c("econ_lurker",
              "It's an argument that free tuition alone won't produce German outcomes. Selective admission "
              "is part of why it's affordable there.")),
          key="lose6"),
        c("ledger_lane",
          "To be clear, I'm not against aid for living costs too, I just think tuition is the first step.",
          c("tuition_tom",
            "Good point, OP, you changed my mind on the first-step thing. !delta",
            bot_reject(REJECT_OP))),
    ]))

# 7. Tokens inside quotes and code don't count; a later real delta does.
THREADS.append(thread(
    "ballot_bex", "CMV: Voting should be mandatory, like in Australia",
    "Australia fines people a small amount for not voting, and turnout is over 90%. Elections there reflect "
    "what the whole population thinks, not just the most motivated or angriest people. Campaigns can't win "
    "by suppressing turnout or firing up a narrow base.\n\nIn the US, turnout in midterms is often under 50%, "
    "and it skews older and richer. I think a mandatory-voting law with a small fine and an easy "
    "\"none of the above\" option would make democracy work better.",
    [
        c("civic_sparrow",
          "If I change your view, you can reply with a \u2206. Anyway: compelled participation produces a lot "
          "of low-information votes, and donkey votes (ticking boxes top to bottom) are measurable in "
          "Australia. Ballot order ends up mattering.",
          c("ballot_bex",
            "> If I change your view, you can reply with a \u2206.\n\nYou haven't yet! Donkey votes are a real "
            "effect, but I've read it's about 1-2%, which is smaller than most turnout gaps.",
            c("civic_sparrow",
              "Even 1-2% decides close races. And it's random noise added by the law itself.")),
          key="lose7"),
        c("turnout_theo",
          "A practical problem: the US doesn't have automatic voter registration in most states, or a national "
          "ID, or elections run by a single independent commission. Australia's system works because "
          "enrolment is near-universal and elections are on Saturdays with polling places everywhere.\n\n"
          "If you make voting mandatory *before* fixing registration and access, the fines land on the people "
          "who already find it hardest to vote: shift workers, people who move often, people without cars. "
          "The order of reforms matters.",
          c("ballot_bex",
            "That's a good catch, thanks. To give a delta you type it like this:\n\n    !delta\n\nor "
            "`\u2206` in a sentence, right? Anyway, I'm not convinced yet.",
            c("turnout_theo",
              "Right. And my point stands: a fine on people who couldn't reach a polling place is a poll tax "
              "by another name.",
              c("ballot_bex",
                "Put that way, mandatory voting without fixing access first would punish exactly the people "
                "I wanted to include. I now think access reforms have to come first and the mandate, if ever, "
                "last. \u2206",
                bot_db3("turnout_theo")),
              key="win7"))),
    ]))

# 8. DeltaBot's own text has ∆ and the OP answers DeltaBot with a token: neither is a delta.
THREADS.append(thread(
    "whisker_wren", "CMV: Cats make better pets than dogs for most people",
    "Cats are independent, don't need to be walked, can be left alone for a weekend with enough food and "
    "water, and are happy in a small apartment. Most people work long hours and live in cities, which is a "
    "much better fit for a cat than a dog.\n\nDogs are great, but they need hours of attention every day. I "
    "think most people who get dogs are choosing a pet that doesn't fit their lives.",
    [
        c("leash_and_lead",
          "\"Can be left alone for a weekend\" is the kind of thinking that produces lonely, bored cats with "
          "behaviour problems. Cats are more social than their reputation; the welfare advice is that they "
          "shouldn't be left alone for more than a day without someone checking in.\n\nThe honest comparison "
          "is that both need daily care; dogs need more *structured* time. For a lot of people a dog's routine "
          "(walks twice a day) is actually a benefit: it gets them outside and moving.",
          c("whisker_wren",
            "I think I underestimated how much cats need company, and I was counting the walks only as a "
            "cost. \u2206",
            bot_db3("leash_and_lead", count=75),
            c("DeltaBot",
              "^This ^user ^has ^earned ^[75\u2206](/r/changemyview/wiki/user/leash_and_lead). ^Please ^see "
              "^the ^wiki ^for ^more.",
              c("whisker_wren", "Thanks DeltaBot \u2206 good bot"))),
          key="win8"),
        c("tabby_tactics",
          "Cats also kill billions of birds a year if they go outside. That's a big cost you're not counting.",
          c("whisker_wren",
            "Fair, but that's an argument for indoor cats, not for dogs.",
            c("tabby_tactics",
              "Most people in the US let their cats out, though. You have to compare the pets people actually "
              "keep, not ideal ones.")),
          key="lose8"),
    ]))

# 9. A "more" placeholder whose id collides with the real rewarded comment, listed BEFORE it; a "_" stub.
THREADS.append(thread(
    "reel_critic", "CMV: Movie remakes are almost always lazy cash grabs",
    "Every year there's another remake of a film that was perfectly fine the first time. Studios do it "
    "because a familiar title is a safer bet than an original script, not because they have anything new to "
    "say.\n\nI can think of a handful of good remakes, but the rule is a shot-for-shot copy with better "
    "special effects and worse acting.",
    [
        c("splice_and_dice",
          "Some of the most celebrated films ever made are remakes: *The Thing* (1982), *The Fly* (1986), "
          "*Scarface* (1983), *The Departed*, *True Grit*, *Ocean's Eleven*. Even *The Maltese Falcon* that "
          "everyone knows is the third version.",
          c("reel_critic",
            "Those are the famous exceptions, though. For every *The Thing* there are ten *RoboCop* (2014)s.",
            c("splice_and_dice",
              "That ratio is true of movies in general. Sturgeon's law: ninety percent of everything is "
              "mediocre. The question is whether remakes are worse than the base rate of original films, and "
              "the evidence for that is thin: remakes that flop get remembered as remakes, original films "
              "that flop just get forgotten.",
              c("reel_critic",
                "The survivorship point is good. I was comparing bad remakes to the originals that were good "
                "enough to be remade, which is a rigged comparison. \u2206",
                bot_old("splice_and_dice")),
              key="win9"))),
        c("popcorn_pundit",
          "Remakes also bring old stories to audiences who would never watch a black-and-white film.",
          c("reel_critic",
            "That's a reason for the studio, not a reason the film is any good.",
            c("popcorn_pundit",
              "It is a reason the film has value, though. A story reaching new people is not nothing.")),
          key="lose9"),
        c("grindhouse_gabe", "Name one good remake of a horror film from the last ten years.", key="stubparent9"),
    ],
    extras=(("more", ["win9"], "before", 2), ("stub", "stubparent9"))))

# 10. The placeholder collides with a real comment listed BEFORE it; HTML entities (&amp; &lt; &gt;).
THREADS.append(thread(
    "fission_fan", "CMV: Nuclear power is the best tool we have for cutting carbon emissions",
    "Nuclear has the lowest deaths per terawatt-hour of any source, uses very little land, and runs around the "
    "clock regardless of weather. France decarbonised most of its grid in about 15 years by building reactors "
    "in the 70s & 80s.\n\nRenewables are great but intermittent, and storage at grid scale is still expensive. "
    "I think any serious climate plan needs nuclear at the center, and opposition to it is mostly fear.",
    [
        c("grid_tied",
          "The problem isn't safety, it's cost and time. Recent Western builds (Vogtle in Georgia, Flamanville in "
          "France, Hinkley Point C in the UK) ran years late and billions over budget. Solar & wind costs fell "
          "by roughly 70-90% over the last decade, so each dollar spent on them now cuts more carbon, sooner.\n\n"
          "When cost per tonne of CO2 avoided is what matters & the clock is short, \"best tool\" should mean "
          "fastest and cheapest per tonne, and for the next decade that's mostly renewables plus existing "
          "reactors kept open. New nuclear is a slower, costlier bet: if cost(nuclear) > cost(wind + "
          "storage) for the same tonne, the money should go where it does more.",
          c("fission_fan",
            "Keeping existing reactors open is something I strongly agree with. I'll admit I was thinking of "
            "the 1970s French build-out and not of what new plants cost today. So: best tool for keeping "
            "emissions low, maybe, but not the best place for new money right now. \u2206",
            bot_db3("grid_tied")),
          key="win10"),
        c("half_life_hal",
          "What about the waste? We still don't have a permanent repository in the US.",
          c("fission_fan",
            "The waste is tiny in volume and dry cask storage has a perfect safety record. It's a political "
            "problem, not a technical one.",
            c("half_life_hal",
              "\"It's political\" doesn't make it go away. Until there's a repository, every plant is a "
              "long-term storage site near a river <3")),
          key="lose10"),
    ],
    extras=(("more", ["win10", "ghost10a"], "after", 3),)))

# 11. Deleted and removed comments: a branch through a deleted top-level comment; a delta to a deleted
#     comment does not count; a [removed] body cannot win.
THREADS.append(thread(
    "bubble_sheet", "CMV: Standardized tests should not be used in college admissions",
    "SAT scores correlate strongly with family income. Rich kids get tutors, multiple attempts and test prep "
    "courses; poor kids take it once with no preparation. Using the score in admissions just launders "
    "privilege into merit.\n\nHigh school grades reflect four years of work instead of one Saturday morning. I "
    "think colleges should drop test requirements entirely.",
    [
        c("[deleted]", "[deleted]",
          c("bubble_sheet",
            "I don't think grades are perfect either, but they're better than one test.",
            c("percentile_pete",
              "Grades have the same income problem and a worse one on top: grade inflation differs wildly "
              "between schools. An A at a wealthy suburban school and an A at an under-resourced one mean "
              "different things, and admissions officers can't tell them apart. A common test is the one "
              "measure that lets a strong student at a weak school stand out.\n\nSeveral universities that "
              "went test-optional found that they were *missing* talented low-income students who would "
              "have been admitted with their scores, and went back to requiring them.",
              c("bubble_sheet",
                "That's the part I got wrong. I was treating grades as a neutral alternative, and the point "
                "about strong students at weak schools is exactly the group I care about. \u2206",
                bot_db3("percentile_pete")),
              key="win11"))),
        c("prep_course_priya",
          "[removed]",
          c("bubble_sheet", "This is a good point actually. \u2206")),
        c("essay_ed",
          "Tests at least can't be ghost-written. Essays and extracurriculars are far more gameable by money.",
          c("bubble_sheet",
            "I'm fine dropping essays too, honestly.",
            c("essay_ed",
              "Then you're left with grades alone, which means the school a kid attends decides everything.")),
          key="lose11"),
        c("gone_user_22",
          "Tests are the only objective thing in the application.",
          c("[deleted]",
            "[deleted]",
            c("bubble_sheet", "Replying to the deleted comment above: you're right, \u2206"))),
    ]))

# 12. The OP deleted their account: no delta can be attributed to the OP, even with DeltaBot's confirmation.
THREADS.append(thread(
    "[deleted]", "CMV: Homework in elementary school does more harm than good",
    "Research on homework for young kids shows little to no benefit to achievement before middle school, and "
    "it costs family time, sleep and play. Kids already spend seven hours a day at school.\n\nI think "
    "elementary schools should drop homework other than reading for fun.",
    [
        c("recess_rita",
          "The research supports your view on *achievement*, but homework in early grades is also how parents "
          "see what their kid is learning. Without it a lot of parents have no idea their child is falling "
          "behind until a report card arrives.",
          c("[deleted]",
            "That's a good point about parents seeing what's going on. \u2206",
            bot_db3("recess_rita"))),
        c("times_tables_tina",
          "Practice matters for things like multiplication facts. Ten minutes a night adds up.",
          c("[deleted]", "Then do the ten minutes in class.")),
    ]))

# 13. A removed post: the submission text is "[removed]" but the author is known.
THREADS.append(thread(
    "copper_cutter", "CMV: The US should get rid of the penny",
    "[removed]",
    [
        c("mint_condition",
          "Pennies cost more than a cent to make, sure, but the nickel costs more than five cents to make too. "
          "If you get rid of the penny, prices round to the nickel and the mint makes a lot more nickels, "
          "which loses more money per coin. Canada avoided this because its nickel is cheaper to make.",
          c("copper_cutter",
            "I didn't realise the nickel loses money too. So dropping the penny alone could make the mint's "
            "losses worse unless the nickel changes as well. \u2206",
            bot_old("mint_condition")),
          key="win13"),
        c("spare_change_sue",
          "Rounding will hurt poor people who pay in cash.",
          c("copper_cutter",
            "Studies of rounding in Canada found the effect is basically zero, it rounds up and down equally.",
            c("spare_change_sue",
              "On average, yes. But stores set prices, and they can choose prices that round up.")),
          key="lose13"),
    ], footnote=False))

# 14. A "!Delta" token (any case) in DB3 times.
THREADS.append(thread(
    "cubicle_cal", "CMV: Open-plan offices are worse than cubicles in every way",
    "Open offices are loud, full of interruptions and give you no privacy. Studies have found that face-to-face "
    "interaction actually *drops* when companies move to open plans, because everyone puts on headphones to "
    "cope.\n\nThe only reason companies do it is that it's cheaper per square foot. I think cubicles, or better, "
    "small offices, beat open plans in every way that matters.",
    [
        c("floorplan_fiona",
          "\"Every way\" is too strong. Open plans are genuinely better for some kinds of work: a trading floor, "
          "a newsroom, an incident response team, a small startup where everyone needs to hear everything. "
          "The research you mention is about knowledge workers doing focused individual work, and for them "
          "you're right.\n\nThe real mistake is a single layout for the whole company. The offices that work "
          "mix quiet rooms, small team areas and a few open spaces, and let people move between them.",
          c("cubicle_cal",
            "The newsroom example is a good one; everyone there actually needs to overhear each other. I'll "
            "take back \"every way\": it's a bad default for focused work, not bad everywhere. !Delta",
            bot_db3("floorplan_fiona")),
          key="win14"),
        c("headset_hank",
          "Cubicles are depressing, though. Grey walls, no daylight. At least open plans let light in.",
          c("cubicle_cal",
            "You can have low cubicle walls and windows. Light isn't unique to open plans.",
            c("headset_hank",
              "In theory. In practice the companies that build cubicles are the same ones that put them in "
              "windowless interiors.")),
          key="lose14"),
    ]))

# 15. The `&#8710;` a user typed (the dump shows `&amp;#8710;`), old DeltaBot format.
THREADS.append(thread(
    "page_turner", "CMV: E-books are better than paper books",
    "E-readers hold thousands of books, let you change the font size, look up words instantly and weigh "
    "less than a paperback. E-books are usually cheaper and arrive in seconds.\n\nPaper books are nice objects, "
    "but for actually *reading*, I think e-books win on every practical measure.",
    [
        c("marginalia_mo",
          "For reading a novel front to back, sure. For studying, paper still wins in the research: people "
          "remember the location of information on a physical page (\"it was near the bottom of a left-hand "
          "page, about halfway through\"), flip back and forth more easily, and comprehension of long "
          "expository texts tends to be a bit better on paper.\n\nAlso, you own a paper book. An e-book can be "
          "pulled from your library by the store, and DRM ties it to one company's device.",
          c("page_turner",
            "The ownership point bugs me now that you say it. And I do flip back a lot when reading "
            "non-fiction. So: better for novels, not for everything. &#8710;",
            bot_old("marginalia_mo")),
          key="win15"),
        c("inkwell_ivy",
          "Paper books don't run out of battery.",
          c("page_turner",
            "My e-reader lasts a month on a charge. That's not a real problem.",
            c("inkwell_ivy",
              "Until you're on a long trip and forgot the cable. It's a small thing but it is a thing.")),
          key="lose15"),
    ]))

# 16. A raw `&#8710;` entity in the dump; an "EDIT:" announcing the delta in the OP text.
THREADS.append(thread(
    "orbit_otto", "CMV: Space exploration is a waste of money while we have problems on Earth",
    "NASA's budget is over twenty billion dollars a year. That money could fund schools, healthcare or "
    "clean water for millions of people. Sending robots to Mars is cool, but I don't see how it's a priority "
    "when people are going hungry.\n\nEdit: formatting.\n\nEDIT 2: My view has been changed by /u/payload_pat, "
    "thanks! \u2206 given below.",
    [
        c("payload_pat",
          "NASA is about 0.4% of the US federal budget. Cancelling it entirely wouldn't move the needle on "
          "healthcare or schools, which each cost hundreds of times more.\n\nAnd a lot of the spending comes "
          "back to Earth: weather satellites, GPS, climate monitoring, crop forecasting. The satellites that "
          "tell farmers about droughts and track hurricanes are space exploration budget. Some of the most "
          "useful tools for the problems you list only exist because of it.",
          c("orbit_otto",
            "I had no idea it was that small a share, and I didn't think of weather and climate satellites "
            "as \"space\". " + RAW_ENTITY,
            bot_db3("payload_pat")),
          key="win16"),
        c("apollo_anna",
          "Exploration inspires kids to go into science. That pays off for decades.",
          c("orbit_otto",
            "That's hard to measure though. Couldn't you inspire kids with cheaper things?",
            c("apollo_anna",
              "Maybe, but nothing has matched the Moon landings for getting a generation into engineering.")),
          key="lose16"),
    ]))

# 17. Δ (Greek capital delta) token; one OP delta without any DeltaBot reply (unconfirmed, no branch).
THREADS.append(thread(
    "quill_quentin", "CMV: Schools should stop teaching cursive",
    "Almost nobody writes in cursive as an adult. Signatures can be anything, and most writing happens on "
    "keyboards. The hours spent on cursive in third grade would be better spent on typing or reading.",
    [
        c("loops_and_links",
          "Handwriting by hand, cursive or not, is linked to better retention of what you're learning than "
          "typing, and for some kids with dyslexia cursive is actually easier because letters like b and d "
          "aren't mirror images.",
          c("quill_quentin",
            "I didn't know about the dyslexia angle, that's interesting. \u0394",
          ),
          key="unconfirmed17"),
        c("archive_annie",
          "If kids can't read cursive, they can't read their grandparents' letters, or historical documents in "
          "archives. Reading cursive takes a few hours to learn if you've written it, and much longer if you "
          "haven't.\n\nI'd agree that *writing* cursive fluently is a low priority. But teaching it briefly so "
          "that kids can read it keeps a huge amount of personal and public history accessible. That's a small "
          "cost for a big benefit.",
          c("quill_quentin",
            "Reading versus writing is the distinction I was missing. Teach it briefly for reading, don't "
            "drill it. That's a change from \"stop teaching it\". \u0394",
            bot_db3("archive_annie")),
          key="win17"),
        c("keyboard_kai",
          "Typing is the real skill and most schools barely teach it.",
          c("quill_quentin", "Agreed, which is why I'd swap the time over.",
            c("keyboard_kai", "Right, but that's an argument for more typing, not against cursive.")),
          key="lose17"),
    ]))

# 18. A first "∆" rejected as too short, then a longer one to the same comment confirmed.
THREADS.append(thread(
    "wage_watcher", "CMV: The federal minimum wage should be raised to $15 everywhere in the US",
    "A full-time worker earning $7.25 an hour makes about $15,000 a year, below the poverty line for a family. "
    "Cities that raised their minimum wage didn't see the job losses critics predicted.\n\nI think the federal "
    "minimum should be $15 nationwide and indexed to inflation after that.",
    [
        c("regional_rachel",
          "Fifteen dollars in Seattle and fifteen dollars in rural Mississippi are very different things. The "
          "city studies you mention looked at high-cost cities where $15 was close to the local median wage "
          "already. In a county where the median wage is $13, a $15 floor is above what half the workers earn "
          "now, and that's where the job-loss risk is real.\n\nIndexing to local wages or cost of living (say, "
          "a minimum at 60% of the local median wage) would get most of the benefit without the risk of "
          "pricing out jobs in poor regions.",
          c("wage_watcher", "\u2206",
            bot_reject(REJECT_SHORT.format(name="regional_rachel"), "regional_rachel")),
          c("wage_watcher",
            "\u2206 Sorry, to explain: the point that $15 is above the median wage in some places, not just "
            "above the current minimum, changed my view. A single national number ignores that; I now support "
            "indexing to the local median instead.",
            bot_db3("regional_rachel")),
          key="win18"),
        c("labor_lou",
          "Automation will replace minimum-wage jobs anyway, so raising it just speeds that up.",
          c("wage_watcher",
            "Automation is coming regardless of wages. I don't think that's a reason to keep people poor.",
            c("labor_lou", "It's a reason to think about what the wage does to the timing, at least.")),
          key="lose18"),
    ]))

# 19. Comments listed in shuffled order (children before parents); an orphan whose parent is not in the
#     dump, with a reply of its own (both dropped and recorded).
THREADS.append(thread(
    "scratchcard_sal", "CMV: State lotteries are a tax on the poor and should be banned",
    "Lottery tickets are bought disproportionately by low-income people, the expected return is about 50 "
    "cents on the dollar, and states advertise them heavily in poor neighbourhoods. It's a regressive tax that "
    "people pay voluntarily because they've been sold a fantasy.\n\nI think states should get out of the "
    "lottery business.",
    [
        c("expected_value_ed",
          "If states ban lotteries, people don't stop gambling. They go to illegal numbers games, which is what "
          "lotteries replaced in the first place, or to offshore online gambling with no consumer protection "
          "and no revenue for schools.\n\nThe regressive part is real, but the fix is regulation: cap "
          "advertising, stop marketing near check-cashing stores, fund addiction programs. A ban gives the "
          "whole market back to people with no rules at all.",
          c("scratchcard_sal",
            "I forgot the numbers racket is literally why states started lotteries. A ban just hands that "
            "back to illegal operators. Regulation it is. \u2206",
            bot_old("expected_value_ed")),
          key="win19"),
        c("jackpot_jill",
          "People enjoy it. Two dollars for a day of daydreaming is a fair price.",
          c("scratchcard_sal",
            "For someone buying one ticket a month, sure. The problem is the people buying twenty a week.",
            c("jackpot_jill", "Those people exist, but you'd ban it for everyone because of them?")),
          key="lose19"),
        c("lost_thread_lee",
          "Replying to a comment that isn't in this dump.",
          c("reply_to_lost", "And a reply to that."),
          parent="t1_zz99zzz", key="orphan19"),
    ],
    shuffle=True))

# 20. No deltas at all: a debate the OP never conceded (negative thread).
THREADS.append(thread(
    "feed_fatigue", "CMV: Social media has done more harm than good to society",
    "Since smartphones and social media became universal around 2012, rates of anxiety and depression among "
    "teenagers have risen sharply. Misinformation spreads faster than corrections, and political "
    "polarisation has deepened.\n\nThe benefits (staying in touch, organising) are real but small compared to "
    "the damage. I think on balance social media has been bad for society.",
    [
        c("network_nell",
          "The teen mental health data is contested: the effect sizes in the big datasets are about the same as "
          "the effect of eating potatoes. Correlation at the population level isn't causation.",
          c("feed_fatigue",
            "The potato comparison gets thrown around a lot, but the experimental studies where people quit "
            "social media for a few weeks show real improvements in wellbeing.",
            c("network_nell",
              "Some do, some don't, and the effects fade. I'm not saying there's no harm, just that \"more harm "
              "than good\" needs a lot more than what we have.",
              c("feed_fatigue",
                "I agree the evidence isn't conclusive, but I think the balance of it still points toward harm.")))),
        c("arab_spring_ally",
          "Social media let people in authoritarian countries organise and document abuses. That's enormous.",
          c("feed_fatigue",
            "And the same tools were then used by those governments to track and arrest the organisers.",
            c("arab_spring_ally", "Both things are true. I'd still rather have the tools than not."))),
        c("scroll_sam", "It's a tool. Tools aren't good or bad."),
    ]))

# 21. A thread with no comments at all.
THREADS.append(thread(
    "ink_and_office", "CMV: Visible tattoos should be completely acceptable in every profession",
    "About a third of adults under 40 have a tattoo. Rules against visible tattoos at work are a leftover from "
    "when tattoos signalled something about your background. A surgeon with a sleeve is no less skilled.\n\n"
    "I think no employer should be able to require covering tattoos, except where hygiene requires it.",
    []))

# 22. A DB3 confirmation that escapes the underscores in the recipient's name.
THREADS.append(thread(
    "plot_twist_paula", "CMV: Spoilers don't actually ruin stories",
    "There's a well-known study where people who read a spoiler before a short story enjoyed it *more* than "
    "those who didn't. A good story is good on a re-read, so knowing the ending can't be what makes it good.\n\n"
    "I think people massively overreact to spoilers.",
    [
        c("deep_thinker_42",
          "That study used classic short stories, often with twist endings that were the point of the story "
          "as a puzzle. Later replications found the effect is small and doesn't hold for everyone: people who "
          "love suspense enjoy stories less when spoiled, and people who focus on craft enjoy them slightly "
          "more.\n\nSo \"spoilers don't ruin stories\" is true for some readers and false for others. The "
          "overreaction you see is from the second group, and it's not irrational for them.",
          c("plot_twist_paula",
            "So it's a difference between people, not a fact about stories. That makes the overreaction "
            "look a lot more reasonable. \u2206",
            bot_db3("deep_thinker_42", escape_name=True)),
          key="win22"),
        c("cliffhanger_carl",
          "The first watch only happens once. A spoiler takes that away permanently.",
          c("plot_twist_paula",
            "But the first watch isn't more valuable than the second, according to the study.",
            c("cliffhanger_carl", "For you. Some of us enjoy not knowing more than anything else about a story.")),
          key="lose22"),
    ]))

# 23. The OP replying to their own comment with a token, and a proper delta.
THREADS.append(thread(
    "dead_language_dan", "CMV: Learning Latin in school is a waste of time",
    "Latin is a dead language. No one speaks it, and the claimed benefits (better vocabulary, logical "
    "thinking) could be taught directly in English or maths class. Students should learn a living language "
    "they can actually use.",
    [
        c("dead_language_dan",
          "To add to my post: I took four years of it myself.",
          c("dead_language_dan", "And yes, I know, I'm giving myself a \u2206 for honesty.")),
        c("romance_roots",
          "For English speakers who go on to learn Spanish, French, Italian or Portuguese, Latin is a shortcut: "
          "the grammar and half the vocabulary carry over. Students who take Latin first often pick up a "
          "Romance language faster.\n\nAnd for medicine, law and biology, a large share of the technical "
          "vocabulary is Latin. It's not about speaking it, it's about decoding words you've never seen.",
          c("dead_language_dan",
            "The medical vocabulary thing is true, I used it all the time in anatomy. Maybe not a waste for "
            "students heading into those fields. \u2206",
            bot_old("romance_roots")),
          key="win23"),
        c("duolingo_dee",
          "Latin teaches you grammar in a way modern language classes skip.",
          c("dead_language_dan", "You can learn grammar with any language, though.",
            c("duolingo_dee", "You can, but modern language classes mostly teach conversation, not grammar.")),
          key="lose23"),
    ]))

# 24. A top-level OP comment with a token (replying to the submission) is not a delta.
THREADS.append(thread(
    "remote_rosa", "CMV: Working from home should be the default for office jobs",
    "Commuting wastes hours a week, offices are expensive, and for most knowledge work the output is the "
    "same or better from home. Since 2020 companies have proven this works.\n\nI think remote should be the "
    "default, with the office as an option for people who want it.",
    [
        c("remote_rosa", "\u2206 to everyone who's replied so far, great discussion!"),
        c("mentor_mateo",
          "Remote work is great for experienced people who already know the job and have a network. It's much "
          "worse for new hires and junior staff, who learn most of their job by overhearing, asking quick "
          "questions and watching how seniors handle things. Studies of engineers found that juniors sitting "
          "near their team got much more feedback, and seniors paid for it in productivity.\n\nA remote default "
          "quietly shifts the cost onto the people at the start of their careers.",
          c("rosa_fan_club", "Great point."),
          c("remote_rosa",
            "I was generalising from my own experience as a senior person. The junior-staff point is a good "
            "reason for something hybrid, at least in the first years. \u2206",
            bot_db3("mentor_mateo")),
          key="win24"),
        c("cityscape_cleo",
          "Downtown businesses depend on office workers. Remote by default would hollow out cities.",
          c("remote_rosa",
            "Cities adapted before; offices can become housing.",
            c("cityscape_cleo", "Conversions are very expensive and slow. It's not a switch you flip.")),
          key="lose24"),
    ]))

# 25. A long thread: a deep winning branch plus two losing challengers the OP argued with.
THREADS.append(thread(
    "zoning_zed", "CMV: Single-family-only zoning should be abolished in US cities",
    "In most US cities it's illegal to build anything but a detached single-family house on the majority of "
    "residential land. That makes housing scarce and expensive, pushes people into long commutes, and has a "
    "documented history of being used to keep neighbourhoods racially and economically segregated.\n\nAllowing "
    "duplexes, triplexes and small apartment buildings everywhere would let cities grow gradually without "
    "bulldozing anything. I think single-family-only zoning should be abolished outright.",
    [
        c("setback_sid",
          "Abolishing it won't do much on its own. Minneapolis abolished single-family-only zoning in 2019 and "
          "only a handful of triplexes got built in the first years.",
          c("zoning_zed",
            "Isn't that just because it takes time? Builders need years to respond.",
            c("setback_sid",
              "Partly, but mostly because the other rules were still there: minimum lot sizes, parking "
              "requirements, height limits, setbacks. A triplex that needs six parking spaces on a 40-foot lot "
              "is legal on paper and impossible in practice.",
              c("zoning_zed",
                "So what would you change instead?",
                c("setback_sid",
                  "The whole package. The reform that's actually produced housing, in places like Houston "
                  "(small lot sizes) and Auckland (broad upzoning), changed lot sizes, parking and height "
                  "together. Abolishing the single-family label alone is mostly symbolic. It's a necessary "
                  "step, but if you stop there you get a headline and not many homes.",
                  c("zoning_zed",
                    "That's a much better framing than mine. I was treating the label as the whole problem; "
                    "it's one rule among several that all have to change together. \u2206",
                    bot_db3("setback_sid")),
                  key="win25"))))),
        c("porch_light_pru",
          "People bought homes expecting their neighbourhood to stay the way it was. Changing the rules "
          "afterwards is unfair to them.",
          c("zoning_zed",
            "No one is guaranteed that their neighbourhood never changes. And the rules themselves were "
            "imposed on earlier residents.",
            c("porch_light_pru",
              "Maybe, but a house is most people's biggest investment and they made it based on the rules.",
              c("zoning_zed",
                "Studies of upzoning generally find property values go up, not down, so owners aren't hurt.",
                c("porch_light_pru",
                  "Values aren't the only thing people care about. Traffic, shade, school crowding matter "
                  "too.")))),
          key="lose25a"),
        c("infrastructure_ike",
          "Sewers and schools in single-family areas were built for a certain density. Triple it and they "
          "fail.",
          c("zoning_zed",
            "Going from one house to three on some lots over decades is nowhere near tripling the density.",
            c("infrastructure_ike", "Some lots over decades, fine. But you said abolish outright.")),
          key="lose25b"),
    ]))

# 26. Video games as art: a second top-level comment by the winner; a non-OP confirmed delta.
THREADS.append(thread(
    "pixel_poet", "CMV: Video games can't be art in the way films and novels are",
    "A game is something you play to win. The player's choices get in the way of the author's vision: a film "
    "director controls every frame, but a game designer has to give up control to the player. That makes "
    "games closer to sports or puzzles than to art.\n\nSome games are beautiful, but beauty in the visuals is "
    "the art of the illustrators, not of the game as a game.",
    [
        c("ludonarrative_lena",
          "Giving up control *is* the art form. Theatre gives up control to actors; music to performers; "
          "architecture to the people who walk through a building. Nobody says a cathedral isn't art because "
          "people choose their own path through it.\n\nGames like *Papers, Please* make you feel complicity "
          "in a way a film can't, precisely because you made the choices. The interactivity isn't an obstacle "
          "to meaning, it's the medium that carries it.",
          c("pixel_poet",
            "The architecture comparison is good. And I did feel complicit playing *Papers, Please*, which "
            "no film about bureaucracy has done to me. \u2206",
            bot_old("ludonarrative_lena")),
          c("critic_in_residence",
            "Agree with this completely and I've argued the opposite for years. \u2206",
            bot_old("ludonarrative_lena")),
          key="win26"),
        c("high_score_hugo",
          "Most games are made to sell and to be fun. That's product design, not art.",
          c("pixel_poet",
            "That's sort of my point, though the same is true of most films.",
            c("high_score_hugo", "Right, and we don't call most films art either.")),
          key="lose26"),
    ]))

# 27. Running: a rewarded comment by a third user joining the challenger's branch.
THREADS.append(thread(
    "stride_steph", "CMV: Running is bad for your knees and people should do low-impact exercise instead",
    "Everyone knows a runner with bad knees. Pounding on pavement for years has to wear down cartilage. "
    "Swimming and cycling give the same cardio benefits without the impact, so I think people who care about "
    "their joints should avoid running.",
    [
        c("cadence_carlos",
          "Recreational runners actually have *lower* rates of knee osteoarthritis than sedentary people in the "
          "big cohort studies. The runners with bad knees you know are memorable; the ones with fine knees "
          "don't talk about their knees.",
          c("stride_steph",
            "Lower than sedentary people, maybe, but what about compared to cyclists?",
            c("physio_phoebe",
              "Cartilage is living tissue that adapts to load, like bone. Moderate impact keeps it healthy; "
              "no load at all (long bed rest, or sports with no impact) doesn't build it. That's one reason "
              "cyclists and swimmers have lower bone density than runners.\n\nThe risk rises with very high "
              "mileage and with existing injuries, not with running as such. For most people the choice "
              "isn't running versus cycling for their knees; it's whichever they'll actually keep doing.",
              c("stride_steph",
                "Cartilage adapting to load is the thing I didn't know. I was picturing it as something that "
                "only wears out. \u2206",
                bot_db3("physio_phoebe")),
              key="win27"))),
        c("spin_class_simon",
          "Running also has a higher injury rate than cycling overall. Shin splints, plantar fasciitis, IT band.",
          c("stride_steph", "Exactly, which is my point.",
            c("spin_class_simon", "Well, partly: most of those are overuse injuries from ramping up too fast.")),
          key="lose27"),
    ]))

# 28. Plastic straws; a comment by a user named like DeltaBot in another case is still DeltaBot.
THREADS.append(thread(
    "sip_skeptic", "CMV: Banning plastic straws is a pointless gesture",
    "Straws are a tiny fraction of ocean plastic, something like 0.03%. Most ocean plastic comes from fishing "
    "gear and from a handful of rivers in countries with poor waste management. Banning straws in US cities "
    "does nothing except annoy people, and it makes life harder for disabled people who need bendy straws.",
    [
        c("gateway_greta",
          "The straw ban was never meant to fix ocean plastic by itself. It's a low-cost first step that "
          "changes the default: bars and cafes learned to ask before handing out single-use items, and "
          "several cities went from straws to cups, lids, cutlery and bags within a few years. Policies that "
          "start small and visible make the bigger ones politically possible.\n\nThe disability point is real "
          "and most bans now exempt people who ask for a plastic straw.",
          c("sip_skeptic",
            "If it's a first step toward broader single-use rules, it isn't pointless, even if the straw part "
            "alone is tiny. \u2206",
            bot_db3("gateway_greta")),
          key="win28"),
        c("paper_straw_pete",
          "Paper straws are worse anyway. They go soggy and some contain PFAS chemicals.",
          c("sip_skeptic", "Which supports my point that the ban is pointless.",
            c("paper_straw_pete", "It supports *mine*: the replacement is bad, not that reducing plastic is.")),
          key="lose28"),
    ]))

# 29. Time zones: a DeltaBot confirmation naming someone other than the rewarded user (not a confirmation).
THREADS.append(thread(
    "utc_ursula", "CMV: The whole world should use UTC and abolish time zones",
    "Time zones cause endless confusion for international meetings, flights and software. If everyone used "
    "UTC, 9:00 would mean the same instant everywhere. People in New York would just start work at 14:00 "
    "instead of 9:00.\n\nIt sounds strange at first but it's just a number; we'd get used to it.",
    [
        c("sundial_sven",
          "You'd replace one conversion with another. Right now \"I'll call you at 9\" tells me you're calling "
          "in the morning wherever I am. Under UTC I'd have to know your longitude to know whether 14:00 is "
          "your morning or your evening; every \"what time is it there?\" becomes \"when is daytime there?\".\n\n"
          "And the date would change in the middle of the day for half the world. \"See you Tuesday\" in "
          "Sydney would mean the afternoon of one UTC date and the morning of the next.",
          c("utc_ursula",
            "The date changing mid-day is a problem I hadn't thought through at all. That would be worse "
            "than time zones for most people's daily lives. \u2206",
            bot_db3("sundial_sven")),
          key="win29"),
        c("chrono_chris",
          "Software already uses UTC internally. The problem is solved where it matters.",
          c("utc_ursula",
            "Internally, yes. But every calendar invite and flight time is still shown in local time, and "
            "people mess them up constantly.",
            c("chrono_chris",
              "That's a UI problem. You can fix it with better UI, not by changing every clock on Earth.",
              c("utc_ursula",
                "Nice try, that's a bit better. \u2206",
                c("DeltaBot",
                  "Confirmed: 1 delta awarded to /u/someone_else_entirely. ^[[History](/r/changemyview/wiki)]")))),
          key="lose29"),
    ]))

# 30. Metric system: a branch through a comment whose author deleted their account mid-branch.
THREADS.append(thread(
    "furlong_fred", "CMV: The US should switch to the metric system",
    "Every other major country uses metric. Converting between inches, feet, yards and miles is arbitrary, "
    "and the US already uses metric in science, medicine and the military. Two systems cause real errors: "
    "NASA lost the Mars Climate Orbiter over a units mix-up.\n\nI think the US should commit to a full switch "
    "on a fixed timeline, like Australia did in the 1970s.",
    [
        c("kilo_kate",
          "The hard part isn't people learning Celsius. It's the installed base: every road sign, every "
          "building code, every machine shop tool, every property survey in feet and acres. Australia switched "
          "when its economy and infrastructure were a fraction of the size.",
          c("furlong_fred",
            "The UK and Canada switched too, and they have plenty of infrastructure.",
            c("[deleted]", "[deleted]",
              c("furlong_fred",
                "Not sure what you said before deleting, but I'd point out both countries still use miles on "
                "roads.",
                c("kilo_kate",
                  "Which is exactly my point: both did a *partial* switch, and they live with two systems "
                  "decades later. The UK still sells beer in pints and measures roads in miles. A fixed-timeline "
                  "full switch has never happened in a country this size. What's realistic is what the US "
                  "already has, metric in science and industry, and letting everyday units fade as the "
                  "generations turn over.",
                  c("furlong_fred",
                    "I was holding up the UK and Canada as success stories, but they're really examples of the "
                    "partial switch you describe. I've changed my mind about a forced timeline. \u2206",
                    bot_old("kilo_kate")),
                  key="win30"))))),
        c("imperial_ivan",
          "Feet and inches are human-scaled. A foot is about a foot, a yard a stride.",
          c("furlong_fred", "A metre is also about a stride. That argument doesn't favour either system.",
            c("imperial_ivan", "Fahrenheit is human-scaled, though: 0 is very cold, 100 is very hot.")),
          key="lose30"),
    ]))


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


def _comment_obj(rng: random.Random, cid: str, parent_id: str, link_id: str, node: dict, created: float,
                 kid_ids: list[str]) -> dict[str, Any]:
    score = rng.randint(-2, 60)
    author = node["author"]
    return {
        "subreddit_id": SUBREDDIT_ID, "banned_by": None, "removal_reason": None, "link_id": link_id,
        "likes": None,
        "replies": {"kind": "Listing", "data": {"children": kid_ids}} if kid_ids else "",
        "user_reports": [], "saved": False, "id": cid, "gilded": 0, "archived": True, "report_reasons": None,
        "author": author, "parent_id": parent_id, "score": score, "approved_by": None, "controversiality": 0,
        "body": escape(node["body"]), "edited": False, "author_flair_css_class": None, "downs": 0,
        "stickied": False, "subreddit": "changemyview", "score_hidden": False, "name": "t1_" + cid,
        "created": created + 28800.0, "author_flair_text": _flair(rng, author), "created_utc": created,
        "distinguished": "moderator" if author == "DeltaBot" else None, "mod_reports": [], "num_reports": None,
        "ups": score,
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

    for extra in spec["extras"]:
        if extra[0] == "more":
            _, child_keys, where, count = extra
            parent_of_first = next(o["parent_id"] for o in objs if o["id"] == keyed[child_keys[0]])
            children = [keyed.get(k) or "d" + _b36(rng.randint(36**5, 36**6 - 1)) for k in child_keys]
            more = {"count": count, "parent_id": parent_of_first, "children": children,
                    "name": "t1_" + children[0], "id": children[0]}
            objs.insert(0, more) if where == "before" else objs.append(more)
        elif extra[0] == "stub":
            objs.append({"count": 0, "parent_id": "t1_" + keyed[extra[1]], "children": [], "name": "t1__",
                         "id": "_"})
    if spec["shuffle"]:
        rng.shuffle(objs)

    real = sum(1 for o in objs if "body" in o)
    score = rng.randint(5, 900)
    return {
        "domain": "self.changemyview", "banned_by": None, "media_embed": {}, "subreddit": "changemyview",
        "selftext_html": None, "selftext": escape(spec["selftext"]), "likes": None, "suggested_sort": None,
        "user_reports": [], "secure_media": None, "link_flair_text": None, "id": thread_id, "gilded": 0,
        "secure_media_embed": {}, "clicked": False, "report_reasons": None, "author": spec["author"],
        "media": None, "score": score, "approved_by": None, "over_18": False, "hidden": False,
        "num_comments": real, "thumbnail": "self", "subreddit_id": SUBREDDIT_ID, "hide_score": False,
        "edited": False, "link_flair_css_class": None, "author_flair_css_class": None, "downs": 0,
        "saved": False, "removal_reason": None, "stickied": False, "is_self": True,
        "permalink": f"/r/changemyview/comments/{thread_id}/", "name": link_id, "created": created + 28800.0,
        "url": f"https://www.reddit.com/r/changemyview/comments/{thread_id}/", "author_flair_text": None,
        "quarantine": False, "title": escape(spec["title"]), "created_utc": created, "ups": score,
        "upvote_ratio": 0.87, "mod_reports": [], "visited": False, "num_reports": None, "distinguished": None,
        "comments": objs,
    }


def render() -> str:
    """The sample's text: one thread a line, newest first as in cmv_20161111.jsonlist."""
    rng = random.Random(20161111)
    lines = []
    for i, spec in enumerate(THREADS):
        lines.append(json.dumps(emit(i, spec, rng), ensure_ascii=False))
    return "\n".join(reversed(lines)) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the bundled sample is not what this writes")
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args()
    text = render()
    if args.check:
        same = Path(args.output).exists() and Path(args.output).read_text(encoding="utf-8") == text
        print("sample is up to date" if same else f"{args.output} is stale: rerun {Path(__file__).name}")
        return 0 if same else 1
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"wrote {len(THREADS)} threads to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
