"""Named text sets: local files (jsonl, json, csv, parquet, txt) or Hub datasets, a template over
each record's fields (or a conversation field), a ``where`` filter, ``limit``, deterministic order,
and the form each text reaches the model in: ``raw`` (the text as rendered) or ``chat`` (through the
tokenizer's chat template, as chat clients, ``transformers``' chat pipeline and vLLM's
``/v1/chat/completions`` send it)."""

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
    """The texts of one named set plus the records they came from (one per text), their
    description, where each record is (``origins``, as ``load_records`` names them; empty for the
    tool's own sets) and ``forms``: the form of each text (``raw`` / ``chat``; None: all raw). A set
    in both forms holds every record twice: first all raw texts, then all chat texts."""

    name: str
    texts: list[str]
    records: list[dict]
    info: dict
    origins: list[str] = _field(default_factory=list)
    forms: list[str] | None = None

    def form_of(self, i: int) -> str:
        return "raw" if self.forms is None else self.forms[i]

    @property
    def form_names(self) -> list[str]:
        """The forms present, in order (``["raw"]`` for a plain set)."""
        return ["raw"] if self.forms is None else list(dict.fromkeys(self.forms))

    def in_form(self, form: str) -> "TextSet":
        """The texts of one form as a set of their own (the same set when it has only that form)."""
        if self.form_names == [form]:
            return self
        return subset(self, [i for i in range(len(self.texts)) if self.form_of(i) == form], f"{self.name}[{form}]")


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
    if spec.limit_each:
        (key, n), = spec.limit_each.items()
        if records and key not in records[0]:
            raise EditorError(f"data.{set_name}.limit_each: records have no field {key!r} (fields: {', '.join(records[0])})")
        seen: dict[str, int] = {}
        kept = []
        for r, o in zip(records, origins):
            v = str(r.get(key))
            seen[v] = seen.get(v, 0) + 1
            if seen[v] <= n:
                kept.append((r, o))
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


ROLES = ("system", "user", "assistant")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages, where: str) -> list[dict]:
    """A conversation: a non-empty list of {role: system|user|assistant, content: text}."""
    if not isinstance(messages, list) or not messages:
        raise EditorError(f"{where}: a conversation is a non-empty list of {{role, content}} messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise EditorError(f"{where}: message {j} must be {{role: system|user|assistant, content: text}}")
    return messages


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The prompt a chat client sends for ``messages``: the tokenizer's chat template, with the
    assistant's generation prompt after a user turn, as text. Every text of the tool is tokenized
    with the tokenizer's special tokens, so a BOS that the template writes and the tokenizer adds
    again is dropped from the text: it tokenizes to exactly ``apply_chat_template``'s ids."""
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=messages[-1]["role"] == "user")
    bos = getattr(tokenizer, "bos_token", None)
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    adds_bos = bool(added) and added[0] == getattr(tokenizer, "bos_token_id", None)
    if adds_bos and bos and text.startswith(bos):
        return text[len(bos):]
    if adds_bos:
        raise EditorError("format chat: the tokenizer adds a BOS token that its chat template does not write, so chat "
                          "clients send no BOS where the tool would add one; use format: raw for this model")
    return text


def raw_conversation(messages: list[dict]) -> str:
    """A conversation in raw form: 'User: …' / 'Assistant: …' paragraphs (a system turn as its text),
    ending with 'Assistant:' after a user turn — how a completion model is asked in turns."""
    names = {"user": "User: ", "assistant": "Assistant: ", "system": ""}
    text = "\n\n".join(names[m["role"]] + m["content"] for m in messages)
    return text + ("\n\nAssistant:" if messages[-1]["role"] == "user" else "")


def resolve_format(fmt: str, tokenizer, where: str) -> list[str]:
    """The forms of a format: ``auto`` is both when ``tokenizer`` has a chat template, else raw;
    ``chat`` / ``both`` without a chat template is an error."""
    chat = tokenizer is not None and has_chat_template(tokenizer)
    if fmt == "auto":
        return ["raw", "chat"] if chat else ["raw"]
    if fmt == "raw":
        return ["raw"]
    if not chat:
        raise EditorError(f"{where}: format {fmt!r} needs a chat template, and the model's tokenizer has none "
                          f"(use format: raw)")
    return ["chat"] if fmt == "chat" else ["raw", "chat"]


def in_forms(name: str, texts: list[str], records: list[dict], info: dict, forms: list[str], tokenizer,
             conversations: list[list[dict]] | None = None, origins: list[str] | None = None) -> TextSet:
    """A set of requests in ``forms``: each text (or conversation) raw and/or as a chat user turn.
    A plain raw set is returned as it was (no ``format`` in its description: statistics of raw sets
    are unchanged by this feature)."""
    origins = origins or []
    if forms == ["raw"] and conversations is None:
        return TextSet(name, texts, records, info, origins)
    out_t, out_r, out_f = [], [], []
    for form in forms:
        for i, (t, r) in enumerate(zip(texts, records)):
            conv = conversations[i] if conversations is not None else [{"role": "user", "content": t}]
            if form == "chat":
                out_t.append(chat_text(tokenizer, conv))
            else:
                out_t.append(raw_conversation(conv) if conversations is not None else t)
            out_r.append(r)
            out_f.append(form)
    info = {**info, "format": "both" if len(forms) > 1 else forms[0], "texts": len(out_t), "fingerprint": fingerprint(out_t)}
    return TextSet(name, out_t, out_r, info, origins * len(forms), out_f)


def fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def load_set(recipe: Recipe, name: str, min_texts: int = 2, tokenizer=None) -> TextSet:
    """One named set, rendered in its format (``Recipe.set_format``; ``tokenizer``: the model's, for
    the chat form and to resolve ``auto`` — without one, ``auto`` is raw)."""
    spec = recipe.data[name]
    records, source, origins = load_records(spec, recipe.base_dir, name)
    conversations = None
    if spec.messages is not None:
        conversations = []
        for i, r in enumerate(records):
            at = _origin(origins, i)
            if spec.messages not in r:
                raise EditorError(f"data.{name}.messages: {at} has no field {spec.messages!r}")
            conversations.append(check_messages(r[spec.messages], f"data.{name}.messages: {at}"))
        texts = [raw_conversation(c) for c in conversations]
    else:
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
        "template": spec.text if spec.messages is None else None,
        "messages": spec.messages,
        "where": spec.where,
        "limit_each": spec.limit_each,
        "texts": len(texts),
        "fingerprint": fingerprint(texts),
    }
    info = {k: v for k, v in info.items() if v is not None}
    forms = resolve_format(recipe.set_format(name), tokenizer, f"data.{name}.format")
    return in_forms(name, texts, records, info, forms, tokenizer, conversations, origins)


def needs_tokenizer(recipe: Recipe) -> bool:
    """Whether loading the recipe's sets needs the model's tokenizer: some set (or the shipped
    background / ordinary prompts) may be rendered in chat form."""
    used = [recipe.set_format(n) for n in recipe.data]
    if background_used(recipe) or (recipe.evaluate and recipe.evaluate.ordinary == "default"):
        used.append(recipe.set_format(None))
    return any(f != "raw" for f in used)


def load_all(recipe: Recipe, names: list[str] | None = None, tokenizer=None) -> dict[str, TextSet]:
    """Load (and validate) every named set, before any weight is loaded."""
    return {n: load_set(recipe, n, tokenizer=tokenizer) for n in (names or list(recipe.data))}


def ordinary_set(part: str, name: str, forms: list[str] | None = None, tokenizer=None) -> TextSet:
    """The shipped ordinary prompts of one part (``editor.ordinary``: ``calibration`` — the default
    background negatives — or ``evaluation`` — the default false-refusal set) as a text set, in
    ``forms`` (default raw)."""
    from editor import ordinary

    records = ordinary.load(part)
    texts = [r["text"] for r in records]
    info = {"source": f"skill-editor:ordinary/{part}", "texts": len(texts), "fingerprint": fingerprint(texts)}
    return in_forms(name, texts, records, info, forms or ["raw"], tokenizer)


def subset(ts: TextSet, keep: list[int], name: str) -> TextSet:
    """The texts ``keep`` (indices) of ``ts`` as a set of their own."""
    texts = [ts.texts[i] for i in keep]
    return TextSet(name, texts, [ts.records[i] for i in keep], {**ts.info, "texts": len(texts), "fingerprint": fingerprint(texts)},
                   [ts.origins[i] for i in keep] if ts.origins else [], [ts.forms[i] for i in keep] if ts.forms else None)


def contrast_split(ts: TextSet) -> list[tuple[str, TextSet]]:
    """Negatives with near-neighbour contrast prompts (records whose ``category`` is one of
    ``editor.ordinary.CONTRAST_CATEGORIES``) as two budget groups, (``""``, the rest) and
    (``"contrast"``, those): a guard must keep its false-positive budget on the look-alikes on their
    own, not let the bulk of ordinary text absorb them. A set without them: [("", ts)]."""
    from editor.ordinary import CONTRAST_CATEGORIES

    near = [i for i, r in enumerate(ts.records) if isinstance(r, dict) and r.get("category") in CONTRAST_CATEGORIES]
    if not near or len(near) == len(ts.texts):
        return [("", ts)]
    near_set = set(near)
    rest = [i for i in range(len(ts.texts)) if i not in near_set]
    return [("", subset(ts, rest, ts.name)), ("contrast", subset(ts, near, f"{ts.name}:contrast"))]


def _union(name: str, parts: list[TextSet]) -> TextSet:
    texts = [t for p in parts for t in p.texts]
    records = [r for p in parts for r in p.records]
    info = {"sets": [p.name for p in parts], "texts": len(texts), "fingerprint": fingerprint(texts)}
    forms = None if all(p.forms is None for p in parts) else [p.form_of(i) for p in parts for i in range(len(p.texts))]
    origins = [o for p in parts for o in p.origins] if all(p.origins for p in parts) else []
    return TextSet(name, texts, records, info, origins, forms)


def background_used(recipe: Recipe) -> bool:
    ks = recipe.key_space
    return bool(ks is not None and ks.calibrated and ks.background == "default")


def background_set(recipe: Recipe, sets: dict[str, TextSet], tokenizer=None) -> TextSet | None:
    """The calibration's background negatives (``key_space.background``), as one set: the budget
    holds on it as a whole, like on each retain set (in each form). None when the recipe has no
    calibration. The shipped prompts come in the recipe's format."""
    ks = recipe.key_space
    if ks is None or not ks.calibrated or ks.background == "none":
        return None
    if ks.background == "default":
        forms = resolve_format(recipe.set_format(None), tokenizer, "format")
        return ordinary_set("calibration", BACKGROUND, forms, tokenizer)
    return _union(BACKGROUND, [sets[n] for n in ks.background_sets])


def ordinary_eval_set(recipe: Recipe, sets: dict[str, TextSet], tokenizer=None) -> TextSet | None:
    """The scorecard's ordinary prompts (``evaluate.ordinary``), whose refusals it reports (in each
    form)."""
    ev = recipe.evaluate
    if ev is None or ev.ordinary == "none":
        return None
    if ev.ordinary == "default":
        forms = resolve_format(recipe.set_format(None), tokenizer, "format")
        return ordinary_set("evaluation", ORDINARY, forms, tokenizer)
    return sets[ev.ordinary]
