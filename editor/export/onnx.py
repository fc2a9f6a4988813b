"""ONNX export (DESIGN §4): ``model.onnx`` + ``model.onnx.data`` with a KV cache, Neuron Adjust and
Key Space Detection inside the graph, validated by ONNX Runtime against PyTorch before the
directory appears.

Graph I/O (float dtype = the model's)::

    inputs   input_ids        int64 [batch, sequence]
             attention_mask   int64 [batch, past_sequence + sequence]   (1 = real token, 0 = padding)
             position_ids     int64 [batch, sequence]
             past_key_values.{i}.key / .value   [batch, kv_heads, past_sequence, head_dim]
    outputs  logits           [batch, 1, vocab]          (``logits="last"``, the default: the last position only)
                              [batch, sequence, vocab]   (``logits="all"``: every position)
             present.{i}.key / .value           [batch, kv_heads, past_sequence + sequence, head_dim]
             abstained        bool [batch]   (KSD decision at each row's last real token; all False without KSD)

The first call passes past tensors with ``past_sequence = 0``. ``logits="last"`` is what
``logits_to_keep=1`` gives in transformers: a generator needs the next-token distribution only,
and the full [batch, sequence, vocab] tensor of a long prompt costs sequence × vocab × 4 bytes per row
(8 prompts of 236 tokens × 262 144 entries = 1.9 GiB for Gemma-3). Left-pad batches (as
``OnnxGenerator`` and ``generate`` do) so that the last position is every row's last real token;
export with ``logits="all"`` (recipe ``export.onnx_logits: all``) to score whole sequences.

The same model exports to the same bytes (the graph, its data and ``skill_editor.json``, which holds no timings). Weights are **always** stored as
external data (``model.onnx.data`` beside ``model.onnx``): one layout for every size, no 2 GB
protobuf limit to cross, and the graph file stays small enough to inspect. Keep both files together.

The directory also holds the tokenizer files, ``generation_config.json``, the model card and
``skill_editor.json`` (the manifest of ``editor.manifest`` plus an ``onnx`` section: the base model's
config, the graph's I/O names and shapes, the validation figures; and the sha256 of every other
file). There is deliberately no ``config.json``: with one, transformers 5's ``AutoTokenizer`` picks
the tokenizer class of its ``model_type`` over the saved generic one (a character tokenizer saved as
``TokenizersBackend`` reloads as ``Qwen2Tokenizer`` and tokenizes differently), and nothing here is
loadable by ``from_pretrained`` anyway. ``editor.onnx_runtime.OnnxGenerator`` runs it with ONNX
Runtime alone.

Validation (``validate_onnx``) compares the returned logits with PyTorch's with a tolerance that
scales with them: at each compared position, max |ONNX − PyTorch| ≤ ``atol`` + ``rtol`` × the
position's largest |logit| (float32 rounding grows with the size of the numbers it rounds, so a fixed
absolute limit rejects large-logit models such as Gemma-3 while an edit defect still moves the
logits by orders of magnitude more; see docs/ONNX.md for the figures).

NA must be in ``expected`` or ``hard`` mode (``sample`` draws random numbers per element, which an
exported graph cannot reproduce bit-for-bit); KSD runs as in PyTorch, per row, at the last real token.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from editor import __version__
from editor.errors import EditorError
from editor.export.card import build_card
from editor.io import atomic_directory, check_destination
from editor.manifest import (
    CARD,
    EDIT_KEY,
    GRAPH_FORMAT_KEY,
    MANIFEST,
    ONNX_DATA,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    ONNX_MODEL,
    write_manifest,
)
from editor.model.tokens import eos_ids, pad_id
from editor.runtime.modeling_skill_editor import (
    CACHE_KEY,
    NeuronAdjust,
    SkillEditorForCausalLM,
    guard_decision,
    guards_of,
)

DEFAULT_STEPS = 8
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Q: What is 12 + 7?\nA:",
    "def add(a, b):",
    "Hi",
    "Le chat est sur",
)

# example sizes for tracing: distinct and > 1 so that no dimension gets specialised or unified
_EX_BATCH, _EX_SEQ, _EX_PAST = 3, 4, 6

LOGITS = ("last", "all")
# the validation's logits tolerance: |ONNX − PyTorch| ≤ atol + rtol × (the position's largest |logit|).
# float32: rtol 1e-4 (≈ 840 ulps of the largest logit). Measured (docs/ONNX.md): ONNX Runtime differs
# from PyTorch by ≤ 2.1e-6 of it on the tiny test models and ≤ 1.9e-5 on SmolLM2 (every position of
# 8 prompts, 30 layers; 3.2e-6 at the last positions), while a 1 % error in one NA constant of one
# of SmolLM2's 30 layers moves the logits by 3.8e-4 of it (tiny models: 2.2e-3), a formula-level one
# (c + ln 2) by 1.6e-2. KSD bounds are checked exactly through ``abstained``.
# 16-bit: their ulp is 2^-10 (float16) of the value, so 1e-2 of it (~10 ulps) plus the absolute floor.
DEFAULT_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-2, 1e-2)}  # dtype: (atol, rtol)


class OnnxExportResult(dict):
    """The export's figures (a dict) that also stands for the directory: ``Path(result)`` and
    ``str(result)`` give ``result["out"]``, so callers that only want the path can use it as one."""

    def __fspath__(self) -> str:
        return self["out"]

    def __str__(self) -> str:
        return self["out"]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs + ["abstained"]


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EditorError(f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'skill-editor[onnx]'") from e


def _split(model: nn.Module) -> tuple[nn.Module, dict | None]:
    """(base causal LM, edit dict or None)."""
    if isinstance(model, SkillEditorForCausalLM):
        return model.model, dict(model.config.skill_editor or {})
    return model, None


def _check_exportable(base: nn.Module) -> None:
    for name, m in base.named_modules():
        if isinstance(m, NeuronAdjust) and m.n > 0 and m.mode not in ("expected", "hard"):
            raise EditorError(
                f"ONNX export needs neuron_adjust.mode 'expected' or 'hard' (a graph cannot reproduce the seeded per-element "
                f"draws of {m.mode!r}); {name} uses {m.mode!r}"
            )


def _layer_count(cache) -> int:
    return len(cache.layers) if hasattr(cache, "layers") else len(cache)


def _cache_tensors(cache) -> list[torch.Tensor]:
    out = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            out += [layer.keys, layer.values]
    else:  # legacy tuple cache
        for k, v in cache:
            out += [k, v]
    return out


def _keeps_logits(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (every supported architecture in transformers 5)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def forward_kwargs(model: nn.Module, cache, logits: str) -> dict:
    """The keywords of one cached forward call: the KV cache under the name the installed transformers
    supports (``CACHE_KEY``: ``cache`` from 5.24, ``past_key_values`` before — never the deprecated
    alias) and, for ``logits="last"``, ``logits_to_keep=1`` (the LM head runs on the last position only)."""
    kw = {CACHE_KEY: cache, "use_cache": True}
    if logits == "last" and _keeps_logits(model):
        kw["logits_to_keep"] = 1
    return kw


def kept_logits(out_logits: torch.Tensor, logits: str) -> torch.Tensor:
    """The logits the graph returns: the last position (``last``; a no-op after ``logits_to_keep=1``) or all."""
    return out_logits[:, -1:] if logits == "last" else out_logits


class OnnxExportModule(nn.Module):
    """The exported function: flat past tensors in, logits + flat present tensors + ``abstained`` out.

    Builds a ``DynamicCache`` (full-attention layers, no config: sliding windows are applied by the
    model's masks, the cache keeps every position) from the flat past, runs the model (the
    checkpoint class when the model is edited, so its ``forward`` computes ``abstained``), and
    flattens the present cache. ``logits``: ``last`` (the last position's logits, [batch, 1, vocab])
    or ``all`` ([batch, sequence, vocab]).
    """

    def __init__(self, model: nn.Module, num_layers: int, logits: str = "last"):
        super().__init__()
        if logits not in LOGITS:
            raise EditorError(f"ONNX logits must be one of {', '.join(LOGITS)}, got {logits!r}")
        self.model = model
        self.base, self.edit = _split(model)
        self.num_layers = num_layers
        self.guards = guards_of(self.base)
        self.logits = logits

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **forward_kwargs(self.model, cache, self.logits))
        batch, seq = input_ids.shape[0], input_ids.shape[1]
        abstained = getattr(out, "abstained", None)
        if abstained is None and self.guards:  # a patched model that was not wrapped
            abstained = guard_decision(self.guards, attention_mask, batch, seq, out.logits.device)
        if abstained is None:
            abstained = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        present = _cache_tensors(out[CACHE_KEY])
        return (kept_logits(out.logits, self.logits), *present, abstained)


def _past_shapes(base: nn.Module, device) -> tuple[int, list[tuple[int, ...]], torch.dtype]:
    """Number of cache layers and the [kv_heads, head_dim] tail of every past tensor, by running the model once."""
    ids = torch.full((1, 2), _safe_token(base), dtype=torch.long, device=device)
    with torch.no_grad():
        kw = {"logits_to_keep": 1} if _keeps_logits(base) else {}
        out = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
    guard_decision(guards_of(base), None, ids.shape[0], ids.shape[1], device)  # a probe, no real call: drop its record
    cache = out[CACHE_KEY]
    tensors = _cache_tensors(cache)
    return _layer_count(cache), [tuple(t.shape) for t in tensors], tensors[0].dtype


def _safe_token(base: nn.Module) -> int:
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab = int(getattr(cfg, "vocab_size", 8) or 8)
    return min(5, vocab - 1)


def _example_inputs(base, shapes, dtype, device):
    vocab = int(base.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (_EX_BATCH, _EX_SEQ), generator=g).to(device)
    mask = torch.ones(_EX_BATCH, _EX_PAST + _EX_SEQ, dtype=torch.long)
    mask[1, :2] = 0  # some left padding in the past: keeps the traced mask path general
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -_EX_SEQ:].clone()  # a view would trace its base's strides
    past = [torch.randn(_EX_BATCH, s[1], _EX_PAST, *s[3:], generator=g).to(device=device, dtype=dtype) for s in shapes]
    return ids, mask.to(device), pos.to(device), past


def _dynamic_shapes(n_past: int):
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past} for _ in range(n_past)],
    }


@contextlib.contextmanager
def _quiet(enabled: bool = True):
    """torch.onnx prints progress lines and warns about naming details; keep the CLI output clean."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _name_dims(onnx_model, num_layers: int, logits: str = "all") -> None:
    """Readable names for the dynamic axes (torch.export picks its own for the mask length)."""
    names = {"input_ids": ["batch", "sequence"], "position_ids": ["batch", "sequence"],
             "attention_mask": ["batch", "total_sequence"],
             "logits": ["batch", "sequence" if logits == "all" else None, None],
             "abstained": ["batch"]}
    for i in range(num_layers):
        for kind in ("key", "value"):
            names[f"past_key_values.{i}.{kind}"] = ["batch", None, "past_sequence", None]
            names[f"present.{i}.{kind}"] = ["batch", None, "total_sequence", None]
    for value in list(onnx_model.graph.inputs) + list(onnx_model.graph.outputs):
        want = names.get(value.name)
        if want is None or value.shape is None:
            continue
        dims = list(value.shape)
        if len(dims) != len(want):
            continue
        from onnx_ir import Shape, SymbolicDim

        new = [SymbolicDim(w) if (w is not None and not isinstance(d, int)) else d for d, w in zip(dims, want)]
        value.shape = Shape(new)


def export_onnx(model: nn.Module, tokenizer, out_dir, *, opset: int | None = None, validate: bool = True,
                manifest: dict | None = None, overwrite: bool = False, prompts: list[str] | None = None,
                steps: int = DEFAULT_STEPS, atol: float | None = None, rtol: float | None = None, logits: str = "last",
                quiet: bool = True, echo=None) -> OnnxExportResult:
    """Export ``model`` (a wrapped patched model — ``editor.patch.wrap`` — or a plain base model) to
    ``out_dir`` as ONNX and, with ``validate``, check it with ONNX Runtime against PyTorch.

    ``manifest``: ``skill_editor.json`` without its file digests (``editor.manifest.build_manifest``):
    the base of the one written here (the ``onnx`` section and the digests are added) and of the
    model card; without it, a minimal one and no card. ``prompts``: validation prompts (default: a few
    generic ones; pass forget and retain prompts to exercise the abstention). ``atol`` / ``rtol``: the
    validation's logits tolerance, |ONNX − PyTorch| ≤ atol + rtol × (the position's largest |logit|)
    (defaults: ``DEFAULT_TOLERANCE`` of the model's dtype). ``logits``: ``last`` (default; the graph
    returns the last position's logits, as ``logits_to_keep=1``) or ``all`` (every position).

    Returns ``{"out", "files" (bytes per file), "export_seconds", "validation", ...}`` (an
    ``OnnxExportResult``: a dict that is also path-like, ``Path(result) == Path(out_dir)``); raises
    ``EditorError`` on a model it cannot export or when the validation fails (nothing is written).
    """
    _require_onnx()
    check_destination(out_dir, overwrite)  # fail before the (long) export, not after it
    base, edit = _split(model)
    _check_exportable(base)
    if steps < 1:
        raise EditorError(f"validation steps must be >= 1, got {steps}")
    if logits not in LOGITS:
        raise EditorError(f"ONNX logits must be one of {', '.join(LOGITS)}, got {logits!r}")
    dtype = next(base.parameters()).dtype
    if dtype == torch.bfloat16 and validate:
        raise EditorError("ONNX Runtime's CPU provider has no bfloat16 kernels, so a bfloat16 graph cannot be validated: "
                          "load the model as float32 (recipe dtype: float32) or float16 for the ONNX export")
    atol, rtol = tolerance(dtype, atol, rtol)
    device = next(base.parameters()).device
    was_training = model.training
    model.eval()
    try:
        n_layers, shapes, kv_dtype = _past_shapes(base, device)
    finally:
        model.train(was_training)
    in_names, out_names = io_names(n_layers)

    wrapper = OnnxExportModule(model, n_layers, logits).eval()
    ids, mask, pos, past = _example_inputs(base, shapes, kv_dtype, device)
    t0 = time.perf_counter()
    model.eval()
    try:
        with _quiet(quiet), torch.no_grad():
            program = torch.onnx.export(
                wrapper, (ids, mask, pos, past), dynamo=True, dynamic_shapes=_dynamic_shapes(len(past)),
                input_names=in_names, output_names=out_names, opset_version=opset, optimize=True, verbose=False,
            )
    except EditorError:
        raise
    except Exception as e:  # torch.export / onnxscript errors are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditorError(f"ONNX export failed: {type(e).__name__}: {first}") from e
    finally:
        model.train(was_training)
    export_seconds = time.perf_counter() - t0

    onnx_model = program.model
    _name_dims(onnx_model, n_layers, logits)
    if edit is not None:
        onnx_model.metadata_props[EDIT_KEY] = json.dumps(edit, sort_keys=True)
    onnx_model.metadata_props[GRAPH_FORMAT_KEY] = ONNX_FORMAT
    opset_used = int(onnx_model.opset_imports.get("", 0))

    meta_io = {
        "inputs": in_names, "outputs": out_names, "num_layers": n_layers,
        "past_shape": [[None, s[1], None, *s[3:]] for s in shapes],
        "dtype": str(kv_dtype).replace("torch.", ""), "opset": opset_used,
        "external_data": ONNX_DATA, "logits": logits,
        "logits_shape": ["batch", 1 if logits == "last" else "sequence", "vocab"],
    }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        with _quiet(quiet):
            program.save(str(tmp / ONNX_MODEL), external_data=True)
        # the exported program holds the graph and its own copies of some weights (folded constants):
        # the validation below loads the saved files, so release them first
        del program, onnx_model
        gc.collect()
        if not (tmp / ONNX_DATA).exists():  # pragma: no cover - onnxscript naming changed
            raise EditorError(f"ONNX export did not write {ONNX_DATA}")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        gen_cfg = getattr(base, "generation_config", None)
        if gen_cfg is not None:
            gen_cfg.save_pretrained(str(tmp))
        if manifest is not None:
            (tmp / CARD).write_text(str(build_card({**manifest, "onnx": {"logits": logits}}, fmt="onnx")), encoding="utf-8")

        validation = None
        if validate:
            validation = validate_onnx(model, tokenizer, tmp, prompts=prompts, steps=steps, atol=atol, rtol=rtol,
                                       logits=logits)

        meta = dict(manifest or {"format": ONNX_FORMAT, "tool": "skill-editor", "tool_version": __version__, "kind": "onnx"})
        if edit is not None:
            meta.setdefault("edit", edit)
        ks = (edit or {}).get("key_space") or {}
        # no timings in the file: the same model gives the same bytes
        meta["onnx"] = {**meta_io, "format": ONNX_FORMAT, "version": ONNX_FORMAT_VERSION, "validation": validation,
                        "base_config": base.config.to_dict(), "refusal": ks.get("refusal"),
                        "pad_token_id": pad_id(tokenizer, base), "eos_token_id": eos_ids(tokenizer, base)}
        write_manifest(tmp, meta)  # the sha256 of this directory's files, every one
        for p in tmp.iterdir():
            if p.is_file():
                os.chmod(p, 0o644)
        # read here: inside ``io.replaced_together`` (``run``) the directory is put in place later
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}

    out = Path(out_dir)
    result = OnnxExportResult({
        "out": str(out), "model": str(out / ONNX_MODEL), "export_seconds": round(export_seconds, 3),
        "files": sizes, "onnx_bytes": sizes.get(ONNX_MODEL, 0) + sizes.get(ONNX_DATA, 0),
        "opset": opset_used, "validation": validation,
    })
    if echo is not None:
        echo(summary_line(result))
    return result


def tolerance(dtype: torch.dtype, atol: float | None = None, rtol: float | None = None) -> tuple[float, float]:
    """(atol, rtol) of the validation for a model of ``dtype``: the given ones, else ``DEFAULT_TOLERANCE``'s."""
    default_atol, default_rtol = DEFAULT_TOLERANCE.get(dtype, DEFAULT_TOLERANCE[torch.float16])
    atol = default_atol if atol is None else float(atol)
    rtol = default_rtol if rtol is None else float(rtol)
    if not (atol >= 0 and rtol >= 0) or atol == rtol == 0:
        raise EditorError(f"ONNX validation tolerance must be >= 0 and not both 0, got atol {atol:g}, rtol {rtol:g}")
    return atol, rtol


def summary_line(result: dict) -> str:
    mb = result["onnx_bytes"] / 1e6
    line = f"ONNX export: {result['out']} ({mb:.1f} MB, exported in {result['export_seconds']:.1f} s)"
    v = result.get("validation")
    if v:
        line += (f"; ORT validation: logits max |diff| {v['max_abs_diff']:.2e} = {v['max_rel_diff']:.1e} of the largest "
                 f"|logit| ({v['max_tolerance_used']:.0%} of the tolerance {v['atol']:.0e} + {v['rtol']:.0e} × it), "
                 f"{v['greedy_steps']} greedy steps token-identical"
                 + (f" ({v['greedy_ties']} near-ties)" if v.get("greedy_ties") else "")
                 + f", abstention agrees on {v['abstention_checks']} row-steps")
    return line


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def _batches(tokenizer, base, prompts: list[str] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded (input_ids, attention_mask) batches: all prompts together, one alone, and random ids of
    several lengths (1 token included)."""
    vocab = int(base.get_input_embeddings().weight.shape[0])
    pad = pad_id(tokenizer, base)
    texts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    batches = []
    if tokenizer is not None:
        encoded = [list(tokenizer(t)["input_ids"]) for t in texts]
        encoded = [e for e in encoded if e]
        if encoded:
            batches.append(_left_pad(encoded, pad))
            batches.append(_left_pad([min(encoded, key=len)], pad))
    g = torch.Generator().manual_seed(1)
    lengths = [1, 3, 7]
    rand = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    batches.append(_left_pad(rand, pad))
    return batches


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s):] = 1
    return ids, mask


def _session(model_path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or max(1, torch.get_num_threads()))
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model_path), sess_options=so, providers=["CPUExecutionProvider"])


def _graph_logits(sess) -> str:
    """``last`` when the graph's ``logits`` output has a sequence axis of 1 (``export_onnx(logits="last")``), else ``all``."""
    shape = next(o.shape for o in sess.get_outputs() if o.name == "logits")
    return "last" if len(shape) == 3 and shape[1] == 1 else "all"


class _Diff:
    """Running comparison of ONNX Runtime's logits with PyTorch's, one batch row at a time (the
    temporaries are [positions, vocab] of one row, never [batch, positions, vocab] copies)."""

    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.max_abs = self.max_rel = self.max_used = 0.0
        self.positions = 0

    def row(self, got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
        """``got`` / ``ref`` [positions, vocab] (float32): (worst |diff|, its position's scale, tolerance used)."""
        ref = ref.float()
        d = (got.float() - ref).abs().amax(-1)  # [positions]
        scale = ref.abs().amax(-1)
        tol = self.atol + self.rtol * scale
        used = d / tol
        k = int(torch.nan_to_num(used, nan=math.inf).argmax())
        worst, sc, u = float(d[k]), float(scale[k]), float(used[k])
        self.positions += int(d.numel())
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float((d / scale.clamp(min=torch.finfo(torch.float32).tiny)).max()))
        self.max_used = max(self.max_used, u) if u == u else math.nan
        return worst, sc, u


@torch.no_grad()
def validate_onnx(model: nn.Module, tokenizer, out_dir, *, prompts: list[str] | None = None, steps: int = DEFAULT_STEPS,
                  atol: float | None = None, rtol: float | None = None, logits: str | None = None) -> dict:
    """Compare ONNX Runtime (CPU EP) with PyTorch: the logits the graph returns (the last position of
    every call for a ``logits="last"`` graph — read from the graph when ``logits`` is None —, every
    real position for ``all``: padding positions carry no meaning and are excluded), ``abstained`` at
    every call, and ``steps`` greedy decoding steps through the KV cache (token-identical; a step whose
    top two PyTorch logits are within the tolerance counts as a tie; the cached positions are checked
    through these steps). Tolerance per compared position: |diff| ≤ ``atol`` + ``rtol`` × the
    position's largest |PyTorch logit| (defaults: ``DEFAULT_TOLERANCE`` of the model's dtype).
    PyTorch computes only the logits that are compared (``logits_to_keep``), and the differences are
    reduced row by row. Raises ``EditorError`` when they disagree."""
    import numpy as np

    base, _ = _split(model)
    guards = guards_of(base)
    try:
        sess = _session(Path(out_dir) / ONNX_MODEL)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditorError(f"ONNX validation failed: ONNX Runtime cannot load {ONNX_MODEL}: {first}") from e
    logits = logits or _graph_logits(sess)
    if logits not in LOGITS:
        raise EditorError(f"ONNX logits must be one of {', '.join(LOGITS)}, got {logits!r}")
    was_training = model.training
    model.eval()
    names = [o.name for o in sess.get_outputs()]
    device = next(base.parameters()).device
    n_layers, shapes, kv_dtype = _past_shapes(base, device)
    atol, rtol = tolerance(next(base.parameters()).dtype, atol, rtol)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(kv_dtype, np.float32)
    diff = _Diff(atol, rtol)
    checks, compared_steps, ties, rows_abstained = 0, 0, 0, 0

    def run_ort(ids, mask, pos, past_np):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
        for i in range(n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past_np[2 * i], past_np[2 * i + 1]
        return dict(zip(names, sess.run(None, feed)))

    def run_torch(ids, mask, pos, cache):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    **forward_kwargs(model, cache, logits))
        ab = getattr(out, "abstained", None)
        if ab is None and guards:
            ab = guard_decision(guards, mask.to(device), ids.shape[0], ids.shape[1], device)
        if ab is None:
            ab = torch.zeros(ids.shape[0], dtype=torch.bool)
        return kept_logits(out.logits, logits).cpu(), out[CACHE_KEY], ab.cpu()

    def compare(tag, ort_out, ref, ab, keep_mask):
        """``ref`` [batch, kept, vocab] (PyTorch); ``keep_mask`` [batch, kept]: the positions compared."""
        nonlocal checks, rows_abstained
        got = np.asarray(ort_out["logits"])
        if tuple(got.shape) != tuple(ref.shape):
            raise EditorError(f"ONNX validation failed ({tag}): logits shape {tuple(got.shape)} != {tuple(ref.shape)}")
        for r in range(ref.shape[0]):
            keep = keep_mask[r].bool()
            if not bool(keep.any()):
                continue
            worst, scale, used = diff.row(torch.from_numpy(got[r])[keep], ref[r][keep])
            if not used <= 1.0:  # NaN fails too
                raise EditorError(
                    f"ONNX validation failed ({tag}): logits max |diff| {worst:.3e} in row {r} > tolerance "
                    f"{atol + rtol * scale:.3e} (atol {atol:.0e} + rtol {rtol:.0e} × the position's largest |logit| "
                    f"{scale:.3g}; recipe export.onnx_tolerance sets rtol)")
        ort_ab = torch.from_numpy(np.asarray(ort_out["abstained"]).astype(bool))
        if not torch.equal(ort_ab, ab.bool()):
            hint = "" if kv_dtype == torch.float32 else f" (a key on the KSD box boundary flips under {kv_dtype} rounding)"
            raise EditorError(f"ONNX validation failed ({tag}): abstained {ort_ab.tolist()} (ONNX Runtime) != "
                              f"{ab.tolist()} (PyTorch){hint}")
        checks += ab.numel()
        rows_abstained += int(ab.sum())

    try:
        for b, (ids, mask) in enumerate(_batches(tokenizer, base, prompts)):
            batch, seq = ids.shape
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            past_np = [np.zeros((batch, s[1], 0, *s[3:]), dtype=np_dtype) for s in shapes]
            ref, cache, ab = run_torch(ids, mask, pos, None)
            o = run_ort(ids, mask, pos, past_np)
            # left padding: the last position is every row's last real token
            compare(f"batch {b}, prompt", o, ref, ab, mask if logits == "all" else mask[:, -1:])
            past_np = [o[n] for n in names[1:-1]]
            for step in range(steps):
                last = ref[:, -1].float()
                nxt = last.argmax(-1)
                ort_next = torch.from_numpy(np.asarray(o["logits"][:, -1], dtype=np.float32)).argmax(-1)
                for r in (ort_next != nxt).nonzero()[:, 0].tolist():
                    gap = float(last[r, nxt[r]] - last[r, ort_next[r]])
                    if gap > atol + rtol * float(last[r].abs().max()):
                        raise EditorError(f"ONNX validation failed (batch {b}, step {step}): greedy token {int(ort_next[r])} "
                                          f"(ONNX Runtime) != {int(nxt[r])} (PyTorch) in row {r}")
                    ties += 1
                compared_steps = max(compared_steps, step + 1)
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                pos = pos[:, -1:] + 1
                del ref, o  # the previous call's logits, before the next call allocates its own
                ref, cache, ab = run_torch(ids, mask, pos, cache)
                o = run_ort(ids, mask, pos, past_np)
                compare(f"batch {b}, step {step + 1}", o, ref, ab, torch.ones(batch, 1))
                past_np = [o[n] for n in names[1:-1]]
            del ref, cache, o, past_np
    except EditorError:
        raise
    except Exception as e:  # an ONNX Runtime kernel or shape error: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditorError(f"ONNX validation failed: {type(e).__name__}: {first}") from e
    finally:
        model.train(was_training)
    return {"max_abs_diff": diff.max_abs, "max_rel_diff": diff.max_rel, "max_tolerance_used": diff.max_used,
            "atol": atol, "rtol": rtol, "logits": logits, "positions": diff.positions,
            "greedy_steps": compared_steps, "greedy_ties": ties,
            "abstention_checks": checks, "abstained_row_steps": rows_abstained, "agree": True}
