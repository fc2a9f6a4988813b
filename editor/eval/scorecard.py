"""The forget/retain scorecard: exact match and abstention per skill, before vs after, relative
drop ``1 − after/before``, for any causal LM + tokenizer (the embedded testbed and the recipes'
``evaluate`` sets alike).

``score`` runs batched greedy generation with left padding, decodes only the new tokens, takes
the answer as the text up to the first newline / EOS, stripped, and compares it with the
record's accepted answers (``answers``, else ``answer``) under the record's ``match`` rule
(``matches``: ``exact`` by default; ``number``, ``words``, ``python`` for the real-model
battery). Abstention: an edited model's ``generate`` output may carry a boolean tensor
``abstained`` of shape [batch]; those rows count as wrong *and* as abstained. ``refusals`` runs
the same generation over ordinary prompts and reports the share refused (false refusals).

Result of ``score``::

    {"overall":   {"n", "exact_match", "abstained"},
     "skills":    {skill: {"n", "exact_match", "abstained"}},
     "phrasings": {phrasing: {"skill", "n", "exact_match", "abstained"}},
     "records":   [{"prompt", "answer", "prediction", "correct", "abstained",
                    "skill", "phrasing"}, ...]}      # in the input order

Rates are fractions in [0, 1]. ``scorecard`` compares two models (the run's before / after),
``evaluate_checkpoint`` an exported checkpoint against its own base model.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from editor.errors import EditorError
from editor.eval.attacks import attack_rates, render_attacks
from editor.heap import length_batches
from editor.manifest import CONFIG, is_patched_config
from editor.model.tokens import eos_ids, pad_id


def extract_answer(text: str) -> str:
    """The answer part of a generated continuation: up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


MATCH_RULES = ("exact", "number", "words", "python")


def _words(text: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.findall(r"[a-z0-9]+", plain)


def _syntax(text: str) -> str | None:
    try:
        return ast.dump(ast.parse(text.strip(), mode="eval"))
    except (SyntaxError, ValueError):
        return None


def matches(answer: str, accepted: Sequence[str], rule: str = "exact") -> bool:
    """Whether an extracted answer (the continuation's first line) is correct under ``rule``:
    ``exact`` equals an accepted answer (stripped); ``number`` its first integer equals one;
    ``words`` its first words are an accepted answer's words (case, accents and punctuation
    ignored: "Mexico City." answers "Mexico City"); ``python`` its expression, a trailing comment
    dropped, has the syntax tree of an accepted one (parsed, never executed: "x*2" answers "x * 2",
    "2 * x" does not)."""
    if rule == "exact":
        return any(answer == a.strip() for a in accepted)
    if rule == "number":
        m = re.search(r"-?\d+", answer)
        return bool(m) and any(m.group() == a.strip() for a in accepted)
    if rule == "words":
        got = _words(answer)
        return any((w := _words(a)) and got[: len(w)] == w for a in accepted)
    if rule == "python":
        got = _syntax(answer.split("#", 1)[0])
        return got is not None and any(got == _syntax(a) for a in accepted)
    raise ValueError(f"unknown match rule {rule!r} (one of {', '.join(MATCH_RULES)})")


# a chat reply (or a free-form request's continuation) is a sentence or a code block, not a bare answer:
# it is matched by ``matches_reply`` over its first lines, given this many tokens beyond the answer's
REPLY_TOKENS = {"python": 56}
REPLY_TOKENS_DEFAULT = 28
REPLY_LINES = 4
_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _reply_lines(reply: str) -> list[str]:
    return [line.strip() for line in reply.splitlines() if line.strip()][:REPLY_LINES]


def _expressions(reply: str) -> list[str]:
    """Candidate Python expressions of a reply: what a ``return`` gives, inline code spans, lines
    that are an expression, a one-line ``lambda``'s body."""
    out = []
    for line in reply.splitlines():
        t = line.split("#", 1)[0].strip().strip("`").strip()
        if not t:
            continue
        if t.startswith("return "):
            out.append(t[len("return "):])
        elif t.startswith(">>> "):
            out.append(t[4:])
        elif "lambda" in t and ":" in t:
            out.append(t.rsplit(":", 1)[1])
        else:
            out.append(t)
        out.extend(re.findall(r"`([^`\n]+)`", line))
    return [e.strip().rstrip(";").strip() for e in out]


def matches_reply(reply: str, accepted: Sequence[str], rule: str = "exact", item: str | None = None) -> bool:
    """Whether a reply — a chat answer or a free-form request's continuation, a sentence or a code
    block — answers correctly under ``rule``, read over its first ``REPLY_LINES`` non-empty lines:
    ``number`` some line's last number equals an accepted one ("3 + 4 = 7", "The sum is 7."); ``words``
    an accepted answer's words occur in order ("The capital of France is Paris."), after dropping the
    first occurrence of the asked ``item``'s words (so "The plural of sheep is sheeps" does not answer
    "sheep"); ``python`` an expression of the reply (a ``return``, an inline code span, an expression
    line) has the syntax tree of an accepted one; ``exact`` some line equals an accepted answer."""
    lines = _reply_lines(reply)
    if rule == "exact":
        return any(line == a.strip() for line in lines for a in accepted)
    if rule == "number":
        want = {_number(a.strip()) for a in accepted} - {None}
        for line in lines:
            found = _NUMBER.findall(line)
            if found and _number(found[-1]) in want:
                return True
        return False
    if rule == "words":
        got = _words(" ".join(lines))
        key = _words(item or "")
        if key:
            for i in range(len(got) - len(key) + 1):
                if got[i : i + len(key)] == key:
                    got = got[:i] + got[i + len(key):]
                    break
        for a in accepted:
            w = _words(a)
            if w and any(got[i : i + len(w)] == w for i in range(len(got) - len(w) + 1)):
                return True
        return False
    if rule == "python":
        want = {_syntax(a) for a in accepted} - {None}
        return any(_syntax(e) in want for e in _expressions(reply))
    raise ValueError(f"unknown match rule {rule!r} (one of {', '.join(MATCH_RULES)})")


def reads_reply(example: dict) -> bool:
    """Whether an example's answer is a reply (``matches_reply``): a chat-form prompt, or a free-form
    request (``kind: request``); few-shot completions answer on their first line (``matches``)."""
    return example.get("form") == "chat" or example.get("kind") == "request"


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _rates(rows: Sequence[dict]) -> dict:
    n = len(rows)
    return {"n": n,
            "exact_match": (sum(r["correct"] for r in rows) / n) if n else 0.0,
            "abstained": (sum(r["abstained"] for r in rows) / n) if n else 0.0}


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 8,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                   stop: Sequence[str] = (), bar=None) -> tuple[list[str], list[bool]]:
    """The one batched generation of the evaluation package: continuations of ``prompts`` (new
    text only, cut at EOS; ``stop`` strings end a row's generation early) and whether each row
    abstained (the edited model's ``generate`` output carries ``abstained``; a plain model never
    abstains), both in the order of ``prompts``. Left padding, prompts of similar length batched
    together — at most ``batch_size`` rows and ``editor.heap.BATCH_TOKENS`` positions, the new tokens
    included (``length_batches``) — and run longest first; greedy unless ``do_sample``
    (seeded with ``seed``). ``bar``: a progress bar advanced by each batch's rows."""
    prompts = list(prompts)
    old_side = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    eos = eos_ids(tokenizer, model)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = dict(do_sample=do_sample, num_beams=1, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                  pad_token_id=pad_id(tokenizer, model), eos_token_id=eos or None)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop:
        kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
    device = model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    # batch prompts of similar length together; results go back to input order
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    texts: List[str] = [""] * len(prompts)
    abst: List[bool] = [False] * len(prompts)
    try:
        if do_sample:
            torch.manual_seed(seed)
        for idx in length_batches([n + max_new_tokens for n in lengths], batch_size):  # positions incl. the new tokens
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, **kwargs)
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            flags = None if isinstance(out, torch.Tensor) else getattr(out, "abstained", None)
            if flags is not None:
                flags = torch.as_tensor(flags).reshape(-1).bool().tolist()
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                for j, t in enumerate(toks):
                    if t in eos:
                        toks = toks[:j]
                        break
                texts[i] = tokenizer.decode(toks, skip_special_tokens=True)
                abst[i] = bool(flags[row]) if flags is not None else False
            if bar is not None:
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return texts, abst


def generate_answers(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32,
                     max_new_tokens: int = 8, bar=None) -> tuple[list[str], list[bool]]:
    """Greedy answers to ``prompts`` (``generate_texts`` cut at the first newline, stripped:
    ``extract_answer``) and whether each row abstained, in the order of ``prompts``."""
    texts, abst = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar)
    return [extract_answer(t) for t in texts], abst


@contextlib.contextmanager
def _progress(on: bool, total: int, desc: str):
    """A tqdm bar over ``total`` prompts on stderr (None when off); closed on the way out."""
    if not on:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="prompt", leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _summary(records: list[dict]) -> dict:
    """The rates of scored records: overall, per skill, per phrasing, and per form when the records
    carry forms (``raw`` / ``chat``)."""
    skills: Dict[str, list] = {}
    phrasings: Dict[str, list] = {}
    for r in records:
        skills.setdefault(r["skill"], []).append(r)
        phrasings.setdefault(r["phrasing"], []).append(r)
    out = {
        "overall": _rates(records),
        "skills": {s: _rates(rows) for s, rows in sorted(skills.items())},
        "phrasings": {p: {"skill": rows[0]["skill"], **_rates(rows)} for p, rows in sorted(phrasings.items())},
    }
    forms = list(dict.fromkeys(r["form"] for r in records if "form" in r))
    if forms:
        out["forms"] = {f: {k: v for k, v in _summary([{k2: v2 for k2, v2 in r.items() if k2 != "form"}
                                                         for r in records if r.get("form") == f]).items()}
                        for f in forms}
    return out


def score(model, tokenizer, examples: Iterable[dict], batch_size: int = 32,
          max_new_tokens: Optional[int] = None, *, progress: bool = False, desc: str = "scoring") -> dict:
    """Accuracy and abstention rate per skill and per phrasing (and per form).

    ``examples``: dicts with ``prompt`` and ``answer`` (optional ``answers``: every accepted
    answer; ``match``: the rule; ``skill``, ``phrasing``; ``form``: ``raw`` / ``chat`` — the form the
    prompt was rendered in; ``kind``: ``request`` for a free-form request). A few-shot completion
    answers on its first line (``matches``); a chat reply or a request's continuation is read over its
    first lines (``matches_reply``). ``max_new_tokens`` defaults, per skill, to its longest accepted
    answer's token count + 4 (+ ``REPLY_TOKENS`` for replies). ``progress``: a progress bar (stderr)."""
    examples = list(examples)
    if not examples:
        raise ValueError("score() needs at least one example")
    if max_new_tokens is not None:
        budgets = [max_new_tokens] * len(examples)
    else:  # per skill: its longest accepted answer + 4 (short-answer skills need not wait for code)
        need: Dict[str, int] = {}
        for e in examples:
            n = max(len(tokenizer(str(a), add_special_tokens=False)["input_ids"]) for a in (e.get("answers") or [e["answer"]]))
            need[e.get("skill", "all")] = max(need.get(e.get("skill", "all"), 0), n + 4)
        budgets = [need[e.get("skill", "all")] + (REPLY_TOKENS.get(e.get("match", "exact"), REPLY_TOKENS_DEFAULT)
                                                   if reads_reply(e) else 0) for e in examples]
    texts: List[str] = [""] * len(examples)
    abst: List[bool] = [False] * len(examples)
    with _progress(progress, len(examples), desc) as bar:
        for budget in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == budget]
            t, a = generate_texts(model, tokenizer, [examples[i]["prompt"] for i in idx], batch_size=batch_size,
                                  max_new_tokens=budget, bar=bar)
            for j, i in enumerate(idx):
                texts[i], abst[i] = t[j], a[j]

    records = []
    for i, e in enumerate(examples):
        accepted = [str(a) for a in e.get("answers") or [e["answer"]]]
        rule = e.get("match", "exact")
        if reads_reply(e):
            pred = texts[i].strip()
            ok = matches_reply(pred, accepted, rule, str(e["item"]) if rule == "words" and "item" in e else None)
        else:
            pred = extract_answer(texts[i])
            ok = matches(pred, accepted, rule)
        rec = {"prompt": e["prompt"], "answer": str(e["answer"]), "prediction": pred, "abstained": abst[i],
               "correct": (not abst[i]) and ok, "skill": e.get("skill", "all"),
               "phrasing": e.get("phrasing", e.get("skill", "all"))}
        if "form" in e:
            rec["form"] = e["form"]
        records.append(rec)
    return {**_summary(records), "records": records}


def decides_on_prompt(model) -> bool:
    """Whether ``model``'s only edit is a guard that decides on the prompt alone (key_space with
    ``check: prompt``, no Neuron Adjust): then its answer to a prompt is the refusal when its first
    forward call abstains and, otherwise, exactly the base model's — a scorecard needs one forward
    over the prompts (``guard_flags``) instead of a second generation."""
    edit = getattr(getattr(model, "config", None), "skill_editor", None) or {}
    ks = edit.get("key_space") if isinstance(edit, dict) else None
    return bool(ks) and ks.get("check") == "prompt" and not edit.get("neuron_adjust")


def linear_guards(model) -> dict[int, object] | None:
    """{layer: ``KeyScore``} of an edited checkpoint class whose every guard is the pooled linear
    detector's share of a layer; None otherwise (a box, no guard, not the checkpoint class)."""
    from editor.model.arch import decoder_layers, spec_for
    from editor.runtime.modeling_skill_editor import KeyScore

    inner, guards = getattr(model, "model", None), getattr(model, "_guards", lambda: [])()
    if inner is None or not guards or not all(isinstance(g, KeyScore) for g in guards):
        return None
    spec = spec_for(inner.config)
    found = {i: getattr(layer.get_submodule(spec.down), "key_space", None)
             for i, layer in enumerate(decoder_layers(inner, spec))}
    found = {i: g for i, g in found.items() if isinstance(g, KeyScore)}
    return found if len(found) == len(guards) else None


def pooled_guard_flags(model, tokenizer, prompts: Sequence[str], guards: dict, *, batch_size: int = 32,
                       bar=None) -> list[bool]:
    """``guard_flags`` of the pooled linear detector from shared-prefix forwards of the decoder stack
    (``editor.profile.prefix``): each layer's key max-pooled over the whole prompt, scored by that
    layer's ``KeyScore.pooled_score`` and summed in layer order, as the runtime's first forward call
    does (``guard_decision``: abstain when the sum is > 0). Prompts that begin alike — a chat
    template's turn, a few-shot template, an attack's wrapper — read their beginning once."""
    from editor.model.arch import spec_for
    from editor.model.tokens import pad_id
    from editor.profile.prefix import pooled_by_prefix

    prompts = list(prompts)
    if not prompts:
        return []
    inner = model.model
    ids = [list(x) for x in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    if any(not x for x in ids):
        raise EditorError("a prompt tokenizes to nothing")
    layers = sorted(guards)
    shares = torch.zeros(len(prompts), len(layers), dtype=torch.float32)
    column = {i: c for c, i in enumerate(layers)}

    def sink(i: int, rows: torch.Tensor, pooled: torch.Tensor) -> None:
        if i in column:
            shares[rows, column[i]] = guards[i].pooled_score(pooled).reshape(-1).cpu()

    old = [g.enabled for g in guards.values()]
    try:
        for g in guards.values():
            g.enabled = False  # the hook reads the keys; the guards' own per-call test would be wasted work
        pooled_by_prefix(inner, spec_for(inner.config), ids, sink, batch_size=batch_size, pad=pad_id(tokenizer, inner),
                         on_rows=bar.update if bar is not None else None)
    finally:
        for g, e in zip(guards.values(), old):
            g.enabled = e
    score = shares[:, 0]
    for c in range(1, len(layers)):
        score = score + shares[:, c]
    return (score > 0).tolist()


@torch.no_grad()
def guard_flags(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, bar=None) -> list[bool]:
    """Whether ``model`` (an edited checkpoint class) abstains on each prompt, from one forward call
    over the prompt — the call in which ``generate`` takes a ``check: prompt`` decision, with the same
    left padding and position ids; only the last position's logits are computed. Batches of similar
    length, at most ``batch_size`` rows and ``editor.heap.BATCH_TOKENS`` positions, run longest first
    (``editor.heap.length_batches``). The pooled linear detector's decisions come from shared-prefix
    forwards instead (``pooled_guard_flags``): the same keys, the common beginnings read once."""
    guards = linear_guards(model)
    if guards is not None:
        return pooled_guard_flags(model, tokenizer, prompts, guards, batch_size=batch_size, bar=bar)
    prompts = list(prompts)
    old_side = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = model_device(model)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    flags = [False] * len(prompts)
    try:
        for idx in length_batches(lengths, batch_size):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
            mask = enc["attention_mask"].to(device)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=mask, position_ids=pos, logits_to_keep=1,
                        use_cache=False)
            got = getattr(out, "abstained", None)
            row = [False] * len(idx) if got is None else torch.as_tensor(got).reshape(-1).bool().tolist()
            for j, i in enumerate(idx):
                flags[i] = row[j]
            if bar is not None:
                bar.update(len(idx))
    finally:
        tokenizer.padding_side = old_side
    return flags


def with_flags(before: dict, flags: Sequence[bool], refusal: str) -> dict:
    """A ``score`` result of the edited model from the base model's (``before``) and the guard's
    decision on each prompt (``guard_flags``): refused records abstained and wrong, with the refusal
    as their prediction; every other record the base model's answer as it was."""
    records = [dict(r, abstained=True, correct=False, prediction=refusal) if f else dict(r)
               for r, f in zip(before["records"], flags)]
    return {**_summary(records), "records": records}


def refusal_of(model) -> str:
    return str(((getattr(model.config, "skill_editor", None) or {}).get("key_space") or {}).get("refusal", ""))


def score_by_guard(model, tokenizer, before: dict, *, batch_size: int = 32, progress: bool = False,
                   desc: str = "scoring edited") -> dict:
    """``score`` of a model that ``decides_on_prompt``, from the base model's ``score`` result and one
    forward over its prompts (``with_flags``)."""
    recs = before["records"]
    with _progress(progress, len(recs), desc) as bar:
        flags = guard_flags(model, tokenizer, [r["prompt"] for r in recs], batch_size=batch_size, bar=bar)
    return with_flags(before, flags, refusal_of(model))


def contrast_categories() -> tuple[str, ...]:
    """The ordinary prompts' near-neighbour contrast categories (``editor.ordinary``): prompts that
    look like a forgotten skill but are not it — reported on their own line, outside the headline
    rate, so the reader sees both how much ordinary text and how much look-alike text is refused."""
    from editor.ordinary import CONTRAST_CATEGORIES

    return CONTRAST_CATEGORIES


def _refusal_counts(abst: Sequence[bool], cats: Sequence[str]) -> dict:
    per: Dict[str, Dict[str, int]] = {}
    for a, c in zip(abst, cats):
        d = per.setdefault(str(c), {"n": 0, "refused": 0})
        d["n"] += 1
        d["refused"] += int(a)
    contrast = contrast_categories()
    head = [d for c, d in per.items() if c not in contrast]
    near = [d for c, d in per.items() if c in contrast]
    n, k = sum(d["n"] for d in head), sum(d["refused"] for d in head)
    out = {"n": n, "refused": k, "rate": (k / n) if n else 0.0,
           "categories": {c: {**d, "rate": d["refused"] / d["n"]} for c, d in sorted(per.items())},
           "separate": [c for c in contrast if c in per]}
    if near:
        nn, nk = sum(d["n"] for d in near), sum(d["refused"] for d in near)
        out["contrast"] = {"n": nn, "refused": nk, "rate": nk / nn}
    return out


def prompt_flags(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 8,
                 bar=None) -> list[bool]:
    """Whether ``model`` refuses each prompt: one forward over the prompt for a model that
    ``decides_on_prompt``, else its generation's abstention flags (``max_new_tokens`` tokens, so
    ``check: every_call`` tests a few generated tokens too)."""
    if decides_on_prompt(model):
        return guard_flags(model, tokenizer, prompts, batch_size=batch_size, bar=bar)
    _, abst = generate_texts(model, tokenizer, list(prompts), batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar)
    return abst


def refusals(model, tokenizer, texts: Sequence[str], categories: Sequence[str] | None = None, *,
             forms: Sequence[str] | None = None, batch_size: int = 32, max_new_tokens: int = 8,
             progress: bool = False) -> dict:
    """How many ordinary prompts ``model`` refuses: the headline rate over every category but the
    near-neighbour contrast ones (``contrast_categories``), the contrast rate on its own, the count
    per category, and the same per form (``forms``: the form of each text)."""
    if not texts:
        raise ValueError("refusals() needs at least one prompt")
    with _progress(progress, len(texts), "ordinary prompts") as bar:
        abst = prompt_flags(model, tokenizer, list(texts), batch_size=batch_size, max_new_tokens=max_new_tokens, bar=bar)
    cats = [str(c) for c in categories] if categories is not None else ["all"] * len(texts)
    out = _refusal_counts(abst, cats)
    if forms is not None and len(set(forms)) > 1:
        out["forms"] = {f: _refusal_counts([a for a, g in zip(abst, forms) if g == f], [c for c, g in zip(cats, forms) if g == f])
                        for f in dict.fromkeys(forms)}
    return out


def _skill_map(result: dict) -> Dict[str, dict]:
    """Accept a full ``score`` result or its ``skills`` mapping."""
    return result["skills"] if "skills" in result else result


def compare(before: dict, after: dict) -> dict:
    """Per skill: before / after exact match and relative drop ``1 - after/before``
    (0.0 when ``before`` is 0), plus the abstention rates."""
    b, a = _skill_map(before), _skill_map(after)
    out = {}
    for skill in sorted(set(b) | set(a)):
        eb = b.get(skill, {}).get("exact_match", 0.0)
        ea = a.get(skill, {}).get("exact_match", 0.0)
        out[skill] = {
            "before": eb, "after": ea,
            "relative_drop": (1.0 - ea / eb) if eb > 0 else 0.0,
            "abstained_before": b.get(skill, {}).get("abstained", 0.0),
            "abstained_after": a.get(skill, {}).get("abstained", 0.0),
            "n": a.get(skill, b.get(skill, {})).get("n", 0),
        }
    return out


def _render(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(result: dict, after: Optional[dict] = None, by: str = "skills") -> str:
    """Plain-text table.

    * ``format_table(score_result)``: n, exact match, abstained per skill
      (``by="phrasings"`` for the per-phrasing breakdown);
    * ``format_table(before, after)``: before / after / relative drop per skill;
    * ``format_table(compare(before, after))``: the same from a comparison."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    if after is not None:
        result = compare(before=result, after=after)
    first = next(iter(result.values()), None) if result else None
    if isinstance(first, dict) and "relative_drop" in first:
        header = ["skill", "n", "before", "after", "rel. drop", "abstained"]
        rows = [[s, str(r["n"]), pct(r["before"]), pct(r["after"]), pct(r["relative_drop"]),
                 pct(r["abstained_after"])] for s, r in result.items()]
        return _render(header, rows)
    table = result[by] if by in result else result
    header = ["skill" if by == "skills" else "phrasing", "n", "exact match", "abstained"]
    rows = [[k, str(r["n"]), pct(r["exact_match"]), pct(r["abstained"])] for k, r in table.items()]
    if "overall" in result and by in result:
        o = result["overall"]
        rows.append(["overall", str(o["n"]), pct(o["exact_match"]), pct(o["abstained"])])
    return _render(header, rows)


# ---------------------------------------------------------------------------------------------
# the scorecard of a run and of an exported checkpoint
# ---------------------------------------------------------------------------------------------


def scorecard_records(path) -> list[dict]:
    """``eval --data``: scorecard records from a JSONL file (``editor.io.read_jsonl``), checked by
    the validator ``run`` uses (``editor.data.check_scorecard_records``)."""
    from editor.data import check_scorecard_records
    from editor.io import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise EditorError(f"--data: no such file: {p}")
    records, lines = read_jsonl(p, "--data")
    if not records:
        raise EditorError(f"--data: {p.name} holds no records")
    check_scorecard_records(records, [f"{p.name} line {n}" for n in lines], "--data")
    return records


def ordinary_categories(records: Sequence[dict]) -> list[str]:
    """Each ordinary prompt's ``category`` (``all`` where a record has none)."""
    return [str(r.get("category", "all")) if isinstance(r, dict) else "all" for r in records]


def examples_of(ts) -> list[dict]:
    """Scorecard examples of a text set (``editor.data.TextSet``) of records with ``prompt``: each
    record with its prompt as the set renders it (the template, the chat form) and its form."""
    return [dict(r, prompt=t, form=ts.form_of(i)) if ts.forms is not None else dict(r, prompt=t)
            for i, (t, r) in enumerate(zip(ts.texts, ts.records))]


def _card_part(b: dict, a: dict) -> dict:
    cmp = compare(b, a)
    return {"before": {s: dict(r) for s, r in b["skills"].items()}, "after": {s: dict(r) for s, r in a["skills"].items()},
            "drop": {s: r["relative_drop"] for s, r in cmp.items()}}


def scorecard(before_model, after_model, tokenizer, records: list[dict], *, batch_size: int = 32,
              max_new_tokens: int | None = None, before: dict | None = None, ordinary=None,
              ordinary_new_tokens: int = 8, attacks: dict | None = None, progress: bool = False) -> dict:
    """Score both models on ``records`` (``examples_of``: prompts as rendered, with their form);
    ``before`` may be passed pre-computed. An edited model that ``decides_on_prompt`` is scored from
    the base answers and one forward over the prompts (``score_by_guard``). ``ordinary``: a text set
    (``texts``, ``records`` with ``category``, ``forms``, ``info``) of ordinary prompts that no
    calibration read: the card reports how many of them the edited model refuses. ``attacks``:
    {skill, prompts} (``editor.eval.attacks.attack_prompts``): the share of attacked requests the
    edited model refuses, per family and form. With more than one form, the card has the same
    figures per form (``forms``)."""
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    b = before if before is not None else score(before_model, tokenizer, records, desc="scoring base", **kw)
    if decides_on_prompt(after_model):
        a = score_by_guard(after_model, tokenizer, b, batch_size=batch_size, progress=progress)
    else:
        a = score(after_model, tokenizer, records, desc="scoring edited", **kw)
    card = {"n": len(records), **_card_part(b, a), "phrasings": {"before": b["phrasings"], "after": a["phrasings"]}}
    if len(b.get("forms") or {}) > 1:
        card["forms"] = {f: {**_card_part(b["forms"][f], a["forms"][f]), "n": b["forms"][f]["overall"]["n"],
                             "phrasings": {"before": b["forms"][f]["phrasings"], "after": a["forms"][f]["phrasings"]}}
                         for f in b["forms"]}
    if ordinary is not None:
        card["ordinary"] = {"set": ordinary.info.get("source") or ordinary.name,
                            **refusals(after_model, tokenizer, ordinary.texts, ordinary_categories(ordinary.records),
                                       forms=ordinary.forms, batch_size=batch_size, max_new_tokens=ordinary_new_tokens,
                                       progress=progress)}
    if attacks is not None:
        card["attacks"] = attack_card(after_model, tokenizer, attacks, batch_size=batch_size,
                                      max_new_tokens=ordinary_new_tokens, progress=progress)
    return card


def attack_card(model, tokenizer, attacks: dict, *, batch_size: int = 32, max_new_tokens: int = 8,
                progress: bool = False) -> dict:
    """The attack section of a card: {skill, n, refused, rate, families, forms}."""
    prompts = attacks["prompts"]
    with _progress(progress, len(prompts), "attacks") as bar:
        flags = prompt_flags(model, tokenizer, [p["prompt"] for p in prompts], batch_size=batch_size,
                             max_new_tokens=max_new_tokens, bar=bar)
    return {"skill": attacks["skill"], "part": attacks.get("part", "evaluation"), **attack_rates(flags, prompts)}


def render_refusals(o: dict) -> str:
    """One line for the headline rate and one for the near-neighbour contrast (per form when there are
    several), then one per contrast category."""
    pct = lambda k, n: f"{100 * k / n:.1f}% ({k} of {n})" if n else "n/a"  # noqa: E731
    forms = o.get("forms") or {}
    per = lambda key: "; ".join(f"{f}: {pct(v[key]['refused'], v[key]['n']) if key != 'head' else pct(v['refused'], v['n'])}"  # noqa: E731
                               for f, v in forms.items() if key == "head" or key in v)
    head = pct(o["refused"], o["n"]) + (f" — {per('head')}" if forms else "")
    lines = [f"ordinary prompts refused: {head} — held out from the calibration"]
    if o.get("contrast"):
        c = o["contrast"]
        lines.append(f"near-neighbour contrast refused: {pct(c['refused'], c['n'])}" + (f" — {per('contrast')}" if forms else ""))
    for c in o.get("separate", []):
        d = o["categories"][c]
        lines.append(f"  {c}: {pct(d['refused'], d['n'])}")
    return "\n".join(lines)


def render_scorecard(card: dict) -> str:
    parts = []
    forms = card.get("forms") or {}
    if forms:
        for f, part in forms.items():
            parts.append(f"[{f} form]\n" + format_table({"skills": part["before"]}, {"skills": part["after"]}))
    else:
        parts.append(format_table({"skills": card["before"]}, {"skills": card["after"]}))
    if card.get("ordinary"):
        parts.append(render_refusals(card["ordinary"]))
    if card.get("attacks"):
        parts.append(render_attacks(card["attacks"]))
    return "\n".join(parts)


def load_ordinary(spec: str):
    """``--ordinary``: 'default' (the shipped prompts' evaluation part), 'none' (None) or a JSONL
    file whose records carry ``text`` (and optionally ``category``)."""
    from editor.data import ORDINARY, TextSet, fingerprint, ordinary_set
    from editor.io import read_jsonl

    if spec == "none":
        return None
    if spec == "default":
        return ordinary_set("evaluation", ORDINARY)
    p = Path(spec)
    if not p.is_file():
        raise EditorError(f"--ordinary: no such file: {spec} (or 'default' / 'none')")
    records, lines = read_jsonl(p, "--ordinary")
    for rec, n in zip(records, lines):
        if not isinstance(rec.get("text"), str):
            raise EditorError(f"--ordinary: {p.name} line {n}: a record needs a 'text' string")
    if not records:
        raise EditorError(f"--ordinary: {p.name} holds no records")
    texts = [r["text"] for r in records]
    return TextSet(p.stem, texts, records, {"source": p.name, "texts": len(texts), "fingerprint": fingerprint(texts)},
                   [f"{p.name} line {n}" for n in lines])


def _load_error(what: str, e: Exception) -> EditorError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EditorError(f"cannot load {what}: {first}")


def checkpoint_models(checkpoint, *, base: str | None = None, trust_remote_code: bool = False):
    """The edited model of an exported checkpoint, then its own base model: yields
    ``("after", model, tokenizer)`` and then ``("before", model, tokenizer)`` (the caller scores
    each before asking for the next: the two never sit in memory together). The one way the
    evaluation package loads a checkpoint (the scorecard and the benchmarks alike).

    For a skill-editor checkpoint the "before" model is the checkpoint with its patches removed
    (the neuron permutation does not change the function), so no separate base is needed; for a
    plain checkpoint (pruning baseline) ``base`` names the base model directory.

    No code shipped with a checkpoint runs unless ``trust_remote_code``: a patched checkpoint whose
    shipped runtime is byte-identical to this tool's is loaded with the tool's own runtime class
    (the same code, never imported from the checkpoint); one whose shipped code differs is refused —
    with ``trust_remote_code`` its own code is run (``AutoModelForCausalLM``) and the "before" model
    is ``restore``'s exact base. Tokenizers and plain models load with ``trust_remote_code`` off
    (never a ``[y/N]`` prompt) unless it is given. Everything that can be refused without weights
    is refused before the first ``next``.
    """
    ckpt = Path(checkpoint)
    if not (ckpt / CONFIG).exists():
        raise EditorError(f"{ckpt} is not a model directory (no {CONFIG})")
    try:
        cfg_json = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EditorError(f"cannot read {ckpt / CONFIG}: {e}") from None
    if not isinstance(cfg_json, dict):
        raise EditorError(f"{ckpt / CONFIG} is not a JSON object")
    from editor.checkpoint import shipped_code_differs, verified

    verified(ckpt, plain_ok=True)  # every file's sha256 before anything is loaded, --trust-remote-code or not
    if base and Path(base).is_dir() and verified(base, "--base ", plain_ok=True).patched:
        raise EditorError(f"--base {base} is a skill-editor checkpoint (an edited model); --base takes a base model "
                          f"(`skill-editor restore` gives it back)")
    why = shipped_code_differs(ckpt, cfg_json)
    if why and not trust_remote_code:
        raise EditorError(f"{ckpt}: {why}; scoring it would run (or stand in for) code this tool does not ship — "
                          f"read it, then pass --trust-remote-code to run the checkpoint's own code")
    if not is_patched_config(cfg_json) and not base:
        raise EditorError("a plain checkpoint has no patches to remove: pass --base BASE_MODEL_DIR for the 'before' column")
    return _checkpoint_models(ckpt, cfg_json, why, base, bool(trust_remote_code))


def _checkpoint_models(ckpt: Path, cfg_json: dict, why, base, remote: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.checkpoint import restore
    from editor.patch import remove_patches
    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    def load(cls, path, what, **kw):
        try:
            return cls.from_pretrained(str(path), **kw).eval()
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise _load_error(what, e) from None

    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=remote)
    except (OSError, ValueError) as e:
        raise _load_error(f"the tokenizer of {ckpt}", e) from None
    if is_patched_config(cfg_json) and not why:
        # the tool's own runtime class: byte-identical to the shipped code, which is never imported
        model = load(SkillEditorForCausalLM, ckpt, str(ckpt))
        yield "after", model, tok
        remove_patches(model.model, model.config.skill_editor["arch"])
        yield "before", model.model, tok
    elif is_patched_config(cfg_json):
        # the user asked for the checkpoint's own (different) code; "before" is the exact base
        import tempfile

        model = load(AutoModelForCausalLM, ckpt, str(ckpt), trust_remote_code=True)
        yield "after", model, tok
        del model
        with tempfile.TemporaryDirectory(prefix=".skill-editor-eval-") as tmp:
            restored = restore(ckpt, Path(tmp) / "base", verify_first=False)
            yield "before", load(AutoModelForCausalLM, restored, str(restored), trust_remote_code=False), tok
    else:
        model = load(AutoModelForCausalLM, ckpt, str(ckpt), trust_remote_code=remote)
        yield "after", model, tok
        del model
        yield "before", load(AutoModelForCausalLM, base, f"the base model {base}", trust_remote_code=remote), tok


def evaluate_checkpoint(checkpoint, data, *, base: str | None = None, batch_size: int = 32,
                        max_new_tokens: int | None = None, limit: int | None = None, ordinary: str = "default",
                        ordinary_new_tokens: int = 8, trust_remote_code: bool = False, progress: bool = False,
                        format: str = "auto", attacks: str | None = None) -> dict:
    """Scorecard of an exported checkpoint against its own base model (``checkpoint_models``), and
    the share of ordinary prompts (``load_ordinary``) the checkpoint refuses — each in the forms of
    ``format`` (``auto``: raw and chat when the tokenizer has a chat template). ``attacks``: a skill
    of ``data`` whose requests are wrapped in the shipped attack suite (``editor.eval.attacks``). A
    guard that decides on the prompt is scored from the base answers and its decision on each
    prompt (``with_flags``)."""
    from editor.data import fingerprint, in_forms, resolve_format
    from editor.eval.attacks import attack_prompts, attack_requests

    records = scorecard_records(data)
    if limit:
        records = records[:limit]
    requests = attack_requests(records, attacks) if attacks else None
    ordinary_prompts = load_ordinary(ordinary)
    models = checkpoint_models(checkpoint, base=base, trust_remote_code=trust_remote_code)
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    refused = attacked = flags = after = None
    with torch.inference_mode():
        _, model, tok = next(models)
        forms = resolve_format(format, tok, "--format")
        prompts = [str(r["prompt"]) for r in records]
        examples = examples_of(in_forms(Path(data).stem, prompts, records, {"fingerprint": fingerprint(prompts)}, forms, tok))
        if decides_on_prompt(model):
            with _progress(progress, len(examples), "scoring edited") as bar:
                flags = guard_flags(model, tok, [e["prompt"] for e in examples], batch_size=batch_size, bar=bar)
            refusal = refusal_of(model)
        else:
            after = score(model, tok, examples, desc="scoring edited", **kw)
        if ordinary_prompts is not None:
            ordinary_prompts = in_forms(ordinary_prompts.name, ordinary_prompts.texts, ordinary_prompts.records,
                                        ordinary_prompts.info, forms, tok)
            refused = refusals(model, tok, ordinary_prompts.texts, ordinary_categories(ordinary_prompts.records),
                               forms=ordinary_prompts.forms, batch_size=batch_size, max_new_tokens=ordinary_new_tokens,
                               progress=progress)
        if requests is not None:
            attacked = attack_card(model, tok, {"skill": attacks, "prompts": attack_prompts(requests, forms, tok)},
                                   batch_size=batch_size, max_new_tokens=ordinary_new_tokens, progress=progress)
        del model
        _, model, tok = next(models)
        before = score(model, tok, examples, desc="scoring base", **kw)
        del model
        models.close()
    if after is None:
        after = with_flags(before, flags, refusal)
    card = {
        "checkpoint": str(Path(checkpoint)),
        "data": str(data),
        "n": len(examples),
        **_card_part(before, after),
        "phrasings": {"before": before["phrasings"], "after": after["phrasings"]},
    }
    if len(before.get("forms") or {}) > 1:
        card["forms"] = {f: {**_card_part(before["forms"][f], after["forms"][f]), "n": before["forms"][f]["overall"]["n"],
                             "phrasings": {"before": before["forms"][f]["phrasings"], "after": after["forms"][f]["phrasings"]}}
                         for f in before["forms"]}
    if refused is not None:
        card["ordinary"] = {"set": ordinary_prompts.info.get("source") or ordinary_prompts.name, **refused}
    if attacked is not None:
        card["attacks"] = attacked
    return card
