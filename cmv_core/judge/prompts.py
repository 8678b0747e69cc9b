"""What the judge reads: the instructions, the answer forms, and the messages of each kind of call."""

from __future__ import annotations

from typing import Any

from cmv_core.judge.config import CRITERIA, LIKERT

CMV_INTRO = (
    "You evaluate replies on Reddit's r/ChangeMyView (CMV). There, the original poster (OP) states "
    "a view and their reasons, and others reply to try to change it; the OP awards a delta to a "
    "reply that changed their view, at least in part. Your own opinion on the topic does not matter."
)

SINGLE_INSTRUCTIONS = (
    "You will see the OP's post, possibly earlier turns of the discussion, and one reply to "
    "evaluate. Rate the reply as a reply to this OP on each criterion from 1 (worst) to 7 (best), "
    "using the whole scale. Length alone is not a merit.\n\n{rubric}\n\n"
    "First write a short rationale (at most three sentences), then the scores. Answer with only a "
    "JSON object of this form: {shape}"
)
PAIRWISE_INSTRUCTIONS = (
    "You will see the OP's post, possibly earlier turns of the discussion, and two replies, A and B. "
    "Decide which reply is more likely to change this OP's view (to earn a delta from this OP). "
    "Weigh mainly persuasiveness to this OP: engaging the OP's own reasons, offering arguments or "
    "evidence the OP has not considered; relevance, civility and fluency count only as far as they "
    "affect that. The order in which the replies are shown and their length are not reasons to "
    'prefer one. Answer "tie" only if neither is more persuasive.\n\n'
    "First write a short rationale (at most three sentences). Answer with only a JSON object of "
    "this form: {shape}"
)
CALIBRATION_INSTRUCTIONS = (
    "You will see the OP's post and two replies, A and B, both written by people in this thread. "
    "Exactly one of them changed the OP's view and earned a delta. Decide which one. The order in "
    "which the replies are shown and their length are not reasons to prefer one.\n\n"
    "First write a short rationale (at most three sentences). Answer with only a JSON object of "
    "this form: {shape}"
)


def single_form(criteria: list[str]) -> dict[str, list]:
    return {c: list(LIKERT) for c in criteria}


PAIRWISE_FORM = {"winner": ["A", "B", "tie"]}
CALIBRATION_FORM = {"winner": ["A", "B"]}


def form_shape(form: dict[str, list]) -> str:
    parts = ['"rationale": "<short rationale>"']
    for name, allowed in form.items():
        if isinstance(allowed[0], int):
            parts.append(f'"{name}": <integer {allowed[0]}-{allowed[-1]}>')
        else:
            parts.append(f'"{name}": ' + " | ".join(f'"{a}"' for a in allowed))
    return "{" + ", ".join(parts) + "}"


def json_schema(form: dict[str, list]) -> dict:
    props: dict[str, Any] = {"rationale": {"type": "string"}}
    for name, allowed in form.items():
        props[name] = {"type": "integer" if isinstance(allowed[0], int) else "string", "enum": allowed}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _cut(text: str, max_chars: int) -> str:
    text = (text or "").strip()
    if len(text) <= max_chars:
        return text
    return text[:max_chars].rstrip() + " [...cut]"


def render_context(prompt_messages: list[dict], max_chars: int) -> str:
    """The OP's post and any earlier turns, as the judge reads them (system prompts dropped)."""
    turns = [m for m in prompt_messages if m.get("role") != "system"]
    if not turns:
        return "## Original post by the OP\n(empty)"
    parts = ["## Original post by the OP\n" + _cut(turns[0]["content"], max_chars)]
    if len(turns) > 1:
        parts.append("## Earlier turns in this discussion")
        for m in turns[1:]:
            who = "OP" if m["role"] == "user" else "Challenger"
            parts.append(f"[{who}]: {_cut(m['content'], max_chars)}")
    return "\n\n".join(parts)


def single_messages(prompt_messages: list[dict], reply: str, criteria: list[str], max_chars: int) -> list[dict]:
    rubric = "\n".join(f"- {c}: {CRITERIA[c]}" for c in criteria)
    system = CMV_INTRO + "\n\n" + SINGLE_INSTRUCTIONS.format(rubric=rubric, shape=form_shape(single_form(criteria)))
    user = render_context(prompt_messages, max_chars) + "\n\n## Reply to evaluate\n" + _cut(reply, max_chars)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def two_reply_messages(
    instructions: str, form: dict, prompt_messages: list[dict], first: str, second: str, max_chars: int
) -> list[dict]:
    system = CMV_INTRO + "\n\n" + instructions.format(shape=form_shape(form))
    user = (
        render_context(prompt_messages, max_chars)
        + "\n\n## Reply A\n"
        + _cut(first, max_chars)
        + "\n\n## Reply B\n"
        + _cut(second, max_chars)
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def reask(messages: list[dict], raw: str, error: str, attempt: int, form: dict) -> list[dict]:
    """The follow-up after an unusable answer: the judge sees it and what was wrong."""
    return list(messages) + [
        {"role": "assistant", "content": raw},
        # The attempt number keeps each re-ask (and its cache key) distinct from the last.
        {
            "role": "user",
            "content": f"Attempt {attempt} could not be used: {error}. Answer again "
            f"with only the JSON object, of this form: {form_shape(form)}",
        },
    ]
