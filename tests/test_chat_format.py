"""Chat form end to end (issue #22): recipes render request sets raw, through the tokenizer's chat
template, or both; a conversation field renders as a conversation; the chat text tokenizes to
exactly ``apply_chat_template``'s ids; the calibration holds its budget per set and form; scorecards
report per form and read chat replies; a guard that decides on the prompt is scored from the base
answers plus one forward — the same scorecard as generating with the edited model."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from editor.data import chat_text, in_forms, raw_conversation, resolve_format
from editor.errors import EditorError
from editor.eval.scorecard import matches_reply
from editor.recipe import load_recipe
from tests.helpers import write_jsonl
from tests.tiny import char_tokenizer, save_tiny

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
BOS_TEMPLATE = "{{ bos_token }}" + TEMPLATE


def _tok(template: str | None, adds_bos: bool = True):
    tok = char_tokenizer()
    if not adds_bos:
        from tokenizers import processors

        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok.chat_template = template
    return tok


CONV = [{"role": "user", "content": "what is 2 plus 2"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and now 3 plus 3"}]


@pytest.mark.parametrize("template,adds_bos", [(BOS_TEMPLATE, True), (TEMPLATE, False), (BOS_TEMPLATE, False)])
def test_chat_text_tokenizes_to_the_chat_templates_ids(template, adds_bos):
    """What a chat client sends (``apply_chat_template(..., tokenize=True)``) is what the tool's
    chat text gives when tokenized the way the tool tokenizes every text (with special tokens)."""
    tok = _tok(template, adds_bos)
    for conv in (CONV, CONV[:1]):
        want = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert tok(chat_text(tok, conv))["input_ids"] == list(want)
    assert chat_text(tok, CONV).endswith("<assistant>")  # the generation prompt after a user turn


def test_a_bos_the_template_does_not_write_is_refused():
    with pytest.raises(EditorError, match="BOS"):
        chat_text(_tok(TEMPLATE, adds_bos=True), CONV)


def test_formats_resolve_against_the_tokenizer():
    plain, chat = _tok(None), _tok(BOS_TEMPLATE)
    assert resolve_format("auto", plain, "x") == ["raw"]
    assert resolve_format("auto", chat, "x") == ["raw", "chat"]
    assert resolve_format("auto", None, "x") == ["raw"]
    assert resolve_format("both", chat, "x") == ["raw", "chat"]
    assert resolve_format("chat", chat, "x") == ["chat"]
    with pytest.raises(EditorError, match="data.q.format: format 'chat' needs a chat template"):
        resolve_format("chat", plain, "data.q.format")


def test_forms_of_a_set():
    tok = _tok(BOS_TEMPLATE)
    recs = [{"prompt": "a"}, {"prompt": "b"}]
    raw = in_forms("s", ["a", "b"], recs, {"fingerprint": "f"}, ["raw"], tok)
    assert raw.forms is None and raw.info == {"fingerprint": "f"}  # a raw set is described as before
    both = in_forms("s", ["a", "b"], recs, {"fingerprint": "f"}, ["raw", "chat"], tok)
    assert both.forms == ["raw", "raw", "chat", "chat"] and both.texts[:2] == ["a", "b"]
    assert both.texts[2] == chat_text(tok, [{"role": "user", "content": "a"}])
    assert both.info["format"] == "both" and both.info["texts"] == 4 and both.info["fingerprint"] != "f"
    assert both.in_form("chat").texts == both.texts[2:] and both.in_form("chat").name == "s[chat]"
    assert both.form_names == ["raw", "chat"] and raw.in_form("raw") is raw


def test_raw_conversation():
    assert raw_conversation(CONV) == "User: what is 2 plus 2\n\nAssistant: 4\n\nUser: and now 3 plus 3\n\nAssistant:"
    assert raw_conversation(CONV[:2]) == "User: what is 2 plus 2\n\nAssistant: 4"


def _project(root: Path, fmt_lines: str, *, template: str | None = BOS_TEMPLATE) -> Path:
    save_tiny("llama", root / "model")
    if template is not None:
        cfg = json.loads((root / "model" / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (root / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    write_jsonl(root / "q.jsonl", [{"prompt": f"what is {i} plus {i}", "skill": "math"} for i in range(6)])
    write_jsonl(root / "conv.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                    {"role": "assistant", "content": "hello"},
                                                    {"role": "user", "content": f"add {i} and {i}"}]} for i in range(4)])
    write_jsonl(root / "a.jsonl", [{"text": f"the answer is {2 * i}"} for i in range(6)])
    p = root / "r.yaml"
    p.write_text(textwrap.dedent(f"""\
        model: model
        {fmt_lines}
        data:
          queries: {{path: q.jsonl, text: "{{prompt}}"}}
          convs: {{path: conv.jsonl, messages: messages}}
          answers: {{path: a.jsonl}}
          chat_only: {{path: q.jsonl, text: "{{prompt}}", format: chat}}
        neuron_adjust: {{forget: answers, retain: answers2}}
        key_space: {{forget: queries, retain: convs, detector: linear, check: prompt, background: none}}
        """).replace("neuron_adjust: {forget: answers, retain: answers2}\n", ""), encoding="utf-8")
    return p


def test_recipe_formats_apply_to_request_sets(tmp_path):
    from editor.pipeline import prepare

    job = prepare(_project(tmp_path, ""))  # format: auto, a chat template: both forms for request sets
    assert job.sets["queries"].form_names == ["raw", "chat"] and len(job.sets["queries"].texts) == 12
    assert job.sets["convs"].form_names == ["raw", "chat"]
    assert job.sets["convs"].texts[0] == "User: hi 0\n\nAssistant: hello\n\nUser: add 0 and 0\n\nAssistant:"
    assert job.sets["convs"].texts[4].endswith("<user>add 0 and 0\n<assistant>")
    assert job.sets["answers"].forms is None  # read by no guard or scorecard: raw, as written
    assert job.sets["chat_only"].form_names == ["chat"]  # its own format wins


def test_recipe_format_raw_and_errors(tmp_path):
    from editor.pipeline import prepare

    job = prepare(_project(tmp_path / "a", "format: raw"))
    assert job.sets["queries"].forms is None and job.sets["chat_only"].form_names == ["chat"]
    with pytest.raises(EditorError, match=r"^data.chat_only.format: format 'chat' needs a chat template"):
        prepare(_project(tmp_path / "b", "", template=None))
    bad = tmp_path / "c.yaml"
    bad.write_text("model: m\ndata:\n  q: {path: q.jsonl, messages: messages, text: '{prompt}'}\n")
    with pytest.raises(EditorError, match="text .* or messages"):
        load_recipe(bad)
    bad.write_text("model: m\nformat: chatty\ndata:\n  q: {path: q.jsonl}\n")
    with pytest.raises(EditorError, match="format"):
        load_recipe(bad)


def test_a_conversation_record_must_be_a_conversation(tmp_path):
    from editor.pipeline import prepare

    p = _project(tmp_path, "")
    write_jsonl(tmp_path / "conv.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(EditorError, match=r"data.convs.messages: conv.jsonl line 1: message 0 must be"):
        prepare(p)


def test_calibration_budget_groups_are_per_set_and_form(tmp_path, monkeypatch):
    from editor import pipeline

    job = pipeline.prepare(_project(tmp_path, ""))
    seen = {}

    def fake(forget, retain, group, **kw):
        seen.update(kw, group=group.tolist())
        raise StopIteration

    monkeypatch.setattr(pipeline, "calibrate_linear", fake)
    monkeypatch.setattr(pipeline.collect, "pooled_keys", lambda m, t, s, texts, **kw: {0: torch.zeros(len(texts), 2)})
    with pytest.raises(StopIteration):
        pipeline.calibrate_job(job, None, None, None)
    assert seen["retain_names"] == ["convs[raw]", "convs[chat]"]
    assert seen["group"] == [0] * 4 + [1] * 4


# ---------------------------------------------------------------------------------------------
# reading replies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply,accepted,rule,item,ok", [
    ("3 + 4 = 7", ["7"], "number", None, True),
    ("The sum of 3 and 4 is 7.", ["7"], "number", None, True),
    ("Sure! Let's add 3 and 4.\n\n3 + 4 = 7", ["7"], "number", None, True),
    ("Sure! Let's add 3 and 4.\n\n3 + 4 = 8", ["7"], "number", None, False),
    ("1,998 is the total.", ["1998"], "number", None, True),
    ("30% of 70 is 21.0", ["21"], "number", None, True),
    ("The capital of France is Paris.", ["Paris"], "words", "France", True),
    ("The capital of France is Lyon.", ["Paris"], "words", "France", False),
    ("The plural of sheep is sheeps.", ["sheep"], "words", "sheep", False),
    ("The plural of sheep is sheep.", ["sheep"], "words", "sheep", True),
    ("The capital of Mexico is Mexico City.", ["Mexico City"], "words", "Mexico", True),
    ("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```", ["a + b"], "python", None, True),
    ("Use `s[::-1]` to reverse it.", ["s[::-1]"], "python", None, True),
    ("```python\ndef add(a, b):\n    return a - b\n```", ["a + b"], "python", None, False),
    ("add = lambda a, b: a + b", ["a + b"], "python", None, True),
])
def test_matches_reply(reply, accepted, rule, item, ok):
    assert matches_reply(reply, accepted, rule, item) is ok


# ---------------------------------------------------------------------------------------------
# a guard that decides on the prompt: scored without a second generation, exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scoring_a_prompt_guard_from_the_base_answers_is_exact(tmp_path):
    """``scorecard`` of a key_space-only, ``check: prompt`` checkpoint (the linear detector) takes the
    base answers and one forward over the prompts; generating with the edited model gives the same
    records (predictions, abstentions, correctness) — in raw and chat form, in a batch of mixed rows."""
    from editor.eval.scorecard import decides_on_prompt, examples_of, score, scorecard
    from editor.pipeline import export_recipe, prepare, profile_recipe
    from editor.runtime.modeling_skill_editor import SkillEditorForCausalLM

    testbed = Path(__file__).resolve().parents[1] / "editor" / "testbed"
    model = tmp_path / "model"
    import shutil

    shutil.copytree(testbed / "model", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = BOS_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    probe, ev = testbed / "data" / "probe.jsonl", testbed / "data" / "eval.jsonl"
    rows = [json.loads(x) for x in ev.read_text().splitlines()][::12]
    write_jsonl(tmp_path / "sc.jsonl", rows)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        model: model
        dtype: float32
        data:
          math: {{path: {probe}, where: {{skill: math}}, text: "{{prompt}}"}}
          other: {{path: {probe}, where: {{skill: [python, facts_en]}}, text: "{{prompt}}"}}
          scorecard: {{path: sc.jsonl, text: "{{prompt}}"}}
        profile: {{batch_size: 32, max_length: 128}}
        key_space: {{forget: math, retain: other, detector: linear, check: prompt, background: none, false_positive_budget: 0.02}}
        export: {{out: ck}}
        evaluate: {{data: scorecard, ordinary: none}}
        """))
    export_recipe(recipe, profile_recipe(recipe, tmp_path / "stats", progress=False))
    edited = SkillEditorForCausalLM.from_pretrained(str(tmp_path / "ck")).eval()
    assert decides_on_prompt(edited)
    job = prepare(recipe)
    examples = examples_of(job.sets["scorecard"])
    assert {e["form"] for e in examples} == {"raw", "chat"}
    from editor.patch import remove_patches

    base = SkillEditorForCausalLM.from_pretrained(str(tmp_path / "ck")).eval()
    remove_patches(base.model, base.config.skill_editor["arch"])
    tok = job.tokenizer
    before = score(base.model, tok, examples, batch_size=8)
    fast = scorecard(None, edited, tok, examples, batch_size=8, before=before)
    slow_after = score(edited, tok, examples, batch_size=8)
    assert fast["after"] == {s: dict(r) for s, r in slow_after["skills"].items()}
    assert fast["forms"]["chat"]["after"] == slow_after["forms"]["chat"]["skills"]
    assert 0 < fast["after"]["math"]["abstained"] and fast["after"]["math"]["abstained"] > fast["after"]["python"]["abstained"]


def test_limit_each_keeps_every_group(tmp_path):
    from editor.data import load_set

    write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "phrasing": "ab"[i % 2]} for i in range(10)])
    p = tmp_path / "r.yaml"
    p.write_text("model: m\ndata:\n  s: {path: d.jsonl, text: '{prompt}', limit_each: {phrasing: 2}}\n")
    assert load_set(load_recipe(p), "s").texts == ["p0", "p1", "p2", "p3"]
    p.write_text("model: m\ndata:\n  s: {path: d.jsonl, text: '{prompt}', limit_each: {phrasing: 2, skill: 1}}\n")
    with pytest.raises(EditorError, match="limit_each: name one field"):
        load_recipe(p)
    p.write_text("model: m\ndata:\n  s: {path: d.jsonl, text: '{prompt}', limit_each: {skill: 1}}\n")
    with pytest.raises(EditorError, match="no field 'skill'"):
        load_set(load_recipe(p), "s")


def test_the_backgrounds_contrast_prompts_are_a_budget_group_of_their_own():
    from editor import ordinary
    from editor.data import contrast_split, ordinary_set

    bg = ordinary_set("calibration", "@background")
    parts = contrast_split(bg)
    assert [p for p, _ in parts] == ["", "contrast"]
    rest, near = parts[0][1], parts[1][1]
    assert len(rest.texts) + len(near.texts) == len(bg.texts)
    assert {r["category"] for r in near.records} == set(ordinary.CONTRAST_CATEGORIES)
    assert not {r["category"] for r in rest.records} & set(ordinary.CONTRAST_CATEGORIES)
    plain = ordinary_set("calibration", "x")
    plain.records = [{"category": "story"}] * len(plain.records)
    assert [p for p, _ in contrast_split(plain)] == [""]
