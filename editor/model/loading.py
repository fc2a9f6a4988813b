"""Loading the base model, its config and tokenizer for a recipe (device and dtype policy)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch

from editor.errors import EditorError
from editor.manifest import EDIT_KEY, is_patched_config
from editor.model import dequantized
from editor.model.arch import check_mapping, config_d_ff, config_layers, resolve_layer, spec_for
from editor.model.packaged import PACKAGE_SCHEME, file_sha256, resolve_package
from editor.recipe import Dtype, Recipe

log = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, name) for name in get_args(Dtype) if name != "auto"}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads the model: ``ref`` (a directory or a Hub id) and, for a GGUF
    model, ``gguf_file`` inside it; ``local_file``: the GGUF file on disk (hashed for provenance)."""

    ref: str
    gguf_file: str | None = None
    local_file: Path | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_source(recipe: Recipe) -> ModelSource:
    """Resolve ``model`` (+ ``gguf_file``): ``package:NAME[/FILE.gguf]`` (a GGUF file inside an
    installed package, or a chunked one of ``editor.model.packaged.CHUNKED`` assembled into the
    cache), a local ``.gguf`` file, a local directory (relative to the recipe file) or a Hub id."""
    m = recipe.model
    if m.startswith(PACKAGE_SCHEME):
        d, file = resolve_package(m, recipe.gguf_file)
        return ModelSource(str(d), file, d / file)
    local = recipe.resolve(m)
    if not local.exists() and (m.startswith((".", "/", "~")) or m.count("/") > 1 or Path(m).is_absolute()):
        raise EditorError(f"model: local directory not found: {m} ({local.resolve()}; a Hub id is 'name' or 'namespace/name')")
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise EditorError(f"model: GGUF file not found: {m}")
        return ModelSource(str(local.parent), local.name, local)
    if local.exists():
        gguf = local / recipe.gguf_file if recipe.gguf_file else None
        if gguf is not None and not gguf.is_file():
            raise EditorError(f"gguf_file: {recipe.gguf_file!r} is not a file in {m}")
        return ModelSource(str(local), recipe.gguf_file, gguf)
    return ModelSource(m, recipe.gguf_file)


def model_file_identity(recipe: Recipe) -> dict:
    """What the statistics and the checkpoint record of the base model: the recipe's ``model`` as
    written (never a resolved path of this machine), its revision, and for a GGUF model the file's
    name and sha256."""
    src = model_source(recipe)
    out = {"model": recipe.recorded_model, "revision": recipe.revision or ""}
    if src.gguf_file:
        out["gguf_file"] = src.gguf_file
        if src.local_file is not None:
            out["gguf_sha256"] = file_sha256(src.local_file)
    return out


class _NotPacked(logging.Filter):
    """transformers ≥ 5.25 warns, for any GGUF load in a dtype other than float32, that "its weights
    packed" compute fastest in float32 — but the architectures this tool edits (llama, qwen2, …) go
    through its legacy loader, which dequantizes every tensor to plain ``nn.Linear`` weights in the
    asked dtype: nothing stays packed, and the advice would mislead. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Loading a GGUF checkpoint with its weights packed")


_NOT_PACKED = _NotPacked()


def _need_gguf(src: ModelSource) -> None:
    if src.gguf_file:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise EditorError("model: reading a GGUF file needs the gguf package (pip install 'skill-editor[gguf]')") from None


def _read(recipe: Recipe, src: ModelSource, auto, kind: str, same):
    """``auto.from_pretrained`` (AutoConfig / AutoTokenizer) of the recipe's model; a local GGUF file's
    is parsed once and then read from its saved copy in the cache (``dequantized.cached_metadata``),
    under the file's name as when parsed."""
    def from_file():
        return auto.from_pretrained(src.ref, revision=recipe.revision, trust_remote_code=recipe.trust_remote_code,
                                    **src.kwargs())

    if not (src.gguf_file and src.local_file is not None):
        return from_file()
    obj = dequantized.cached_metadata(src.local_file, kind, from_file, auto.from_pretrained, same)
    obj.name_or_path = src.ref
    return obj


def load_config(recipe: Recipe):
    """The model's config.json only (no weights): used to validate the recipe first."""
    from transformers import AutoConfig

    src = model_source(recipe)
    _need_gguf(src)
    try:
        config = _read(recipe, src, AutoConfig, "config", dequantized.same_config)
    except OSError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditorError(f"model: cannot load config of {recipe.model!r}: {first}") from None
    except ValueError as e:
        raise EditorError(f"model: {str(e).splitlines()[0]}") from None
    if is_patched_config({EDIT_KEY: getattr(config, EDIT_KEY, None)}):  # its weights would refuse to load, in other words
        raise EditorError(f"model: {recipe.model!r} is a skill-editor checkpoint (an edited model), not a base model: "
                          f"`skill-editor restore` gives its exact base model back, to edit that")
    return config


def check_against_config(recipe: Recipe, config) -> None:
    """Rules that need the model's config.json (but no weights): architecture and layer ranges."""
    spec_for(config)
    n_layers = config_layers(config)
    if recipe.key_space and n_layers:
        resolve_layer(recipe.key_space.layer, n_layers, field="key_space.layer")


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    src = model_source(recipe)
    _need_gguf(src)
    try:
        tok = _read(recipe, src, AutoTokenizer, "tokenizer", dequantized.same_tokenizer)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditorError(f"model: cannot load tokenizer of {recipe.model!r}: {first}") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise EditorError("model: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def pick_dtype(recipe: Recipe, config) -> torch.dtype:
    if recipe.dtype != "auto":
        return _DTYPES[recipe.dtype]
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = _DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else torch.float32


def param_bytes(config, dtype: torch.dtype) -> int:
    """Rough parameter memory from the config (no weights needed)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0)
    n = config_layers(config) or 0
    ff = config_d_ff(config) or 4 * h
    v = getattr(c, "vocab_size", 0)
    params = n * (4 * h * h + 3 * h * ff) + 2 * v * h
    return int(params * torch.tensor([], dtype=dtype).element_size())


def placement(recipe: Recipe, config, dtype: torch.dtype) -> dict:
    """``device`` or ``device_map`` keyword for ``from_pretrained``.

    ``auto``: CUDA when present; ``device_map="auto"`` (accelerate) when the model does not fit
    one GPU; CPU otherwise.
    """
    dev = recipe.device
    if dev == "auto":
        if not torch.cuda.is_available():
            return {"device_map": None, "device": "cpu"}
        free, _ = torch.cuda.mem_get_info(0)
        if param_bytes(config, dtype) > 0.85 * free and torch.cuda.device_count() > 1:
            try:
                import accelerate  # noqa: F401
            except ImportError:
                raise EditorError("model does not fit one GPU: install the 'scale' extra (accelerate) for device_map='auto'") from None
            return {"device_map": "auto", "device": None}
        return {"device_map": None, "device": "cuda:0"}
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise EditorError(f"device: {dev!r} requested but CUDA is not available")
    return {"device_map": None, "device": dev}


def load_model(recipe: Recipe, config=None, *, device: str | None = None):
    """The base causal LM in eval mode, placed per ``placement`` (or on ``device``: one
    data-parallel rank's own device, see ``editor.profile.distributed``), with its architecture checked."""
    from transformers import AutoModelForCausalLM

    config = config or load_config(recipe)
    spec = spec_for(config)
    dtype = pick_dtype(recipe, config)
    place = {"device_map": None, "device": device} if device else placement(recipe, config, dtype)
    src = model_source(recipe)
    _need_gguf(src)
    kwargs = {"dtype": dtype, "revision": recipe.revision, "trust_remote_code": recipe.trust_remote_code, **src.kwargs()}
    if place["device_map"]:
        kwargs["device_map"] = place["device_map"]
    elif place["device"] and torch.device(place["device"]).type != "cpu":
        # one accelerator: load the weights straight onto it (a one-device map adds no dispatch
        # hooks) instead of materialising them on the host and copying them over with .to()
        kwargs["device_map"] = {"": place["device"]}
    # a GGUF file: its dequantized copy in the cache when there is one (editor.model.dequantized)
    copy = dequantized.lookup(src.local_file, dtype) if src.gguf_file and src.local_file is not None else None
    try:
        if copy is not None:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("gguf_file", "revision")}
            model = AutoModelForCausalLM.from_pretrained(str(copy), **kwargs)
            dequantized.as_read_from_file(model, copy, src.ref)
        else:
            if src.gguf_file:
                logging.getLogger("transformers.quantizers.quantizer_gguf").addFilter(_NOT_PACKED)
            model = AutoModelForCausalLM.from_pretrained(src.ref, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditorError(f"model: cannot load {recipe.model!r}: {first}") from None
    if place["device"] and "device_map" not in kwargs:
        model.to(place["device"])
    if src.gguf_file and copy is None:
        _dequantized(model)
        if src.local_file is not None:
            dequantized.store(model, src.local_file, dtype)
    model.eval()
    check_mapping(model, spec, config.model_type)
    return model


def _dequantized(model) -> None:
    """A model read from a GGUF file holds plain dequantized weights (in the recipe's dtype), but
    transformers leaves a ``gguf`` quantization record on it that every config written from it
    would carry — engines then take the exported checkpoint for a GGUF-quantized one (vLLM:
    "Unknown quantization method: gguf"). The file stays recorded as provenance (model_file)."""
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) in ("gguf", "GGUF"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "is_quantized"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr == "hf_quantizer" else False)


# ---------------------------------------------------------------------------------------------
# accelerate-dispatched models (device_map): what in-place patching must know
# ---------------------------------------------------------------------------------------------


def offloaded_modules(model) -> list[str]:
    """Modules whose weights accelerate keeps off the module (``cpu``/``disk`` offload of a
    ``device_map``) and reloads at every forward: in-place weight edits do not stick there."""
    out = []
    for name, m in model.named_modules():
        hook = getattr(m, "_hf_hook", None)
        hs = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
        if any(getattr(h, "offload", False) for h in hs):
            out.append(name)
    return out
