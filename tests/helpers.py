"""Shared builders of the tests: JSONL sets, tiny end-to-end projects (a random model of
``tests.tiny`` + data + recipe), the CLI, and padded token batches. Test modules import from here
(and ``tests.tiny`` / ``tests.reference*``), never from each other."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from click.testing import CliRunner

from tests.tiny import VOCAB, save_tiny

# the tiny projects' data: a forget skill (sums), a retain skill (short sentences), scorecard records
FORGET = [f"{a} + {b} = {a + b}" for a, b in [(3, 4), (12, 7), (25, 31), (8, 9), (40, 2), (17, 6), (5, 55), (21, 21),
                                              (9, 90), (33, 3)]]
RETAIN = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "she reads a long book",
          "rain falls on the roof", "we walk by the river", "he paints the old door", "the sun is warm today",
          "they cook rice and beans", "my friend likes green tea"]
EVAL = ([{"prompt": t[: t.index("=") + 1], "answer": t.split("= ")[1], "skill": "math"} for t in FORGET[:4]]
        + [{"prompt": t[:8], "answer": t[8:12], "skill": "other"} for t in RETAIN[:4]])

SETS = {"forget": "{path: forget.jsonl}", "retain": "{path: retain.jsonl}"}

# the key_space calibration's projects: probe queries, enough of them for K-fold cross-validation
QUERIES = {
    "forget": [f"{a} + {b} = " for a in (3, 12, 25, 8, 40, 17, 5, 21, 9, 33) for b in (4, 19)],
    "retain": [f"the {w} {v} on the {o}" for w in ("cat", "dog", "bird", "man", "cow", "fox")
               for v in ("sat", "ran", "slept") for o in ("mat", "rug")],
    "eval": [{"prompt": f"{a} plus {b} is ", "answer": str(a + b), "skill": "math"} for a, b in [(2, 3), (7, 1)]]
    + [{"prompt": "a hen sat on the ", "answer": "log", "skill": "text"}],
}
QUERY_SETS = {"forget": "{path: forget.jsonl}", "retain": "{path: retain.jsonl}",
              "answers": '{path: forget.jsonl, text: "{text}1"}', "scorecard": '{path: eval.jsonl, text: "{prompt}"}'}


def calibration_project(make_project, name: str, key_space: str) -> Path:
    """The calibration tests' project: NA on answers vs retain, the given ``key_space`` line, a
    scorecard on eval.jsonl (which the calibration must never read). Returns its directory."""
    return make_project(name, f"""\
        neuron_adjust: {{forget: answers, retain: retain, top_percent: 5, mode: expected, seed: 0}}
        {key_space}
        evaluate: {{data: scorecard}}
        """, files=QUERIES, sets=QUERY_SETS, profile="{batch_size: 8, max_length: 32}").parent


def write_jsonl(path: Path, rows) -> Path:
    """One JSON object per line; a plain string row becomes ``{"text": row}``."""
    path.write_text("".join(json.dumps({"text": r} if isinstance(r, str) else r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_project(root: Path, methods: str = "", *, arch: str = "llama", dtype: str = "float32", seed: int = 0,
                 files: dict[str, list] | None = None, sets: dict[str, str] | None = None,
                 profile: str | None = "{batch_size: 4, max_length: 32}", export: str | None = "{out: out}",
                 name: str = "recipe.yaml") -> Path:
    """A tiny end-to-end project in ``root``: ``model/`` (a random ``arch`` of ``tests.tiny``, made
    once per directory), the JSONL ``files`` ({stem: rows}; default ``forget`` / ``retain`` /
    ``eval`` of FORGET / RETAIN / EVAL) and the recipe ``name`` with the data ``sets`` (set name →
    YAML flow mapping; default forget + retain), ``profile``, ``export`` and the ``methods`` lines
    (neuron_adjust / key_space / prune / evaluate). Returns the recipe's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model").exists():
        save_tiny(arch, root / "model", seed=seed, dtype=getattr(torch, dtype))
    for stem, rows in (files or {"forget": FORGET, "retain": RETAIN, "eval": EVAL}).items():
        write_jsonl(root / f"{stem}.jsonl", rows)
    lines = ["model: model", f"dtype: {dtype}", "device: cpu", "data:"]
    lines += [f"  {k}: {v}" for k, v in (sets or SETS).items()]
    if profile is not None:
        lines.append(f"profile: {profile}")
    if export is not None:
        lines.append(f"export: {export}")
    recipe = root / name
    recipe.write_text("\n".join(lines) + "\n" + textwrap.dedent(methods), encoding="utf-8")
    return recipe


def cli(*args, ok: bool = True):
    """Run the ``skill-editor`` CLI in-process; with ``ok``, assert it succeeded."""
    from editor.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, f"{args}: exit {res.exit_code}: {res.output}"
    return res


def random_rows(seed: int, n: int, lo: int = 6, hi: int = 12, suffix=()) -> list[list[int]]:
    """``n`` random token rows (BOS first) of ``lo``..``hi`` tokens for ``tests.tiny`` models."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (), generator=g))
        out.append([1] + torch.randint(3, VOCAB, (length,), generator=g).tolist() + list(suffix))
    return out


def pad(rows, side):
    """(input_ids, attention_mask) of token rows padded with 0 on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def patched_model(arch: str, mode: str = "expected", *, ksd: bool = True, forget=("What is 2+2?", "Compute 7*8."),
                  refusal: str = "Sorry.", scale: float = 1.5, seed: int = 0, model=None, tokenizer=None):
    """A tiny model (``tests.tiny``, or ``model`` / ``tokenizer``) with a synthetic NA plan (20 % of the
    neurons) and a KSD box on the last layer fitted on the keys of ``forget`` (scale 1.5: with two
    probes each sits on the k-boundary, the margin keeps them inside), wrapped as the checkpoint
    class. Returns (wrapped model, tokenizer)."""
    from editor.methods.key_space import ksd_bounds
    from editor.methods.neuron_adjust import Gaussian, plan_neuron_adjust
    from editor.model.arch import decoder_layers, spec_for
    from editor.patch import apply_key_space, apply_neuron_adjust, build_edit, refusal_token_ids, wrap
    from editor.plan import Plans
    from tests.tiny import char_tokenizer, tiny_model

    m = model if model is not None else tiny_model(arch, seed=seed)
    tok = tokenizer if tokenizer is not None else char_tokenizer()
    spec = spec_for(m.config)
    n_layers = len(decoder_layers(m, spec))
    width = decoder_layers(m, spec)[0].get_submodule(spec.down)
    width = int(width.weight.shape[0] if spec.layout == "conv1d" else width.weight.shape[1])
    g = torch.Generator().manual_seed(1)

    def gauss():
        return Gaussian.of(torch.randn(width, generator=g) * 0.3, torch.rand(width, generator=g) + 0.5)

    plan = plan_neuron_adjust({i: gauss() for i in range(n_layers)}, {i: gauss() for i in range(n_layers)},
                              top_percent=20, mode=mode, seed=0)
    apply_neuron_adjust(m, spec, m.config.model_type, plan)
    bounds = None
    if ksd:
        layer = n_layers - 1
        down = decoder_layers(m, spec)[layer].get_submodule(spec.down)
        keys = []
        h = down.register_forward_pre_hook(lambda mod, args: keys.append(args[0].reshape(-1, args[0].shape[-1])[-1].detach()))
        try:
            with torch.no_grad():
                for p in forget:
                    m(**tok(p, return_tensors="pt"))
        finally:
            h.remove()
        k = torch.stack(keys).double()
        bounds = {layer: ksd_bounds(k.mean(0), k.std(0), k.min(0).values, k.max(0).values, scale=scale)}
        apply_key_space(m, spec, m.config.model_type, bounds)
    edit = build_edit(m.config.model_type, m, Plans(plan, bounds or {}), refusal=refusal if ksd else None,
                    refusal_ids=refusal_token_ids(tok, refusal) if ksd else None)
    return wrap(m, edit.config()), tok
