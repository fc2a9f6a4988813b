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
    together; greedy unless ``do_sample`` (seeded with ``seed``). ``bar``: a progress bar advanced
    by each batch's rows."""
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
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    texts: List[str] = [""] * len(prompts)
    abst: List[bool] = [False] * len(prompts)
    try:
        if do_sample:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
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


def score(model, tokenizer, examples: Iterable[dict], batch_size: int = 32,
          max_new_tokens: Optional[int] = None, *, progress: bool = False, desc: str = "scoring") -> dict:
    """Accuracy and abstention rate per skill and per phrasing.

    ``examples``: dicts with ``prompt`` and ``answer`` (optional ``answers``: every accepted
    answer; ``match``: the rule of ``matches``; ``skill``, ``phrasing``). ``max_new_tokens``
    defaults, per skill, to its longest accepted answer's token count + 4. ``progress``: a
    progress bar over the prompts (stderr)."""
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
        budgets = [need[e.get("skill", "all")] for e in examples]
    preds: List[str] = [""] * len(examples)
    abst: List[bool] = [False] * len(examples)
    with _progress(progress, len(examples), desc) as bar:
        for budget in sorted(set(budgets)):
            idx = [i for i, b in enumerate(budgets) if b == budget]
            p, a = generate_answers(model, tokenizer, [examples[i]["prompt"] for i in idx], batch_size=batch_size,
                                    max_new_tokens=budget, bar=bar)
            for j, i in enumerate(idx):
                preds[i], abst[i] = p[j], a[j]

    records = []
    for i, e in enumerate(examples):
        skill = e.get("skill", "all")
        records.append({
            "prompt": e["prompt"], "answer": str(e["answer"]), "prediction": preds[i],
            "abstained": abst[i],
            "correct": (not abst[i]) and matches(preds[i], [str(a) for a in e.get("answers") or [e["answer"]]],
                                                 e.get("match", "exact")),
            "skill": skill, "phrasing": e.get("phrasing", skill)})
    skills: Dict[str, list] = {}
    phrasings: Dict[str, list] = {}
    for r in records:
        skills.setdefault(r["skill"], []).append(r)
        phrasings.setdefault(r["phrasing"], []).append(r)
    return {
        "overall": _rates(records),
        "skills": {s: _rates(rows) for s, rows in sorted(skills.items())},
        "phrasings": {p: {"skill": rows[0]["skill"], **_rates(rows)} for p, rows in sorted(phrasings.items())},
        "records": records,
    }


# categories of ordinary prompts reported on their own line, outside the headline rate: a guard
# that forgets Python may fairly hesitate on other programming languages, and the reader should
# see that apart from stories, chat and questions
SEPARATE_CATEGORIES = ("code_other",)


def refusals(model, tokenizer, texts: Sequence[str], categories: Sequence[str] | None = None, *,
             batch_size: int = 32, max_new_tokens: int = 8, progress: bool = False) -> dict:
    """How many ordinary prompts ``model`` refuses (its ``generate`` reports ``abstained``): the
    headline rate over every category but ``SEPARATE_CATEGORIES``, and the count per category."""
    if not texts:
        raise ValueError("refusals() needs at least one prompt")
    with _progress(progress, len(texts), "ordinary prompts") as bar:
        _, abst = generate_answers(model, tokenizer, list(texts), batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   bar=bar)
    cats = list(categories) if categories is not None else ["all"] * len(texts)
    per: Dict[str, Dict[str, int]] = {}
    for a, c in zip(abst, cats):
        d = per.setdefault(str(c), {"n": 0, "refused": 0})
        d["n"] += 1
        d["refused"] += int(a)
    head = [d for c, d in per.items() if c not in SEPARATE_CATEGORIES]
    n, k = sum(d["n"] for d in head), sum(d["refused"] for d in head)
    return {"n": n, "refused": k, "rate": (k / n) if n else 0.0,
            "categories": {c: {**d, "rate": d["refused"] / d["n"]} for c, d in sorted(per.items())},
            "separate": [c for c in SEPARATE_CATEGORIES if c in per]}


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


def load_records(path) -> list[dict]:
    """Scorecard records from a JSONL file: each needs ``prompt`` and ``answer`` (``skill`` optional)."""
    p = Path(path)
    if not p.exists():
        raise EditorError(f"eval data not found: {p}")
    out = []
    with p.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise EditorError(f"{p.name} line {i} is not valid JSON") from None
            for k in ("prompt", "answer"):
                if k not in rec:
                    raise EditorError(f"{p.name} line {i}: record has no field {k!r}")
            out.append(rec)
    if not out:
        raise EditorError(f"{p.name}: no records")
    return out


def ordinary_categories(records: Sequence[dict]) -> list[str]:
    """Each ordinary prompt's ``category`` (``all`` where a record has none)."""
    return [str(r.get("category", "all")) if isinstance(r, dict) else "all" for r in records]


def scorecard(before_model, after_model, tokenizer, records: list[dict], *, batch_size: int = 32,
              max_new_tokens: int | None = None, before: dict | None = None, ordinary=None,
              ordinary_new_tokens: int = 8, progress: bool = False) -> dict:
    """Score both models on ``records``; ``before`` may be passed pre-computed. ``ordinary``: a text
    set (``texts``, ``records`` with ``category``, ``info``) of ordinary prompts that no
    calibration read: the card reports how many of them the edited model refuses."""
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    b = before if before is not None else score(before_model, tokenizer, records, desc="scoring base", **kw)
    a = score(after_model, tokenizer, records, desc="scoring edited", **kw)
    cmp = compare(b, a)
    card = {
        "n": len(records),
        "before": {s: {k: v for k, v in r.items()} for s, r in b["skills"].items()},
        "after": {s: {k: v for k, v in r.items()} for s, r in a["skills"].items()},
        "drop": {s: r["relative_drop"] for s, r in cmp.items()},
        "phrasings": {"before": b["phrasings"], "after": a["phrasings"]},
    }
    if ordinary is not None:
        card["ordinary"] = {"set": ordinary.info.get("source") or ordinary.name,
                            **refusals(after_model, tokenizer, ordinary.texts, ordinary_categories(ordinary.records),
                                       batch_size=batch_size, max_new_tokens=ordinary_new_tokens,
                                       progress=progress)}
    return card


def render_refusals(o: dict) -> str:
    """One line per headline rate and per separate category."""
    pct = lambda k, n: f"{100 * k / n:.1f}% ({k} of {n})" if n else "n/a"  # noqa: E731
    lines = [f"ordinary prompts refused: {pct(o['refused'], o['n'])} — held out from the calibration"]
    for c in o.get("separate", []):
        d = o["categories"][c]
        lines.append(f"  {c} (reported apart): {pct(d['refused'], d['n'])}")
    return "\n".join(lines)


def render_scorecard(card: dict) -> str:
    table = format_table({"skills": card["before"]}, {"skills": card["after"]})
    return table + ("\n" + render_refusals(card["ordinary"]) if card.get("ordinary") else "")


def load_ordinary(spec: str):
    """``--ordinary``: 'default' (the shipped prompts' evaluation part), 'none' (None) or a JSONL
    file whose records carry ``text`` (and optionally ``category``)."""
    from editor.data import ORDINARY, TextSet, fingerprint, ordinary_set

    if spec == "none":
        return None
    if spec == "default":
        return ordinary_set("evaluation", ORDINARY)
    p = Path(spec)
    if not p.is_file():
        raise EditorError(f"--ordinary: no such file: {spec} (or 'default' / 'none')")
    records = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise EditorError(f"--ordinary: {p.name} line {i} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise EditorError(f"--ordinary: {p.name} line {i}: a record needs a 'text' string")
        records.append(rec)
    if not records:
        raise EditorError(f"--ordinary: {p.name} holds no records")
    texts = [r["text"] for r in records]
    return TextSet(p.stem, texts, records, {"source": p.name, "texts": len(texts), "fingerprint": fingerprint(texts)})


def _load_error(what: str, e: Exception) -> EditorError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return EditorError(f"cannot load {what}: {first}")


def evaluate_checkpoint(checkpoint, data, *, base: str | None = None, batch_size: int = 32,
                        max_new_tokens: int | None = None, limit: int | None = None, ordinary: str = "default",
                        ordinary_new_tokens: int = 8, trust_remote_code: bool = False, progress: bool = False) -> dict:
    """Scorecard of an exported checkpoint against its own base model, and the share of ordinary
    prompts (``load_ordinary``) the checkpoint refuses.

    For a skill-editor checkpoint the "before" model is the checkpoint with its patches removed
    (the neuron permutation does not change the function), so no separate base is needed; for a
    plain checkpoint (pruning baseline) ``base`` names the base model directory.

    No code shipped with a checkpoint runs unless ``trust_remote_code``: a patched checkpoint whose
    shipped runtime is byte-identical to this tool's is scored with the tool's own runtime class
    (the same code, never imported from the checkpoint); one whose shipped code differs is refused —
    with ``trust_remote_code`` its own code is run (``AutoModelForCausalLM``) and the "before" model
    is ``restore``'s exact base. Tokenizers and plain models load with ``trust_remote_code`` off
    (never a ``[y/N]`` prompt) unless it is given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.checkpoint import restore, shipped_code_differs, verified
    from editor.patch import remove_patches
    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    records = load_records(data)
    if limit:
        records = records[:limit]
    ordinary_prompts = load_ordinary(ordinary)
    refused = None
    ckpt = Path(checkpoint)
    if not (ckpt / CONFIG).exists():
        raise EditorError(f"{ckpt} is not a model directory (no {CONFIG})")
    try:
        cfg_json = json.loads((ckpt / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EditorError(f"cannot read {ckpt / CONFIG}: {e}") from None
    if not isinstance(cfg_json, dict):
        raise EditorError(f"{ckpt / CONFIG} is not a JSON object")
    verified(ckpt, plain_ok=True)  # every file's sha256 before anything is loaded, --trust-remote-code or not
    if base and Path(base).is_dir() and verified(base, "--base ", plain_ok=True).patched:
        raise EditorError(f"--base {base} is a skill-editor checkpoint (an edited model); --base takes a base model "
                          f"(`skill-editor restore` gives it back)")
    why = shipped_code_differs(ckpt, cfg_json)
    if why and not trust_remote_code:
        raise EditorError(f"{ckpt}: {why}; scoring it would run (or stand in for) code this tool does not ship — "
                          f"read it, then pass --trust-remote-code to run the checkpoint's own code")
    remote = bool(trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=remote)
    except (OSError, ValueError) as e:
        raise _load_error(f"the tokenizer of {ckpt}", e) from None
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)

    def refused_by(model):
        if ordinary_prompts is None:
            return None
        return refusals(model, tok, ordinary_prompts.texts, ordinary_categories(ordinary_prompts.records),
                        batch_size=batch_size, max_new_tokens=ordinary_new_tokens, progress=progress)

    with torch.inference_mode():
        if is_patched_config(cfg_json) and not why:
            # the tool's own runtime class: byte-identical to the shipped code, which is never imported
            try:
                model = SkillEditorForCausalLM.from_pretrained(str(ckpt)).eval()
            except (OSError, ValueError, RuntimeError) as e:
                raise _load_error(str(ckpt), e) from None
            after = score(model, tok, records, desc="scoring edited", **kw)
            refused = refused_by(model)
            remove_patches(model.model, model.config.skill_editor["arch"])
            before = score(model.model, tok, records, desc="scoring base", **kw)
        elif is_patched_config(cfg_json):
            # the user asked for the checkpoint's own (different) code; "before" is the exact base
            import tempfile

            try:
                model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True).eval()
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise _load_error(str(ckpt), e) from None
            after = score(model, tok, records, desc="scoring edited", **kw)
            refused = refused_by(model)
            del model
            with tempfile.TemporaryDirectory(prefix=".skill-editor-eval-") as tmp:
                restored = restore(ckpt, Path(tmp) / "base", verify_first=False)
                base_model = AutoModelForCausalLM.from_pretrained(str(restored), trust_remote_code=False).eval()
                before = score(base_model, tok, records, desc="scoring base", **kw)
        else:
            if not base:
                raise EditorError("a plain checkpoint has no patches to remove: pass --base BASE_MODEL_DIR for the 'before' column")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=remote).eval()
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise _load_error(str(ckpt), e) from None
            after = score(model, tok, records, desc="scoring edited", **kw)
            refused = refused_by(model)
            del model
            try:
                base_model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=remote).eval()
            except (OSError, ValueError, RuntimeError, ImportError) as e:
                raise _load_error(f"the base model {base}", e) from None
            before = score(base_model, tok, records, desc="scoring base", **kw)
    cmp = compare(before, after)
    card = {
        "checkpoint": str(ckpt),
        "data": str(data),
        "n": len(records),
        "before": before["skills"],
        "after": after["skills"],
        "drop": {s: r["relative_drop"] for s, r in cmp.items()},
        "phrasings": {"before": before["phrasings"], "after": after["phrasings"]},
    }
    if refused is not None:
        card["ordinary"] = {"set": ordinary_prompts.info.get("source") or ordinary_prompts.name, **refused}
    return card
