"""The real-model battery's data (editor/battery): the shipped files are the builder's output, the
few-shot records are the ones every recipe and figure was made with, and the free-form request
phrasings keep the item split, rotate several templates and carry the right answers."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict

import pytest

from editor.battery import build, items as T, requests as R

SPLITS = [name for name, _ in build.SPLITS]
# sha256 of each split file as it was before the request phrasings (few-shot records only, no
# ``kind`` field): the few-shot part of today's files, ``kind`` taken out, must still be exactly that
FEWSHOT_SHA256 = {
    "probe": "b113b16158727c60be1f5938171d3550391e7d11292b6e4b7021f2b8265842c5",
    "dev": "d6ba60f5f43df0e5226482af2eb1c9644a566d3d16be042d21c17900f0412f56",
    "eval": "9289bfa579e9155663c9b6328728d1d51859089f850fcc06e39f15ba37cee798",
}
KIND = ', "kind": "fewshot"}'


def _lines(split: str) -> list[str]:
    return (build.DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in _lines(s)] for s in SPLITS}


def test_shipped_files_are_the_builders_output(tmp_path):
    build.write(tmp_path)
    for s in SPLITS:
        assert (tmp_path / f"{s}.jsonl").read_bytes() == (build.DATA / f"{s}.jsonl").read_bytes(), s


def test_fewshot_records_unchanged_and_first():
    for s in SPLITS:
        lines = _lines(s)
        kinds = [json.loads(line)["kind"] for line in lines]
        n = kinds.count("fewshot")
        assert kinds == ["fewshot"] * n + ["request"] * (len(kinds) - n), s  # few-shot first, requests appended
        old = "".join(line[: -len(KIND) - 1] + "}\n" for line in lines[:n])
        assert all(line.endswith(KIND + "\n") for line in lines[:n])
        assert hashlib.sha256(old.encode()).hexdigest() == FEWSHOT_SHA256[s], s


def test_items_and_prompts_never_cross_splits(rows):
    split_of, prompt_split = {}, {}
    for s, rs in rows.items():
        for r in rs:
            assert r["split"] == s
            assert split_of.setdefault((r["skill"], r["item"]), s) == s, (r["skill"], r["item"])
            assert prompt_split.setdefault(r["prompt"], s) == s, r["prompt"]


def test_every_item_in_every_phrasing_of_its_split(rows):
    phrasings = defaultdict(set)
    for s, rs in rows.items():
        for r in rs:
            phrasings[r["skill"]].add(r["phrasing"])
    for s, rs in rows.items():
        seen = defaultdict(set)
        for r in rs:
            seen[(r["skill"], r["item"])].add(r["phrasing"])
        for (skill, item), ph in seen.items():
            assert ph == phrasings[skill], (s, skill, item, phrasings[skill] - ph)
    requests = {p for ps in phrasings.values() for p in ps} - {
        r["phrasing"] for rs in rows.values() for r in rs if r["kind"] == "fewshot"}
    assert requests == {"math/ask", "math/word", "math/times", "math/multi", "math/percent", "math/lang",
                        "python/write", "python/howto", "python/code_only", "capitals/ask", "past_tense/ask",
                        "plurals/ask", "antonyms/ask", "languages/ask"}


def test_request_phrasings_rotate_their_templates(rows):
    """Several surface templates per phrasing, each one in every split; one prompt per item."""
    used = defaultdict(set)
    prompts = set()
    for s, rs in rows.items():
        for r in rs:
            if r["kind"] != "request":
                assert "template" not in r
                continue
            skill, name = r["phrasing"].split("/")
            n = len(R.phrasings(skill)[name])
            assert n >= 6, r["phrasing"]
            assert 0 <= r["template"] < n
            used[(r["phrasing"], s)].add(r["template"])
            assert r["prompt"] not in prompts
            prompts.add(r["prompt"])
            assert r["answer"] == r["answers"][0] and set(r) == {
                "skill", "phrasing", "item", "prompt", "answer", "answers", "match", "split", "kind", "template"}
    for (phrasing, s), ts in used.items():
        skill, name = phrasing.split("/")
        assert ts == set(range(len(R.phrasings(skill)[name]))), (phrasing, s)


def _math_answer(phrasing: str, a: int, b: int, prompt: str) -> int:
    """The answer read from the prompt itself (not from the builder's tables)."""
    nums = [int(x) for x in re.findall(r"\d+", prompt)]
    if phrasing in ("math/ask", "math/lang"):
        assert nums == [a, b] or nums == [b, a]
        return a + b
    if phrasing == "math/times":
        assert sorted(nums) == sorted([a, b])
        return a * b
    if phrasing == "math/percent":
        assert sorted(nums) == sorted([10 * a, 10 * b])
        return nums[0] * nums[1] // 100
    if phrasing == "math/multi":
        assert len(nums) == 2 and all(10 <= x <= 1098 for x in nums)
        if re.search(r"minus|Subtract|spent| - ", prompt):
            x, y = (nums[1], nums[0]) if prompt.startswith("Subtract") else nums
            assert x > y
            return x - y
        return nums[0] + nums[1]
    assert phrasing == "math/word"
    x, y = nums
    return x - y if re.search(r"\b(gave|takes out|ate)\b", prompt) else x + y


def test_request_answers(rows):
    python = {name: accepted for name, _, _, accepted in T.PYTHON}
    words = {"capitals": T.CAPITALS, "past_tense": T.PAST, "plurals": T.PLURALS, "antonyms": T.ANTONYMS,
             "languages": T.LANGUAGES}
    n = 0
    for rs in rows.values():
        for r in (r for r in rs if r["kind"] == "request"):
            n += 1
            p = r["prompt"]
            if r["skill"] == "math":
                a, b = map(int, r["item"].split("+"))
                assert r["answers"] == [str(_math_answer(r["phrasing"], a, b, p))] and r["match"] == "number", p
            elif r["skill"] == "python":
                assert r["answers"] == python[r["item"]] and r["match"] == "python"
                name, args, _, _ = next(it for it in T.PYTHON if it[0] == r["item"])
                if r["phrasing"] == "python/howto":  # the variables are named, so the answer can use them
                    assert all(re.search(rf"\b{a.strip()}\b", p) for a in args.split(",")), p
                else:
                    assert re.search(rf"\b{name}\b", p), p
            else:
                assert r["answers"] == dict(words[r["skill"]])[r["item"]].split("|") and r["match"] == "words"
                assert r["item"] in p, p
    assert n > 1000


def test_math_word_problems_read_naturally(rows):
    for rs in rows.values():
        for r in rs:
            if r["phrasing"] == "math/word":
                assert not re.search(r"\b1 (pencils|marbles|apples|pages|points|stickers)\b", r["prompt"]), r["prompt"]
                assert not re.search(r"There are 1\b", r["prompt"]), r["prompt"]
