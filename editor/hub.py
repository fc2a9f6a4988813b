"""Pushing a verified checkpoint to the Hugging Face Hub (private by default).

The checkpoint is verified first (``editor.checkpoint.verify``: sha256 of every file, patch
digest) and refused if anything is off. The token comes from ``HF_TOKEN`` / the saved login
(``huggingface_hub.get_token``) or the caller, and is never printed or logged: messages that
could echo it are redacted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from editor.errors import EditorError
from editor.manifest import CARD

COMMIT_MESSAGE = "Upload skill-editor checkpoint"


@dataclass
class Upload:
    """What ``push`` uploads: a verified checkpoint, its files and sizes, its model card."""

    checkpoint: Path
    repo_id: str
    private: bool
    revision: str | None
    files: list[tuple[str, int]] = field(default_factory=list)
    card: str = ""


def _redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    import re

    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


def upload_for(checkpoint, repo_id: str, *, private: bool = True, revision: str | None = None) -> Upload:
    """Verify the checkpoint and list what would be uploaded (no network)."""
    from editor.checkpoint import verify

    ckpt = Path(checkpoint)
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise EditorError(f"--repo-id must look like 'namespace/name', got {repo_id!r}")
    rep = verify(ckpt)
    if not rep.ok:
        more = f" (+{len(rep.problems) - 1} more; see `skill-editor inspect`)" if len(rep.problems) > 1 else ""
        raise EditorError(f"refusing to push {ckpt}: it fails verification: {rep.problems[0]}{more}")
    files = []
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in Path(rel).parts):
            files.append((rel, p.stat().st_size))
    card = (ckpt / CARD).read_text(encoding="utf-8") if (ckpt / CARD).exists() else ""
    return Upload(ckpt, repo_id, private, revision, files, card)


MIRROR_NOTE = ("the repository is made to mirror the checkpoint: files in it (on that revision) that are not "
               "listed here are deleted in the same commit (.gitattributes is kept)")


def render_upload(upload: Upload) -> str:
    vis = "private" if upload.private else "public"
    lines = [f"would push {upload.checkpoint} to {upload.repo_id} ({vis}"
             + (f", revision {upload.revision}" if upload.revision else "") + ")",
             f"visibility: a new repository is created {vis}; an existing one keeps its own visibility",
             f"deletions: {MIRROR_NOTE}", "files:"]
    lines += [f"  {rel}  {size:,} bytes" for rel, size in upload.files]
    lines += [f"total: {len(upload.files)} files, {sum(s for _, s in upload.files):,} bytes", "", "model card (README.md):", upload.card]
    return "\n".join(lines)


def _first_line(e: BaseException, token: str | None) -> str:
    text = str(e).strip()
    return _redact(text.splitlines()[0] if text else type(e).__name__, token)


def _unreachable(e: BaseException) -> bool:
    """A transport failure (no network, refused connection, DNS, timeout, offline mode) rather than an
    answer of the Hub."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "TransportError", "TimeoutException", "OfflineModeIsEnabled", "NetworkError",
                         "ConnectError", "ProxyError", "TimeoutError"})


def push(checkpoint, repo_id: str, *, private: bool = True, revision: str | None = None, dry_run: bool = False,
         token: str | None = None, endpoint: str | None = None, echo=print, commit_message: str = COMMIT_MESSAGE) -> dict:
    """Create the repo (private unless ``private=False``; an existing repo keeps its visibility)
    and upload the checkpoint folder.

    The remote folder is made to mirror the checkpoint: remote files that are not in it (stale
    shards of an earlier push …) are deleted in the same commit, and listed in the output.
    ``dry_run``: print the files, the card and what the push would do; upload nothing. The
    visibility printed is the Hub's answer, not the flag's. Every failure — the Hub's answer or no
    connection at all — is one line (``EditorError``), the token redacted.
    """
    upload = upload_for(checkpoint, repo_id, private=private, revision=revision)
    if dry_run:
        echo(render_upload(upload))
        return {"dry_run": True, "repo_id": repo_id, "files": [f for f, _ in upload.files]}

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = token or get_token()
    if not token:
        raise EditorError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    local = {f for f, _ in upload.files}
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        visible = getattr(api.repo_info(repo_id, repo_type="model"), "private", None)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        remote = set(api.list_repo_files(repo_id, revision=revision, repo_type="model"))
        info = api.upload_folder(
            folder_path=str(upload.checkpoint), repo_id=repo_id, repo_type="model", revision=revision,
            commit_message=commit_message, delete_patterns="*", ignore_patterns=[".*", "**/.*"],
        )
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        first = _first_line(e, token)
        if status in (401, 403):
            raise EditorError(f"the Hub refused the push ({status}): check that the token can write to {repo_id}: {first}") from None
        raise EditorError(f"push to {repo_id} failed: {first}") from None
    except Exception as e:  # noqa: BLE001 - no network, a refused connection, offline mode, a bad endpoint …
        where = endpoint or "https://huggingface.co"
        if _unreachable(e):
            raise EditorError(f"push to {repo_id} failed: cannot reach the Hub at {where} "
                              f"({type(e).__name__}: {_first_line(e, token)})") from None
        raise EditorError(f"push to {repo_id} failed: {type(e).__name__}: {_first_line(e, token)}") from None
    commit_url = getattr(info, "commit_url", None) or str(info)
    deleted = sorted(remote - local - {".gitattributes"})
    vis = "visibility unknown" if visible is None else ("private" if visible else "public")
    echo(f"pushed {len(upload.files)} files to {url} ({vis}): {commit_url}")
    if visible is not None and bool(visible) != private:
        echo(f"note: {repo_id} already existed and stays {vis} (--public / private apply to a new repository only)")
    if deleted:
        echo(f"deleted {len(deleted)} file(s) of the repository that are not in the checkpoint: {', '.join(deleted)}")
    return {"dry_run": False, "repo_id": repo_id, "url": str(url), "commit_url": commit_url,
            "files": [f for f, _ in upload.files], "private": visible, "deleted": deleted}
