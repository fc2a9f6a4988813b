"""The embedded testbed: committed model, data files, corpus generator, scorer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from editor.testbed import DATA_DIR, MODEL_DIR, SKILLS, corpus, load_examples
from editor.eval.scorecard import compare, extract_answer, format_table, score


@pytest.fixture(scope="module")
def model_and_tokenizer():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def eval_result(model_and_tokenizer):
    model, tok = model_and_tokenizer
    return score(model, tok, load_examples("eval"), batch_size=128)


@pytest.fixture(scope="module")
def train_full():
    return corpus.generate("train", full=True)


def _text(e):
    return e["prompt"] + e["answer"]


# ---------------------------------------------------------------- model files
def test_model_dir_is_a_small_hf_checkpoint():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total < 8 * 2 ** 20


def test_model_and_tokenizer_load(model_and_tokenizer):
    model, tok = model_and_tokenizer
    assert model.config.model_type == "llama"
    assert next(model.parameters()).dtype == torch.float32
    n = sum(p.numel() for p in model.parameters())
    assert 0.8e6 < n < 1.5e6
    assert tok.padding_side == "left"
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    gc = model.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (tok.bos_token_id, tok.eos_token_id,
                                                                   tok.pad_token_id)
    assert not gc.do_sample
    assert len(tok) <= model.config.vocab_size


def test_tokenizer_is_character_level_with_bos(model_and_tokenizer):
    _, tok = model_and_tokenizer
    for e in load_examples("probe")[::40]:
        p = tok(e["prompt"])["input_ids"]
        full = tok(_text(e))["input_ids"]
        assert p[0] == tok.bos_token_id and tok.eos_token_id not in full
        assert full[:len(p)] == p and len(full) == len(p) + len(e["answer"])
        assert tok.decode(full, skip_special_tokens=True) == _text(e)
    assert tok("a\nb")["input_ids"][1:] == tok.convert_tokens_to_ids(["a", "\n", "b"])


# ---------------------------------------------------------------- accuracy
@pytest.mark.slow
def test_every_skill_at_least_95_percent_on_eval(eval_result):
    skills = eval_result["skills"]
    assert set(skills) == set(SKILLS)
    for skill, r in skills.items():
        assert r["n"] >= 40
        assert r["abstained"] == 0.0
        assert r["exact_match"] >= 0.95, (skill, format_table(eval_result, by="phrasings"))


@pytest.mark.slow
def test_batched_left_padded_generation_matches_single(model_and_tokenizer, eval_result):
    model, tok = model_and_tokenizer
    subset = load_examples("eval")[::53]
    single = score(model, tok, subset, batch_size=1)
    by_prompt = {r["prompt"]: r["prediction"] for r in eval_result["records"]}
    assert [r["prediction"] for r in single["records"]] == [by_prompt[e["prompt"]] for e in subset]


# ---------------------------------------------------------------- data files
def test_data_files_match_generator():
    for split in ("probe", "eval"):
        assert load_examples(split) == corpus.generate(split, seed=0)
        with (DATA_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
            first = json.loads(f.readline())
        assert set(first) == {"prompt", "answer", "skill", "phrasing"}


def test_every_skill_and_phrasing_in_probe_and_eval():
    for split in ("probe", "eval"):
        ex = load_examples(split)
        counts = {}
        for e in ex:
            assert e["phrasing"].startswith(e["skill"] + "/")
            counts[e["phrasing"]] = counts.get(e["phrasing"], 0) + 1
        assert {p.split("/")[0] for p in counts} == set(SKILLS)
        for skill in SKILLS:
            assert sum(1 for p in counts if p.startswith(skill + "/")) >= 3
        assert min(counts.values()) >= 36


def test_conventions():
    for e in load_examples("probe") + load_examples("eval"):
        assert e["prompt"].endswith(" ") and not e["prompt"].endswith("  ")
        assert e["answer"] == e["answer"].strip() and e["answer"] and "\n" not in e["answer"]


def test_probe_eval_train_disjoint(train_full):
    train_texts = {_text(e) for e in train_full}
    train_prompts = {e["prompt"] for e in train_full}
    probe, ev = load_examples("probe"), load_examples("eval")
    probe_prompts, eval_prompts = {e["prompt"] for e in probe}, {e["prompt"] for e in ev}
    assert len(probe_prompts) == len(probe) and len(eval_prompts) == len(ev)
    assert not probe_prompts & eval_prompts
    assert not (probe_prompts | eval_prompts) & train_prompts
    assert not ({_text(e) for e in probe} | {_text(e) for e in ev}) & train_texts


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_for_a_seed():
    for split in corpus.SPLITS:
        a = corpus.generate(split, seed=0, full=True)
        b = corpus.generate(split, seed=0, full=True)
        assert a == b
    assert corpus.generate("eval", seed=1) != corpus.generate("eval", seed=0)


def test_math_operand_pairs_disjoint_across_splits(train_full):
    def pairs(examples):
        return {tuple(sorted(e["operands"])) for e in examples if e["skill"] == "math"}

    tr = pairs(train_full)
    pr = pairs(corpus.generate("probe", full=True))
    ev = pairs(corpus.generate("eval", full=True))
    assert tr and pr and ev
    assert not tr & pr and not tr & ev and not pr & ev
    split_sets = corpus.math_pair_splits(0)
    assert not set(split_sets["train"]) & set(split_sets["eval"])
    for e in corpus.generate("eval", full=True):
        if e["skill"] == "math":
            a, b = e["operands"]
            assert int(e["answer"]) == (a + b if e["op"] == "add" else a - b)


def test_python_constants_disjoint_across_splits(train_full):
    def consts(examples):
        return {e["const"] for e in examples if e["skill"] == "python"}

    tr = consts(train_full)
    pr = consts(corpus.generate("probe", full=True))
    ev = consts(corpus.generate("eval", full=True))
    assert not tr & pr and not tr & ev and not pr & ev


def test_held_out_facts_are_taught_in_training(train_full):
    taught = {(e["entity"], e["attribute"], e["phrasing"]): set() for e in train_full
              if e["skill"].startswith("facts_")}
    for e in train_full:
        if e["skill"].startswith("facts_"):
            taught[(e["entity"], e["attribute"], e["phrasing"])].add(e["preamble"])
    for split in ("probe", "eval"):
        for e in corpus.generate(split, full=True):
            if e["skill"].startswith("facts_"):
                key = (e["entity"], e["attribute"], e["phrasing"])
                assert key in taught and e["preamble"] not in taught[key]


# ---------------------------------------------------------------- scorer
class _Abstaining(torch.nn.Module):
    """Wraps a model; ``generate`` flags every other row as abstained."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.generation_config = inner.generation_config

    def generate(self, **kw):
        out = self.inner.generate(**kw)
        n = out.sequences.shape[0]
        out.abstained = torch.arange(n) % 2 == 0
        return out


def test_score_counts_abstained_rows_as_wrong(model_and_tokenizer):
    model, tok = model_and_tokenizer
    ex = [e for e in load_examples("eval") if e["skill"] == "python"][:8]
    res = score(_Abstaining(model), tok, ex, batch_size=4)
    r = res["skills"]["python"]
    assert r["n"] == 8 and r["abstained"] == 0.5 and r["exact_match"] <= 0.5
    assert all(not rec["correct"] for rec in res["records"] if rec["abstained"])


def test_compare_and_format_table():
    before = {"skills": {"math": {"n": 10, "exact_match": 1.0, "abstained": 0.0},
                         "python": {"n": 10, "exact_match": 0.0, "abstained": 0.0}}}
    after = {"skills": {"math": {"n": 10, "exact_match": 0.25, "abstained": 0.5},
                        "python": {"n": 10, "exact_match": 0.0, "abstained": 0.0}}}
    c = compare(before, after)
    assert c["math"]["relative_drop"] == pytest.approx(0.75)
    assert c["python"]["relative_drop"] == 0.0
    table = format_table(before, after)
    assert "math" in table and "75.0%" in table
    assert format_table(c) == table
    assert "100.0%" in format_table(before)
    assert extract_answer(" 42\nQ: next") == "42"
