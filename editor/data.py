"""Named text sets: local files (jsonl, json, csv, parquet, txt) or Hub datasets, a template over
each record's fields, a ``where`` filter, ``limit``, deterministic order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field as _field
from pathlib import Path
from string import Formatter

from editor.errors import EditorError
from editor.io import read_jsonl
from editor.recipe import DataSetSpec, Recipe, recorded_path, template_fields

# names of the sets the tool brings itself ('@' cannot appear in a recipe's set names)
BACKGROUND = "@background"
ORDINARY = "@ordinary"

LOCAL_EXT = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class TextSet:
    """The texts of one named set plus the records they came from, their description, and where
    each record is (``origins``, as ``load_records`` names them; empty for the tool's own sets)."""

    name: str
    texts: list[str]
    records: list[dict]
    info: dict
    origins: list[str] = _field(default_factory=list)


def _template_fields(template: str) -> list[str]:
    """The record fields a (validated) template reads."""
    return list(dict.fromkeys(name for name, _ in template_fields(template)))


def load_records(spec: DataSetSpec, base_dir: Path, set_name: str) -> tuple[list[dict], str, list[str]]:
    """Records in file / split order, filtered by ``where`` and cut at ``limit``; the source; and
    where each record is (``origins``: ``NAME line N`` for a JSONL file, ``row N`` otherwise — the
    one numbering of the messages about a record)."""
    local = Path(spec.path).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.suffix.lower() in LOCAL_EXT or local.exists():
        if not local.exists():
            raise EditorError(f"data.{set_name}: file not found: {local}")
        records, origins = _read_local(local, set_name)
        # provenance as the recipe wrote it, relative to the recipe file (an absolute or ~ path made
        # relative: ``recorded_path``), so the statistics and the exports are byte-identical wherever
        # the project is checked out and name no user's home; the content is the set's fingerprint
        source = recorded_path(spec.path, base_dir)
    else:
        records = _read_hub(spec, set_name)
        origins = [f"row {k}" for k in range(1, len(records) + 1)]
        source = f"hf://datasets/{spec.path}" + (f"/{spec.name}" if spec.name else "")
    if spec.where:
        for key in spec.where:
            if records and key not in records[0]:
                raise EditorError(f"data.{set_name}.where: records have no field {key!r} (fields: {', '.join(records[0])})")

        def keep(r: dict) -> bool:
            for k, v in spec.where.items():
                allowed = v if isinstance(v, list) else [v]
                if str(r.get(k)) not in [str(a) for a in allowed]:
                    return False
            return True

        kept = [(r, o) for r, o in zip(records, origins) if keep(r)]
        records, origins = [r for r, _ in kept], [o for _, o in kept]
    if spec.limit is not None:
        records, origins = records[: spec.limit], origins[: spec.limit]
    return records, source, origins


def _read_local(path: Path, set_name: str) -> tuple[list[dict], list[str]]:
    """A local file's records and where each one is (``NAME line N`` / ``NAME row N``)."""
    ext = path.suffix.lower()
    if ext == ".jsonl":
        records, lines = read_jsonl(path, f"data.{set_name}")
        return records, [f"{path.name} line {n}" for n in lines]
    try:
        if ext == ".json":
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
                obj = next(iter(obj.values()))
            if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
                raise EditorError(f"data.{set_name}: {path.name} must hold a list of objects")
            records = obj
        elif ext == ".txt":
            with open(path, encoding="utf-8") as f:
                records = [{"text": line.rstrip("\n")} for line in f if line.strip()]
        elif ext in (".csv", ".parquet"):
            import datasets

            ds = datasets.load_dataset(LOCAL_EXT[ext], data_files=str(path), split="train")
            records = [dict(r) for r in ds]
        else:
            raise EditorError(f"data.{set_name}: unsupported file type {ext!r} (jsonl, json, csv, parquet, txt)")
    except EditorError:
        raise
    except json.JSONDecodeError:
        raise EditorError(f"data.{set_name}: {path.name} is not valid JSON") from None
    except Exception as e:  # noqa: BLE001
        raise EditorError(f"data.{set_name}: cannot read {path.name}: {type(e).__name__}: {e}") from None
    return records, [f"{path.name} row {k}" for k in range(1, len(records) + 1)]


def _read_hub(spec: DataSetSpec, set_name: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:  # noqa: BLE001 - offline, missing, bad split...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditorError(f"data.{set_name}: cannot load Hub dataset {spec.path!r}: {msg}") from None
    if spec.limit is not None and not spec.where:
        ds = ds.select(range(min(spec.limit, len(ds))))
    return [dict(r) for r in ds]


def render(records: list[dict], template: str, set_name: str, origins: list[str] | None = None) -> list[str]:
    """Fill ``template`` (``editor.recipe.template_fields``: plain fields, list elements) from each
    record. A field must hold text or a number (a list element too): None, lists and mappings are
    refused rather than written into the text as their Python repr. Messages name a record by its
    ``origins`` entry (``load_records``)."""
    parts = [(lit, None if field is None else template_fields("{" + field + "}")[0])
             for lit, field, _, _ in Formatter().parse(template)]
    out = []
    for i, r in enumerate(records):
        at = _origin(origins, i)
        text = []
        for lit, field in parts:
            text.append(lit)
            if field is None:
                continue
            name, index = field
            if name not in r:
                raise EditorError(f"data.{set_name}.text: {at} has no field {name!r} (fields: {', '.join(map(str, r))})")
            value = r[name]
            where = name
            if index is not None:
                if not isinstance(value, (list, tuple)):
                    raise EditorError(f"data.{set_name}.text: {at}: {{{name}[{index}]}} needs a list, "
                                      f"field {name!r} is {type(value).__name__}")
                if index >= len(value):
                    raise EditorError(f"data.{set_name}.text: {at}: field {name!r} has {len(value)} element(s), "
                                      f"no [{index}]")
                value, where = value[index], f"{name}[{index}]"
            if value is None or isinstance(value, (dict, list, tuple)):
                kind = "empty (null)" if value is None else f"a {type(value).__name__}"
                raise EditorError(f"data.{set_name}.text: {at}: {where} is {kind}, not text")
            text.append(str(value))
        out.append("".join(text))
    return out


def _origin(origins: list[str] | None, i: int) -> str:
    return origins[i] if origins else f"record {i + 1}"


def check_scorecard_records(records: list[dict], origins: list[str] | None, field: str) -> None:
    """The one validator of scorecard records (``run``'s ``evaluate`` set and ``eval --data``
    alike): each carries ``prompt`` (text) and ``answer`` (text or a number)."""
    for i, r in enumerate(records):
        for key, kinds in (("prompt", (str,)), ("answer", (str, int, float))):
            if key not in r:
                raise EditorError(f"{field}: {_origin(origins, i)} has no field {key!r} "
                                  f"(a scorecard record needs prompt and answer; fields: {', '.join(map(str, r))})")
            if not isinstance(r[key], kinds) or isinstance(r[key], bool):
                raise EditorError(f"{field}: {_origin(origins, i)}: {key} is {type(r[key]).__name__}, not text")


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def load_set(recipe: Recipe, name: str, min_texts: int = 2) -> TextSet:
    spec = recipe.data[name]
    records, source, origins = load_records(spec, recipe.base_dir, name)
    texts = render(records, spec.text, name, origins)
    if not texts:
        raise EditorError(f"data.{name}: the set is empty")
    if len(texts) < min_texts:
        raise EditorError(f"data.{name}: has {len(texts)} text(s); at least {min_texts} are needed")
    info = {
        "source": source,
        "split": spec.split,
        "name": spec.name,
        "revision": spec.revision,
        "template": spec.text,
        "where": spec.where,
        "texts": len(texts),
        "fingerprint": fingerprint(texts),
    }
    return TextSet(name, texts, records, {k: v for k, v in info.items() if v is not None}, origins)


def load_all(recipe: Recipe, names: list[str] | None = None) -> dict[str, TextSet]:
    """Load (and validate) every named set, before any weight is loaded."""
    return {n: load_set(recipe, n) for n in (names or list(recipe.data))}


def ordinary_set(part: str, name: str) -> TextSet:
    """The shipped ordinary prompts of one part (``editor.ordinary``: ``calibration`` — the default
    background negatives — or ``evaluation`` — the default false-refusal set) as a text set."""
    from editor import ordinary

    records = ordinary.load(part)
    texts = [r["text"] for r in records]
    info = {"source": f"skill-editor:ordinary/{part}", "texts": len(texts), "fingerprint": fingerprint(texts)}
    return TextSet(name, texts, records, info)


def _union(name: str, parts: list[TextSet]) -> TextSet:
    texts = [t for p in parts for t in p.texts]
    records = [r for p in parts for r in p.records]
    info = {"sets": [p.name for p in parts], "texts": len(texts), "fingerprint": fingerprint(texts)}
    return TextSet(name, texts, records, info)


def background_set(recipe: Recipe, sets: dict[str, TextSet]) -> TextSet | None:
    """The calibration's background negatives (``key_space.background``), as one set: the budget
    holds on it as a whole, like on each retain set. None when the recipe has no calibration."""
    ks = recipe.key_space
    if ks is None or not ks.calibrated or ks.background == "none":
        return None
    if ks.background == "default":
        return ordinary_set("calibration", BACKGROUND)
    return _union(BACKGROUND, [sets[n] for n in ks.background_sets])


def ordinary_eval_set(recipe: Recipe, sets: dict[str, TextSet]) -> TextSet | None:
    """The scorecard's ordinary prompts (``evaluate.ordinary``), whose refusals it reports."""
    ev = recipe.evaluate
    if ev is None or ev.ordinary == "none":
        return None
    if ev.ordinary == "default":
        return ordinary_set("evaluation", ORDINARY)
    return sets[ev.ordinary]
