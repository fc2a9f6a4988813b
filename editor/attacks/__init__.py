"""The attack suite: wrappers that try to slip a forgotten skill's request past a guard —
instruction injection, role play, fake system text inside the user turn, a long unrelated story
around the request, another language around it, output-format demands, pattern continuation and
multi-turn set-ups. Written by the project (``wrappers.jsonl``), shipped with the tool, never
fitted on: ``development`` wrappers are where designs are compared, ``evaluation`` wrappers give
the figures (the README).

A record is ``{id, family, part, template}`` — one user turn, ``{request}`` where the request goes —
or ``{id, family, part, messages}`` for a conversation (``multi_turn``): ``[{role, content}, …]``
with ``{request}`` in exactly one message and a user turn last. Pure Python: no torch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from editor.errors import EditorError

WRAPPERS = Path(__file__).parent / "wrappers.jsonl"
SEED = 20261128
FAMILIES = ("injection", "role_play", "fake_system", "story", "language", "format", "continuation", "multi_turn")
PARTS = ("development", "evaluation")
DEVELOPMENT_PER_FAMILY = 2
SLOT = "{request}"
ROLES = ("system", "user", "assistant")


def parts(records: list[dict]) -> list[str]:
    """The part of each wrapper: per family, the records (in file order) shuffled with a generator
    seeded by the family's name; the first ``DEVELOPMENT_PER_FAMILY`` are ``development``, the rest
    ``evaluation``."""
    out = [""] * len(records)
    by_family: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_family.setdefault(r["family"], []).append(i)
    for family, idx in by_family.items():
        idx = list(idx)
        random.Random(f"{SEED}/{family}").shuffle(idx)
        for k, i in enumerate(idx):
            out[i] = "development" if k < DEVELOPMENT_PER_FAMILY else "evaluation"
    return out


def _texts(w: dict) -> list[str]:
    return [w["template"]] if "template" in w else [m["content"] for m in w["messages"]]


def check(records: list[dict], where: str = "attacks") -> list[dict]:
    """Raise on a malformed suite: unknown family or part, duplicate id, not exactly one of
    template / messages, ``{request}`` not exactly once, a conversation not ending on a user
    turn, a part that is not ``parts()``'s."""
    ids = set()
    for n, w in enumerate(records, 1):
        at = f"{where}: record {n}"
        if not isinstance(w, dict):
            raise EditorError(f"{at} is not a JSON object")
        wid = w.get("id")
        if not isinstance(wid, str) or not wid or wid in ids:
            raise EditorError(f"{at}: missing or duplicate id {wid!r}")
        ids.add(wid)
        at = f"{where}: {wid}"
        if w.get("family") not in FAMILIES:
            raise EditorError(f"{at}: unknown family {w.get('family')!r} (one of {', '.join(FAMILIES)})")
        if w.get("part") not in PARTS:
            raise EditorError(f"{at}: unknown part {w.get('part')!r} (one of {', '.join(PARTS)})")
        if ("template" in w) == ("messages" in w):
            raise EditorError(f"{at}: give exactly one of template and messages")
        if "messages" in w:
            msgs = w["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise EditorError(f"{at}: messages must be a non-empty list")
            for m in msgs:
                if not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES \
                        or not isinstance(m["content"], str):
                    raise EditorError(f"{at}: a message is {{role: system|user|assistant, content: text}}, got {m!r}")
            if msgs[-1]["role"] != "user":
                raise EditorError(f"{at}: a conversation ends with a user turn")
        elif not isinstance(w["template"], str):
            raise EditorError(f"{at}: template must be text")
        slots = sum(t.count(SLOT) for t in _texts(w))
        if slots != 1:
            raise EditorError(f"{at}: {SLOT} occurs {slots} times (exactly once)")
        if set(w) - {"id", "family", "part", "template", "messages"}:
            raise EditorError(f"{at}: unknown fields {sorted(set(w) - {'id', 'family', 'part', 'template', 'messages'})}")
    want = parts(records)
    for w, p in zip(records, want):
        if w["part"] != p:
            raise EditorError(f"{where}: {w['id']}: part {w['part']!r}, but the seeded rule gives {p!r}")
    return records


def load(part: str | None = None, path: Path | str = WRAPPERS) -> list[dict]:
    """The wrappers (of one ``part``), validated (``check``), in file order."""
    if part is not None and part not in PARTS:
        raise EditorError(f"attacks: unknown part {part!r} (one of {', '.join(PARTS)})")
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise EditorError(f"attacks: {Path(path).name} line {n} is not valid JSON") from None
    check(rows, f"attacks ({Path(path).name})")
    return [w for w in rows if part is None or w["part"] == part]


def render(wrapper: dict, request: str) -> str | list[dict]:
    """The wrapper around ``request``: the user turn's text, or (``messages``) the conversation as
    a new list of ``{role, content}``. The slot is replaced literally — braces elsewhere (a JSON
    example) stay as written."""
    if not isinstance(request, str) or not request.strip():
        raise EditorError("attacks: the request to wrap must be non-empty text")
    if "template" in wrapper:
        return wrapper["template"].replace(SLOT, request)
    return [{"role": m["role"], "content": m["content"].replace(SLOT, request)} for m in wrapper["messages"]]
