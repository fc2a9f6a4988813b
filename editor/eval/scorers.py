"""Scorers for the paper's real benchmarks (DESIGN §10): GSM8K, MBPP, MLQA and MMLU.

Three layers, each usable on its own:

* **prompts** — the exact query formats the paper recipes probe with (``gsm8k_prompt`` is the
  8-shot chain-of-thought prompt of Wei et al. 2022; ``mbpp_prompt`` the Austin et al. 2021
  task + tests prompt; ``mlqa_prompt`` a context / question / answer prompt), so that the key
  space KSD learns from is the one it is tested on;
* **pure scorers** — ``score_gsm8k``, ``score_mbpp``, ``score_mlqa`` take model outputs (strings)
  plus gold data and return ``{"n", "correct", "accuracy", "abstained", "records"}``; a row
  with ``abstained=True`` (Key Space Detection refused it) always counts as wrong;
* **runners** — ``generate`` (batched, left-padded, reads the edited model's ``abstained``
  flags), ``evaluate_gsm8k`` / ``evaluate_mbpp`` / ``evaluate_mlqa`` (generate + score) and
  ``evaluate_mmlu`` (5-shot multiple choice by the log-likelihood of the answer letters).

MBPP programs run in ``execute_mbpp`` (``editor.eval.sandbox``): the program in its own process (fresh
temporary directory, scrubbed environment, memory / CPU / file-size / open-file / process limits,
its own session; as ``nobody`` when run as root; PID + network namespaces where the kernel allows)
and the asserts in a separate judge process that only asks the program for its functions'
return values, so the program cannot forge the verdict. File-system reads and writes, and (without
root or user namespaces) the network and your other processes, are **not** isolated: it is not a
security boundary against deliberately hostile code — run untrusted generations inside a
container or VM, as the evalplus and human-eval authors advise.

``relative_report`` computes what the paper plots: performance relative to the original model
(after / before) and the relative drop 1 − after / before; ``PAPER_RESULTS`` holds the paper's
numbers (DESIGN §10) for side-by-side tables.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import asdict
from typing import Iterable, Sequence
from editor.eval.sandbox import SandboxResult, run_program
from editor.eval.scorecard import generate_texts, model_device

__all__ = [
    "BENCHMARKS",
    "GSM8K_COT_EXEMPLARS",
    "GSM8K_COT_PREFIX",
    "gsm8k_prompt",
    "gsm8k_gold",
    "extract_gsm8k_answer",
    "numbers_equal",
    "score_gsm8k",
    "mbpp_prompt",
    "extract_mbpp_code",
    "SandboxResult",
    "execute_mbpp",
    "score_mbpp",
    "mlqa_prompt",
    "normalize_answer",
    "mlqa_match",
    "score_mlqa",
    "mlqa_squad_records",
    "mmlu_prompt",
    "evaluate_mmlu",
    "generate",
    "evaluate_gsm8k",
    "evaluate_mbpp",
    "evaluate_mlqa",
    "load_benchmark",
    "relative_report",
    "format_report",
    "result_json",
    "PAPER_RESULTS",
    "paper_reference",
]

# ---------------------------------------------------------------------------------------------
# the benchmarks as the paper used them (Hub ids, configs, splits)
# ---------------------------------------------------------------------------------------------

MLQA_LANGUAGES = ("en", "de", "es", "ar", "hi", "vi", "zh")

BENCHMARKS: dict[str, dict] = {
    "gsm8k": {"path": "openai/gsm8k", "name": "main", "probe_split": "train", "test_split": "test"},
    "mbpp": {"path": "google-research-datasets/mbpp", "name": "full", "probe_split": "train", "test_split": "test"},
    # MLQA has no train split: probe on validation, evaluate on test
    **{
        f"mlqa-{lang}": {"path": "facebook/mlqa", "name": f"mlqa.{lang}.{lang}", "probe_split": "validation", "test_split": "test"}
        for lang in MLQA_LANGUAGES
    },
    "mmlu": {"path": "cais/mmlu", "name": "all", "probe_split": "dev", "test_split": "test"},
}


def load_benchmark(name: str, split: str = "test", limit: int | None = None) -> list[dict]:
    """Records of a benchmark (``BENCHMARKS`` key) from the Hub; needs the network or the cache."""
    import datasets

    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    b = BENCHMARKS[name]
    ds = datasets.load_dataset(b["path"], b["name"], split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


# ---------------------------------------------------------------------------------------------
# result records
# ---------------------------------------------------------------------------------------------


def _flags(abstained, n: int) -> list[bool]:
    if abstained is None:
        return [False] * n
    if hasattr(abstained, "tolist"):
        abstained = abstained.tolist()
    if isinstance(abstained, bool):
        return [abstained] * n
    flags = [bool(a) for a in abstained]
    if len(flags) != n:
        raise ValueError(f"abstained has {len(flags)} entries for {n} outputs")
    return flags


def _summary(rows: list[dict]) -> dict:
    n = len(rows)
    correct = sum(1 for r in rows if r["correct"])
    abst = sum(1 for r in rows if r["abstained"])
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "abstained": abst / n if n else 0.0,
        "records": rows,
    }


def _check_lengths(outputs: Sequence, golds: Sequence, what: str) -> None:
    if len(outputs) != len(golds):
        raise ValueError(f"{len(outputs)} outputs for {len(golds)} {what}")


# ---------------------------------------------------------------------------------------------
# GSM8K: 8-shot chain of thought (Wei et al. 2022), answer after "The answer is"
# ---------------------------------------------------------------------------------------------

GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
        "The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
)

GSM8K_COT_PREFIX = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS)
# the recipe template for KSD queries is GSM8K_COT_PREFIX + GSM8K_QUERY (tests pin the equality)
GSM8K_QUERY = "Q: {question}\nA:"
GSM8K_STOP = ("\n\nQ:", "\nQ:")

_NUMBER = r"-?[$]?\d[\d,]*(?:\.\d+)?|-?[$]?\.\d+"
_ANSWER_IS = re.compile(r"the answer is[:\s]*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def gsm8k_prompt(question: str, shots: bool = True) -> str:
    """The 8-shot CoT prompt (or the bare ``Q: …\\nA:`` query with ``shots=False``)."""
    return (GSM8K_COT_PREFIX if shots else "") + GSM8K_QUERY.format(question=question)


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    if s in ("", "-", "."):
        return None
    try:
        float(s)
    except ValueError:
        return None
    return s


def gsm8k_gold(answer: str) -> str:
    """The number after ``####`` in a GSM8K ``answer`` field."""
    if "####" not in answer:
        raise ValueError("GSM8K answer has no '#### N' line")
    tail = answer.split("####")[-1]
    m = _ANY_NUMBER.search(tail)
    num = _clean_number(m.group(0)) if m else None
    if num is None:
        raise ValueError(f"GSM8K answer has no number after '####': {tail.strip()[:40]!r}")
    return num


def _truncate(text: str, stops: Iterable[str]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def extract_gsm8k_answer(text: str, stops: Iterable[str] = GSM8K_STOP) -> str | None:
    """The number after the first "The answer is", else the last number of the output (cut at the
    next ``Q:``, where a base model starts a new exemplar); None when there is no number."""
    if not text:
        return None
    text = _truncate(text, stops)
    m = _ANSWER_IS.search(text)
    if m:
        n = _clean_number(m.group(1))
        if n is not None:
            return n
    for cand in reversed(_ANY_NUMBER.findall(text)):
        n = _clean_number(cand)
        if n is not None:
            return n
    return None


def numbers_equal(a: str | float | None, b: str | float | None, rel_tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return False
    try:
        x, y = float(str(a).replace(",", "")), float(str(b).replace(",", ""))
    except ValueError:
        return False
    if not (math.isfinite(x) and math.isfinite(y)):
        return False
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


def score_gsm8k(outputs: Sequence[str], answers: Sequence[str], abstained=None) -> dict:
    """Accuracy of ``outputs`` against GSM8K ``answer`` fields (``#### N``) or bare gold numbers."""
    _check_lengths(outputs, answers, "answers")
    flags = _flags(abstained, len(outputs))
    rows = []
    for out, gold_field, abst in zip(outputs, answers, flags):
        gold = gsm8k_gold(gold_field) if "####" in str(gold_field) else _clean_number(str(gold_field))
        pred = extract_gsm8k_answer(out or "")
        rows.append({"prediction": pred, "gold": gold, "abstained": abst, "correct": (not abst) and numbers_equal(pred, gold)})
    return _summary(rows)


# ---------------------------------------------------------------------------------------------
# MBPP: run the generated code with the task's asserts in a sandboxed subprocess
# ---------------------------------------------------------------------------------------------

MBPP_PROMPT = "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
# the recipe template for KSD queries (three tests, as every MBPP task has)
MBPP_QUERY = MBPP_PROMPT.replace("{tests}", "{test_list[0]}\n{test_list[1]}\n{test_list[2]}")
MBPP_STOP = ("[DONE]",)


def mbpp_prompt(record: dict, shots: Sequence[dict] = ()) -> str:
    """Austin et al.'s prompt: task text, its tests, ``[BEGIN]``; optional solved exemplars first."""

    def one(r: dict) -> str:
        return MBPP_PROMPT.format(text=r["text"], tests="\n".join(r["test_list"]))

    prefix = "".join(one(s) + s["code"].strip() + "\n[DONE]\n\n" for s in shots)
    return prefix + one(record)


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_mbpp_code(text: str) -> str:
    """The program in a generation: cut at ``[DONE]``; the first fenced block if there is one."""
    if not text:
        return ""
    text = _truncate(text, MBPP_STOP).replace("[BEGIN]", "")
    m = _FENCE.search(text)
    if m:
        text = m.group(1)
    return text.strip("\n")


def execute_mbpp(
    code: str,
    tests: Sequence[str],
    setup_code: str = "",
    *,
    timeout: float = 10.0,
    memory_mb: int | None = 2048,
    max_output_bytes: int = 64 * 1024,
    max_file_bytes: int = 16 * 1024 * 1024,
    max_processes: int | None = 16,
    python: str | None = None,
    namespaces: bool = True,
) -> SandboxResult:
    """Run ``setup_code + code`` in a sandboxed process and every assert of ``tests`` against it.

    pass@1 = every assert ran to the end **in a separate judge process** that never runs program
    code: the program only answers calls to its functions with plain values (``editor.eval.sandbox``
    has the design). The program cannot write or influence the verdict except through the values
    its functions return; its whole process tree is killed when the call returns (``setsid``
    grandchildren included); it runs under memory / CPU / file-size / open-file / process limits,
    as ``nobody`` when the scorer is root, and in PID + network namespaces where the kernel allows.

    **Not isolated**: file-system reads (whatever the uid can read) and writes (wherever it may
    write), and, when neither root nor user namespaces are available, the network and your other
    processes (same uid). ``SandboxResult.isolation`` says what was in force. For real isolation
    score untrusted generations inside a container or VM.

    ``timeout`` covers start, code and all asserts; stdout / stderr are kept up to
    ``max_output_bytes`` each (the rest is read and dropped).
    """
    if not code or not code.strip():
        return SandboxResult(False, "failed", "empty program")
    return run_program(
        code, list(tests), setup_code or "", timeout=timeout, memory_mb=memory_mb,
        max_output_bytes=max_output_bytes, max_file_bytes=max_file_bytes, max_processes=max_processes,
        python=python, namespaces=namespaces,
    )


def score_mbpp(
    outputs: Sequence[str],
    records: Sequence[dict],
    abstained=None,
    *,
    timeout: float = 10.0,
    memory_mb: int | None = 2048,
    max_output_bytes: int = 64 * 1024,
    workers: int = 1,
    extract: bool = True,
) -> dict:
    """pass@1 of ``outputs`` on MBPP ``records`` (``test_list``, optional ``test_setup_code``):
    all asserts must pass. Abstained rows are not run and count as wrong."""
    _check_lengths(outputs, records, "records")
    flags = _flags(abstained, len(outputs))
    codes = [extract_mbpp_code(o or "") if extract else (o or "") for o in outputs]

    def run(i: int) -> SandboxResult | None:
        if flags[i]:
            return None
        r = records[i]
        return execute_mbpp(
            codes[i], r["test_list"], r.get("test_setup_code") or "",
            timeout=timeout, memory_mb=memory_mb, max_output_bytes=max_output_bytes,
        )

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(run, range(len(codes))))
    else:
        results = [run(i) for i in range(len(codes))]
    rows = []
    for i, res in enumerate(results):
        rows.append({
            "task_id": records[i].get("task_id"),
            "code": codes[i],
            "abstained": flags[i],
            "status": "abstained" if res is None else res.status,
            "detail": "" if res is None else res.detail,
            "correct": bool(res is not None and res.passed),
        })
    return _summary(rows)


# ---------------------------------------------------------------------------------------------
# MLQA: the gold answer as a substring of the (normalized) output
# ---------------------------------------------------------------------------------------------

MLQA_QUERY = "Context: {context}\nQuestion: {question}\nAnswer:"
MLQA_STOP = ("\n",)

# the articles MLQA's official evaluation script removes, per language
_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
}


def mlqa_prompt(record: dict) -> str:
    return MLQA_QUERY.format(context=record["context"], question=record["question"])


def normalize_answer(text: str, lang: str | None = None) -> str:
    """NFKC, case-folded, punctuation removed, the language's articles removed, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    if lang in _ARTICLES:
        text = re.sub(_ARTICLES[lang], " ", text)
    return " ".join(text.split())


def _golds(answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    if isinstance(answers, dict):  # the Hub schema: {"answer_start": [...], "text": [...]}
        answers = answers.get("text", [])
    return [str(a) for a in answers]


def mlqa_match(output: str, answers, lang: str | None = None) -> bool:
    """True when some non-empty normalized gold answer occurs in the normalized output."""
    out = normalize_answer(output or "", lang)
    if not out:
        return False
    for g in _golds(answers):
        ng = normalize_answer(g, lang)
        if ng and ng in out:
            return True
    return False


def score_mlqa(outputs: Sequence[str], answers: Sequence, abstained=None, lang: str | None = None) -> dict:
    """Substring accuracy; ``answers`` items are strings, lists of strings or the Hub ``answers`` dict."""
    _check_lengths(outputs, answers, "answers")
    flags = _flags(abstained, len(outputs))
    rows = []
    for out, ans, abst in zip(outputs, answers, flags):
        rows.append({"prediction": out, "gold": _golds(ans), "abstained": abst, "correct": (not abst) and mlqa_match(out, ans, lang)})
    return _summary(rows)


def mlqa_squad_records(obj: dict) -> list[dict]:
    """Records in the Hub schema (id, title, context, question, answers{answer_start, text}) from
    one file of the original MLQA_V1 release (SQuAD format, e.g. ``test-context-en-question-en.json``)
    — the fallback when the Hub dataset cannot be loaded (see recipes/paper/README.md)."""
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


# ---------------------------------------------------------------------------------------------
# MMLU: k-shot multiple choice by the log-likelihood of the answer letters
# ---------------------------------------------------------------------------------------------

LETTERS = ("A", "B", "C", "D")


def _subject_name(subject: str) -> str:
    return " ".join(subject.split("_"))


def _mmlu_block(r: dict, with_answer: bool) -> str:
    s = r["question"].strip() + "\n"
    s += "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(r["choices"]))
    s += "Answer:"
    if with_answer:
        s += f" {LETTERS[int(r['answer'])]}\n\n"
    return s


def mmlu_prompt(record: dict, shots: Sequence[dict] = ()) -> str:
    """Hendrycks et al.'s format: header, k solved questions of the subject, the question, 'Answer:'."""
    subject = record.get("subject", "")
    head = f"The following are multiple choice questions (with answers) about {_subject_name(subject)}.\n\n" if subject else ""
    return head + "".join(_mmlu_block(s, True) for s in shots) + _mmlu_block(record, False)


def _continuation_ids(tokenizer, context: str, cont: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) such that context + continuation tokenizes as their
    concatenation (the whole string is encoded; the context's ids are its prefix)."""
    whole = tokenizer(context + cont)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    k = 0
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    if k == len(whole):  # the continuation vanished in tokenization: keep its own ids
        return list(ctx), list(tokenizer(cont, add_special_tokens=False)["input_ids"])
    return list(whole[:k]), list(whole[k:])


def evaluate_mmlu(
    model,
    tokenizer,
    records: Sequence[dict],
    dev_records: Sequence[dict] = (),
    *,
    shots: int = 5,
    batch_size: int = 4,
    max_length: int | None = None,
    letter_format: str = " {}",
) -> dict:
    """Accuracy on MMLU ``records`` (``question``, ``choices``, ``answer`` index, ``subject``).

    The ``shots`` exemplars are the first ``dev_records`` of the same subject. Each continuation
    " A" … " D" (``letter_format``) is scored by its summed log-probability given the prompt; the highest wins (ties:
    the earlier letter). When every continuation is one token after the same context (the usual
    case) one forward of the prompt scores all four. Batches are left-padded with explicit
    position ids and only the needed positions' logits are kept. A row whose forward output flags
    ``abstained`` (KSD) counts as wrong.
    """
    import torch

    records = list(records)
    by_subject: dict[str, list[dict]] = {}
    for d in dev_records:
        by_subject.setdefault(d.get("subject", ""), []).append(d)
    # items: (question, token ids, [(letter, continuation ids)], shared) — shared: the ids are the
    # context and each continuation is one token scored at the last position
    items = []
    for qi, r in enumerate(records):
        prompt = mmlu_prompt(r, by_subject.get(r.get("subject", ""), [])[:shots])
        parts = [_continuation_ids(tokenizer, prompt, letter_format.format(LETTERS[li])) for li in range(len(r["choices"]))]
        if all(len(c) == 1 and ctx == parts[0][0] for ctx, c in parts):
            ctx = parts[0][0]
            if max_length is not None and len(ctx) > max_length:
                ctx = ctx[len(ctx) - max_length :]
            items.append((qi, ctx, [(li, c) for li, (_, c) in enumerate(parts)], True))
        else:
            for li, (ctx, c) in enumerate(parts):
                seq = ctx + c
                if max_length is not None and len(seq) > max_length:
                    seq = seq[len(seq) - max_length :]
                items.append((qi, seq, [(li, c)], False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = model_device(model)
    loglik = [[-math.inf] * len(r["choices"]) for r in records]
    abstained = [False] * len(records)
    order = sorted(range(len(items)), key=lambda i: (len(items[i][1]), i))
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [items[i] for i in order[start : start + batch_size]]
                width = max(len(b[1]) for b in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, b in enumerate(batch):
                    ids[row, width - len(b[1]) :] = torch.tensor(b[1])
                    mask[row, width - len(b[1]) :] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                # the last `keep` positions hold every logit we need
                keep = max(1 if shared else len(conts[0][1]) + 1 for _, _, conts, shared in batch)
                kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))
                try:
                    out = model(**kw, logits_to_keep=keep)
                except TypeError:
                    out = model(**kw)
                logits = out.logits[:, -keep:, :].float()
                logp = torch.log_softmax(logits, dim=-1).cpu()
                flags = getattr(out, "abstained", None)
                flags = flags.reshape(-1).bool().tolist() if flags is not None else [False] * len(batch)
                for row, (qi, seq, conts, shared) in enumerate(batch):
                    for li, cont in conts:
                        if shared:
                            total = float(logp[row, keep - 1, cont[0]])
                        else:
                            # token j of the continuation is predicted at window column keep-1-n+j
                            n = len(cont)
                            total = sum(float(logp[row, keep - 1 - n + j, cont[j]]) for j in range(n))
                        loglik[qi][li] = total
                    abstained[qi] = abstained[qi] or bool(flags[row])
    finally:
        if was_training:
            model.train()
    rows = []
    for qi, r in enumerate(records):
        pred = max(range(len(loglik[qi])), key=lambda li: (loglik[qi][li], -li))
        rows.append({
            "subject": r.get("subject", ""),
            "prediction": LETTERS[pred],
            "gold": LETTERS[int(r["answer"])],
            "loglik": loglik[qi],
            "abstained": abstained[qi],
            "correct": (not abstained[qi]) and pred == int(r["answer"]),
        })
    return _summary(rows)


# ---------------------------------------------------------------------------------------------
# generation runners
# ---------------------------------------------------------------------------------------------



def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
) -> tuple[list[str], list[bool]]:
    """Continuations (new text only, cut at the first ``stop`` string) and abstention flags: the
    scorecard's batched generation (``editor.eval.scorecard.generate_texts``: left padding, batches
    of similar prompt length, results in input order, ``abstained`` from the edited model's
    ``generate``; a plain model never abstains)."""
    texts, flags = generate_texts(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    return [_truncate(t, stop) for t in texts], flags


def evaluate_gsm8k(model, tokenizer, records: Sequence[dict], *, shots: bool = True, max_new_tokens: int = 256, **gen) -> dict:
    """8-shot CoT generation on GSM8K ``records`` (``question``, ``answer``), then ``score_gsm8k``."""
    prompts = [gsm8k_prompt(r["question"], shots=shots) for r in records]
    outs, ab = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=gen.pop("stop", GSM8K_STOP), **gen)
    res = score_gsm8k(outs, [r["answer"] for r in records], ab)
    for row, o in zip(res["records"], outs):
        row["output"] = o
    return res


def evaluate_mbpp(model, tokenizer, records: Sequence[dict], *, shots: Sequence[dict] = (), max_new_tokens: int = 512,
                  timeout: float = 10.0, memory_mb: int | None = 2048, workers: int = 1, **gen) -> dict:
    """Generation on MBPP ``records`` with ``mbpp_prompt``, then sandboxed ``score_mbpp`` (pass@1)."""
    prompts = [mbpp_prompt(r, shots) for r in records]
    outs, ab = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=gen.pop("stop", MBPP_STOP), **gen)
    return score_mbpp(outs, records, ab, timeout=timeout, memory_mb=memory_mb, workers=workers)


def evaluate_mlqa(model, tokenizer, records: Sequence[dict], *, lang: str | None = None, max_new_tokens: int = 32, **gen) -> dict:
    """Generation on MLQA ``records`` with ``mlqa_prompt``, then ``score_mlqa``."""
    prompts = [mlqa_prompt(r) for r in records]
    outs, ab = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=gen.pop("stop", MLQA_STOP), **gen)
    return score_mlqa(outs, [r["answers"] for r in records], ab, lang=lang)


# ---------------------------------------------------------------------------------------------
# relative performance, as the paper reports it
# ---------------------------------------------------------------------------------------------


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
        out[name] = {
            "role": "forget" if name in forget else "retain",
            "before": b,
            "after": a,
            "relative": rel,
            "drop": (1.0 - rel) if rel is not None else None,
        }
    return out


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


def paper_reference(model: str, forget: str, method: str) -> dict[str, float] | None:
    """The paper's relative performance for (model, forgotten benchmark, 'na' | 'ksd'), or None."""
    return PAPER_RESULTS.get((model, forget, method))


def format_report(report: dict, reference: dict[str, float] | None = None) -> str:
    """A plain-text table of ``relative_report`` (with the paper's numbers when given)."""
    head = ["benchmark", "role", "before", "after", "after/before", "drop"] + (["paper"] if reference else [])
    rows = []
    for name, r in report.items():
        f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        row = [name, r["role"], f(r["before"]), f(r["after"]), f(r["relative"]), f(r["drop"])]
        if reference:
            row.append(f(reference.get(name)))
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def result_json(result: dict) -> str:
    """A result dict as JSON (dataclasses turned into dicts)."""
    return json.dumps(result, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o), indent=2)

