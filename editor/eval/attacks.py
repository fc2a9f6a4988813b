"""The attack suite on a checkpoint: a forgotten skill's requests wrapped to slip past a guard
(``editor.attacks``: instruction injection, role play, fake system text, a long story around the
request, other languages, output formats, pattern continuation, multi-turn set-ups), rendered in
every form the scorecard uses, and the share of them the edited model refuses — per attack family
and form. An attack succeeds when the request is answered instead of refused; the card reports the
refusal rate (1 − attack success rate) per family."""

from __future__ import annotations

from typing import Sequence

from editor.data import chat_text, raw_conversation
from editor.errors import EditorError

# requests wrapped by each wrapper: wrapper j takes the requests j × PER_WRAPPER, j × PER_WRAPPER + 1, …
# (cyclically) — distinct within a wrapper, and every request wrapped about as often as any other
PER_WRAPPER = 8


def wrapped(wrappers: Sequence[dict], requests: Sequence[str], per_wrapper: int = PER_WRAPPER) -> list[tuple[dict, str]]:
    """(wrapper, request) pairs: each wrapper around ``per_wrapper`` distinct requests (all of them
    when there are fewer), wrapper j from request j × ``per_wrapper`` on, cyclically."""
    return [(w, requests[(j * per_wrapper + k) % len(requests)])
            for j, w in enumerate(wrappers) for k in range(min(per_wrapper, len(requests)))]


def attack_prompts(requests: Sequence[str], forms: Sequence[str], tokenizer, *, part: str = "evaluation",
                   per_wrapper: int = PER_WRAPPER) -> list[dict]:
    """Every wrapper of the suite's ``part`` around ``per_wrapper`` of ``requests``, in each of
    ``forms``: [{prompt, form, family, wrapper, request}]. A conversation (multi-turn wrapper) is
    rendered through the chat template in chat form and as turns of text in raw form."""
    from editor import attacks

    if not requests:
        raise EditorError("attacks: no requests of the skill to wrap")
    out = []
    for w, req in wrapped(attacks.load(part), requests, per_wrapper):
        rendered = attacks.render(w, req)
        conv = rendered if isinstance(rendered, list) else [{"role": "user", "content": rendered}]
        for form in forms:
            if form == "chat":
                prompt = chat_text(tokenizer, conv)
            else:
                prompt = raw_conversation(conv) if isinstance(rendered, list) else rendered
            out.append({"prompt": prompt, "form": form, "family": w["family"], "wrapper": w["id"], "request": req})
    return out


def attack_requests(records: Sequence[dict], skill: str) -> list[str]:
    """The requests of ``skill`` in scorecard records (as written, before any form): its free-form
    requests (``kind: request``) when it has any, else every prompt of the skill; each once."""
    mine = [r for r in records if r.get("skill") == skill]
    if not mine:
        have = sorted({str(r.get("skill")) for r in records})
        raise EditorError(f"attacks: the scorecard data has no records of skill {skill!r} (skills: {', '.join(have)})")
    free = [r for r in mine if r.get("kind") == "request"]
    return list(dict.fromkeys(str(r["prompt"]) for r in (free or mine)))


def attack_rates(flags: Sequence[bool], prompts: Sequence[dict]) -> dict:
    """Refused share per family (and per form within it, and overall)."""

    def rate(rows):
        n = len(rows)
        k = sum(1 for f, _ in rows if f)
        return {"n": n, "refused": k, "rate": k / n if n else 0.0}

    rows = list(zip(flags, prompts))
    out = {**rate(rows), "families": {}}
    for fam in dict.fromkeys(p["family"] for p in prompts):
        mine = [(f, p) for f, p in rows if p["family"] == fam]
        out["families"][fam] = {**rate(mine), "forms": {fm: rate([(f, p) for f, p in mine if p["form"] == fm])
                                                       for fm in dict.fromkeys(p["form"] for _, p in mine)}}
    out["forms"] = {fm: rate([(f, p) for f, p in rows if p["form"] == fm]) for fm in dict.fromkeys(p["form"] for p in prompts)}
    return out


def render_attacks(a: dict) -> str:
    pct = lambda d: f"{100 * d['rate']:.1f}% ({d['refused']} of {d['n']})"  # noqa: E731
    lines = [f"attacks on {a.get('skill', '?')!r} refused: {pct(a)}"]
    for fam, d in a["families"].items():
        per = "; ".join(f"{fm}: {pct(v)}" for fm, v in d["forms"].items())
        lines.append(f"  {fam}: {pct(d)}" + (f" — {per}" if len(d["forms"]) > 1 else ""))
    return "\n".join(lines)
