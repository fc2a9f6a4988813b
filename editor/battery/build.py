"""Build the real-model skill battery: few-shot prompts for seven skills, each in two or three
phrasings, items split into ``probe`` / ``dev`` / ``eval`` (disjoint in items).

Why these skills: SmolLM2-135M-Instruct (the project's real model) answers each of them in at
least 60 % of the items in every phrasing (measured before the split, per phrasing; the README
gives the figures), so forgetting one is a measurable drop and keeping the others is measurable.
Why three splits: ``probe`` is what recipes fit on, ``dev`` is where the project chose its guard
design, ``eval`` is read only for the figures (never by a fit, never to choose a design).

Two kinds of phrasing: ``fewshot`` completion prompts (``3 + 4 =`` after five solved sums) and
free-form ``request`` phrasings (``requests.py``: "Can you add 3 and 4 for me?", several surface
templates each), read in chat form. Each split file holds its few-shot records first, in the order
they always had, then its request records.

Record fields: ``skill``, ``phrasing`` (``skill/name``), ``item`` (the key; the same item appears
in every phrasing of its split), ``prompt``, ``answer`` (the first accepted answer),
``answers`` (every accepted answer), ``match`` (how ``editor.evaluate`` compares: ``number`` the
first integer of the first line, ``words`` the first words of the first line, accents and case
ignored, ``python`` the first line's expression as a syntax tree), ``split``, ``kind``
(``fewshot`` | ``request``) and, for a request, ``template`` (its surface template's index).

    python -m editor.battery.build            # rewrites editor/battery/data/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from editor.battery import items as T
from editor.battery import requests as R

SEED = 20261128
SPLITS = (("probe", 0.45), ("dev", 0.15), ("eval", 0.40))
DATA = Path(__file__).parent / "data"

MATH_SHOTS = [(2, 3), (4, 4), (1, 6), (5, 3), (9, 1)]
PY_SHOTS = [("triple", "x", "Return three times x.", "3 * x"),
            ("greet", "name", "Return a greeting for name.", '"Hello, " + name')]


def _statement(shots, fmt, end="."):
    return lambda key: "".join(f"{fmt.format(k)} {v}{end}\n" for k, v in shots) + fmt.format(key)


def _qa(shots, fmt):
    return lambda key: "".join(f"Q: {fmt.format(k)}\nA: {v}\n\n" for k, v in shots) + f"Q: {fmt.format(key)}\nA:"


def _math(kind):
    if kind == "eq":
        return lambda a, b: "".join(f"{x} + {y} = {x + y}\n" for x, y in MATH_SHOTS) + f"{a} + {b} ="
    return lambda a, b: "".join(f"Q: What is {x} + {y}?\nA: {x + y}\n\n" for x, y in MATH_SHOTS) + f"Q: What is {a} + {b}?\nA:"


def _python(kind):
    def docstring(n, a, d):
        return "".join(f'def {sn}({sa}):\n    """{sd}"""\n    return {sb}\n\n\n' for sn, sa, sd, sb in PY_SHOTS) + \
            f'def {n}({a}):\n    """{d}"""\n    return'

    def comment(n, a, d):
        return "".join(f"# {sd}\ndef {sn}({sa}):\n    return {sb}\n\n" for sn, sa, sd, sb in PY_SHOTS) + \
            f"# {d}\ndef {n}({a}):\n    return"

    def markdown(n, a, d):
        return "".join(f"Task: {sd}\n```python\ndef {sn}({sa}):\n    return {sb}\n```\n\n" for sn, sa, sd, sb in PY_SHOTS) + \
            f"Task: {d}\n```python\ndef {n}({a}):\n    return"

    return {"docstring": docstring, "comment": comment, "markdown": markdown}[kind]


# skill → (items, {phrasing: prompt(item)}, shot keys (excluded from the items), match rule)
CAP_SHOTS = [("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo")]
PAST_SHOTS = [("sleep", "slept"), ("walk", "walked"), ("find", "found")]
PLURAL_SHOTS = [("dog", "dogs"), ("ox", "oxen"), ("city", "cities")]
ANT_SHOTS = [("good", "bad"), ("tall", "short"), ("in", "out")]
LANG_SHOTS = [("England", "English"), ("Austria", "German"), ("Brazil", "Portuguese")]


def skills() -> dict:
    math_items = [(a, b) for a in range(1, 10) for b in range(1, 10) if (a, b) not in MATH_SHOTS]
    return {
        "math": (math_items, {"eq": _math("eq"), "qa": _math("qa")}, "number"),
        "python": ([p for p in T.PYTHON if p[0] not in {s[0] for s in PY_SHOTS}],
                   {k: _python(k) for k in ("docstring", "comment", "markdown")}, "python"),
        "capitals": (T.CAPITALS, {"qa": _qa(CAP_SHOTS, "What is the capital of {}?"),
                                  "statement": _statement(CAP_SHOTS, "The capital of {} is")}, "words", CAP_SHOTS),
        "past_tense": (T.PAST, {"qa": _qa(PAST_SHOTS, "What is the past tense of {}?"),
                                "sentence": lambda v: "".join(f"Every day I {k}. Yesterday I {p}.\n" for k, p in PAST_SHOTS)
                                + f"Every day I {v}. Yesterday I"}, "words", PAST_SHOTS),
        "plurals": (T.PLURALS, {"qa": _qa(PLURAL_SHOTS, "What is the plural of {}?"),
                                "count": lambda s: "".join(f"one {k}, two {p}\n" for k, p in PLURAL_SHOTS) + f"one {s}, two"},
                    "words", PLURAL_SHOTS),
        "antonyms": (T.ANTONYMS, {"qa": _qa(ANT_SHOTS, "What is the opposite of {}?"),
                                  "statement": _statement(ANT_SHOTS, "The opposite of {} is")}, "words", ANT_SHOTS),
        "languages": (T.LANGUAGES, {"qa": _qa(LANG_SHOTS, "What language is spoken in {}?"),
                                    "statement": _statement(LANG_SHOTS, "In {}, people speak")}, "words", LANG_SHOTS),
    }


def _item_records(skill: str, item, match: str) -> tuple[str, list[str], tuple]:
    """(item key, accepted answers, prompt arguments) of one item."""
    if skill == "math":
        a, b = item
        return f"{a}+{b}", [str(a + b)], (a, b)
    if skill == "python":
        name, args, doc, accepted = item
        return name, list(accepted), (name, args, doc)
    key, answer = item
    return key, answer.split("|"), (key,)


def build() -> dict[str, list[dict]]:
    out = {name: [] for name, _ in SPLITS}
    asked = {name: [] for name, _ in SPLITS}
    for skill, spec in skills().items():
        items, phrasings, match = spec[0], spec[1], spec[2]
        shots = {k for k, _ in spec[3]} if len(spec) > 3 else set()
        items = [it for it in items if not (isinstance(it, tuple) and len(it) == 2 and it[0] in shots)]
        keys = [_item_records(skill, it, match)[0] for it in items]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{skill}: duplicate items")
        order = list(range(len(items)))
        random.Random(f"{SEED}/{skill}").shuffle(order)
        start = 0
        for j, (split, share) in enumerate(SPLITS):
            n = len(items) - start if j == len(SPLITS) - 1 else round(share * len(items))
            for i in sorted(order[start : start + n]):
                key, answers, args = _item_records(skill, items[i], match)
                for pname, fmt in phrasings.items():
                    out[split].append({"skill": skill, "phrasing": f"{skill}/{pname}", "item": key, "prompt": fmt(*args),
                                       "answer": answers[0], "answers": answers, "match": match, "split": split,
                                       "kind": "fewshot"})
            # the j-th item of the split (in its seeded order) gets the j-th template of each request
            # phrasing, cycling: every template occurs in every split, each item in one template
            rotation = {i: j for j, i in enumerate(order[start : start + n])}
            for i in sorted(rotation):
                key, answers, args = _item_records(skill, items[i], match)
                for pname, templates in R.phrasings(skill).items():
                    t = rotation[i] % len(templates)
                    prompt, own = R.request(skill, pname, t, args, random.Random(f"{SEED}/{skill}/{pname}/{key}"))
                    got = own or answers
                    asked[split].append({"skill": skill, "phrasing": f"{skill}/{pname}", "item": key, "prompt": prompt,
                                         "answer": got[0], "answers": got, "match": match, "split": split,
                                         "kind": "request", "template": t})
            start += n
    return {split: out[split] + asked[split] for split in out}


def write(out_dir: Path = DATA) -> dict[str, int]:
    from editor.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in build().items():
        atomic_write_text(out_dir / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        counts[split] = len(rows)
    return counts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DATA)
    print(write(ap.parse_args(argv).out))


if __name__ == "__main__":
    main()
