"""What the paper reports and how our numbers sit beside it (DESIGN §10): the benchmarks it scores
(each one lm-evaluation-harness task, ``editor.eval.lmeval`` runs them), its table of relative
performance, and the relative report — performance after the edit over before (what the paper
plots) and the drop ``1 − after / before``. Pure data and arithmetic: no model, no harness."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from editor.errors import EditorError

MLQA_LANGUAGES = ("en", "de", "es", "ar", "hi", "vi", "zh")


@dataclass(frozen=True)
class Benchmark:
    """One of the paper's benchmarks as an lm-evaluation-harness task: the task (or group) name,
    the per-document metric and filter whose mean is the benchmark's score, and the few-shot count
    (None: the task's own)."""

    task: str
    metric: str
    filter: str = "none"
    num_fewshot: int | None = None
    code: bool = False  # the task executes model-written programs


# The paper's settings in the harness. GSM8K: 8-shot chain of thought with Wei et al.'s exemplars
# (the recipes' KSD queries are this very prompt); the number is the last one of the answer
# (``flexible-extract``; ``strict-match`` wants "The answer is N."). MBPP: Austin et al.'s task
# prompt, zero-shot — the recipes probe with it — and pass@1 by running the program against the
# task's asserts (evaluate's code_eval). MMLU: 5-shot, the answer letter by log-likelihood. MLQA:
# context / question / answer, MLQA's official F1 (the paper counts an answer containing the gold
# span; the harness's F1 is the published metric of the data set).
BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("gsm8k_cot", "exact_match", "flexible-extract"),
    "mbpp": Benchmark("mbpp", "pass_at_1", num_fewshot=0, code=True),
    "mmlu": Benchmark("mmlu", "acc", num_fewshot=5),
    **{f"mlqa-{lang}": Benchmark(f"mlqa_{lang}_{lang}", "f1") for lang in MLQA_LANGUAGES},
}

# DESIGN §10: performance relative to the original model, read from the paper's figures (±0.005).
# Key: (model, forgotten benchmark, method) → {benchmark: after / before}; "≈0" is 0.0.
PAPER_RESULTS: dict[tuple[str, str, str], dict[str, float]] = {}
_T = {
    ("gsm8k", "na"): {"gemma-2b": (0.32, 0.98, 0.98), "llama-2-7b": (0.20, 0.92, 0.89), "llama-3-8b": (0.39, 0.76, 0.96), "llama-3-70b": (0.35, 0.74, 0.95)},
    ("gsm8k", "ksd"): {"gemma-2b": (0.12, 0.99, 1.00), "llama-2-7b": (0.19, 0.99, 1.00), "llama-3-8b": (0.16, 1.00, 1.00), "llama-3-70b": (0.17, 0.99, 1.00)},
    ("mbpp", "na"): {"gemma-2b": (0.0, 0.80, 1.00), "llama-2-7b": (0.04, 0.75, 1.00), "llama-3-8b": (0.01, 0.68, 0.94), "llama-3-70b": (0.02, 0.59, 0.96)},
    ("mbpp", "ksd"): {"gemma-2b": (0.0, 0.91, 1.00), "llama-2-7b": (0.0, 0.94, 1.00), "llama-3-8b": (0.01, 0.96, 1.00), "llama-3-70b": (0.0, 0.96, 1.00)},
}
for (_forget, _method), _by_model in _T.items():
    _names = ("gsm8k", "mbpp", "mmlu") if _forget == "gsm8k" else ("mbpp", "gsm8k", "mmlu")
    for _model, _vals in _by_model.items():
        PAPER_RESULTS[(_model, _forget, _method)] = dict(zip(_names, _vals))
del _T


def benchmarks(names: str | Iterable[str]) -> list[str]:
    """The benchmark names of ``--benchmark`` (comma-separated), checked, in order, once each."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = list(dict.fromkeys(n.strip() for n in items if n and n.strip()))
    if not items:
        raise EditorError("--benchmark: name at least one benchmark")
    for n in items:
        if n not in BENCHMARKS:
            raise EditorError(f"--benchmark: unknown benchmark {n!r} (one of {', '.join(BENCHMARKS)})")
    return items


def paper_cell(cell: str) -> tuple[str, str, str]:
    """``MODEL:FORGET:METHOD`` (e.g. ``llama-3-8b:gsm8k:na``) → the key of one cell of the paper's table."""
    parts = tuple(cell.split(":"))
    if len(parts) != 3 or parts not in PAPER_RESULTS:
        cells = sorted({":".join(k) for k in PAPER_RESULTS})
        raise EditorError(f"--paper: {cell!r} is not a cell of the paper's table (MODEL:FORGET:METHOD: {', '.join(cells)})")
    return parts  # type: ignore[return-value]


def paper_reference(model: str, forget: str, method: str) -> dict[str, float] | None:
    """The paper's relative performance for (model, forgotten benchmark, 'na' | 'ksd'), or None."""
    return PAPER_RESULTS.get((model, forget, method))


def relative_report(before: dict[str, float], after: dict[str, float], forget: str | Iterable[str] = ()) -> dict:
    """Per benchmark: before, after, ``relative`` = after / before (what the paper plots),
    ``drop`` = 1 − after / before, and whether it is the forget or a retain benchmark.
    ``before`` = 0 gives None (undefined)."""
    forget = {forget} if isinstance(forget, str) else set(forget)
    out = {}
    for name in before:
        if name not in after:
            continue
        b, a = float(before[name]), float(after[name])
        rel = a / b if b > 0 else None
        out[name] = {"role": "forget" if name in forget else "retain", "before": b, "after": a,
                     "relative": rel, "drop": (1.0 - rel) if rel is not None else None}
    return out


def format_report(report: dict, reference: dict[str, float] | None = None) -> str:
    """A plain-text table of ``relative_report`` (with the paper's after / before when given)."""
    head = ["benchmark", "role", "before", "after", "after/before", "drop"] + (["paper"] if reference else [])
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    rows = []
    for name, r in report.items():
        row = [name, r["role"], f(r["before"]), f(r["after"]), f(r["relative"]), f(r["drop"])]
        if reference:
            row.append(f(reference.get(name)))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def mlqa_squad_records(obj: dict) -> list[dict]:
    """Records in the Hub schema (id, title, context, question, answers{answer_start, text}) from
    one file of the original MLQA_V1 release (SQuAD format, e.g. ``test-context-en-question-en.json``)
    — the local data when ``facebook/mlqa`` (a loading-script repository) does not load
    (recipes/paper/README.md)."""
    out = []
    for article in obj.get("data", []):
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = qa.get("answers", [])
                out.append({
                    "id": qa.get("id"),
                    "title": article.get("title", ""),
                    "context": para["context"],
                    "question": qa["question"],
                    "answers": {"answer_start": [a.get("answer_start", -1) for a in answers], "text": [a["text"] for a in answers]},
                })
    return out
