"""``skill-editor push``: the real ``huggingface_hub`` client code path (create_repo, preupload,
LFS batch + upload, commit, branch, tree listing) against a local HTTP server on 127.0.0.1 that
implements those few endpoints. No test touches the network. (With ``hf_xet`` installed the
client would upload large files through Xet storage instead of LFS; that protocol is not
emulated, so the tests turn Xet off.)"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner

from editor.cli import main
from editor.io import json_bytes
from editor.manifest import MANIFEST, file_digests

TOKEN = "hf_testtokenABCDEFGHIJKLMNOP1234"


class FakeHub:
    """In-memory Hub: repos, branches, files per (repo, revision), LFS objects."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, authorization
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.base = ""

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        return self.repos[repo]["branches"][revision]


def _handler(hub: FakeHub):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, obj=None, raw: bytes | None = None):
            data = raw if raw is not None else json.dumps(obj if obj is not None else {}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _auth_ok(self) -> bool:
            return self.headers.get("authorization") == f"Bearer {TOKEN}"

        def _repo(self, parts: list[str]) -> str:
            return unquote(parts[0]) + "/" + unquote(parts[1])

        def do_POST(self):  # noqa: N802
            path = urlparse(self.path).path
            hub.requests.append(("POST", path, self.headers.get("authorization")))
            body = self._body()
            if not self._auth_ok():
                return self._send(401, {"error": "Invalid credentials"})
            if path == "/api/repos/create":
                p = json.loads(body)
                hub.created.append(p)
                repo = f"{p['organization']}/{p['name']}"
                if repo in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": f"{hub.base}/{repo}"})
                hub.repos[repo] = {"private": p.get("visibility") == "private", "branches": {"main": {}}}
                return self._send(200, {"url": f"{hub.base}/{repo}"})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo, action, rev = self._repo(parts[2:4]), parts[4], unquote("/".join(parts[5:]))
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                branches = hub.repos[repo]["branches"]
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                         "shouldIgnore": False, "oid": None} for f in files]})
                if action == "branch":
                    if rev in branches:
                        return self._send(409, {"error": "Reference already exists"})
                    branches[rev] = dict(branches["main"])
                    return self._send(200, {})
                if action == "commit":
                    if rev not in branches:
                        return self._send(404, {"error": "Revision not found"})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    files = branches[rev]
                    for item in lines[1:]:
                        v = item["value"]
                        if item["key"] == "file":
                            files[v["path"]] = base64.b64decode(v["content"])
                        elif item["key"] == "lfsFile":
                            if v["oid"] not in hub.lfs:
                                return self._send(422, {"error": f"LFS object {v['oid']} was not uploaded"})
                            files[v["path"]] = hub.lfs[v["oid"]]
                        elif item["key"] == "deletedFile":
                            files.pop(v["path"], None)
                    hub.commits.append({"repo": repo, "revision": rev, "header": lines[0]["value"],
                                        "ops": [(i["key"], i["value"]["path"]) for i in lines[1:]]})
                    return self._send(200, {"commitUrl": f"{hub.base}/{repo}/commit/{len(hub.commits):040x}",
                                            "commitOid": f"{len(hub.commits):040x}"})
            if path.endswith(".git/info/lfs/objects/batch"):
                req = json.loads(body)
                objs = [{"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{hub.base}/lfs-upload/{o['oid']}"}}} for o in req["objects"]]
                return self._send(200, {"transfer": "basic", "objects": objs})
            return self._send(404, {"error": f"no route POST {path}"})

        def do_PUT(self):  # noqa: N802
            path = urlparse(self.path).path
            hub.requests.append(("PUT", path, self.headers.get("authorization")))
            body = self._body()
            if path.startswith("/lfs-upload/"):
                oid = path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = body
                return self._send(200, {})
            return self._send(404, {"error": f"no route PUT {path}"})

        def do_GET(self):  # noqa: N802
            path = urlparse(self.path).path
            hub.requests.append(("GET", path, self.headers.get("authorization")))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                repo, rev = self._repo(parts[2:4]), unquote(parts[5])
                if repo not in hub.repos or rev not in hub.repos[repo]["branches"]:
                    return self._send(404, {"error": "not found"})
                files = hub.repos[repo]["branches"][rev]
                return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                        for p, b in sorted(files.items())])
            if parts[:2] == ["api", "models"] and len(parts) in (4, 6) and (len(parts) == 4 or parts[4] == "revision"):
                repo = self._repo(parts[2:4])  # repo_info: what the Hub says about the repository
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"})
                return self._send(200, {"id": repo, "private": hub.repos[repo]["private"], "sha": "0" * 40,
                                        "siblings": [{"rfilename": f} for f in hub.files(repo)]})
            return self._send(404, {"error": f"no route GET {path}"})

    return H


@pytest.fixture()
def fake_hub(monkeypatch):
    import huggingface_hub.constants as hc

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # the suite runs with HF_HUB_OFFLINE=1; the client may talk to this local server only
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    # large files go through the classic LFS protocol here; Xet's storage protocol is not emulated
    monkeypatch.setattr(hc, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_ENDPOINT", hub.base)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def make_checkpoint(root: Path) -> Path:
    """A small plain checkpoint with a valid manifest (verification needs only the files)."""
    import torch
    from safetensors.torch import save_file

    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"w": torch.arange(300, dtype=torch.float32)}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- skill-editor\n---\n\n# card body\n")
    manifest = {"format": "skill-editor/checkpoint", "kind": "plain", "edit": {"methods": ["prune"]},
                "files": file_digests(ckpt)}
    (ckpt / MANIFEST).write_bytes(json_bytes(manifest))
    return ckpt


def _push(*args):
    return CliRunner().invoke(main, ["push", *[str(a) for a in args]])


def test_push_uploads_every_file_privately(fake_hub, tmp_path):
    ckpt = make_checkpoint(tmp_path)
    res = _push(ckpt, "--repo-id", "me/tiny-no-math")
    assert res.exit_code == 0, res.output
    assert TOKEN not in res.output
    assert fake_hub.created[0]["visibility"] == "private"
    assert fake_hub.repos["me/tiny-no-math"]["private"] is True
    got = fake_hub.files("me/tiny-no-math")
    want = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert got == want
    # the safetensors file went through LFS (batch + upload), the rest inline
    ops = dict((p, k) for k, p in fake_hub.commits[0]["ops"])
    assert ops["model.safetensors"] == "lfsFile" and ops["config.json"] == "file"
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p, _ in fake_hub.requests)
    # every Hub API call carried the token; the LFS storage upload did not need it
    assert all(auth == f"Bearer {TOKEN}" for m, p, auth in fake_hub.requests if p.startswith("/api/"))
    assert "pushed 5 files" in res.output


def test_push_again_mirrors_the_checkpoint_and_public_revision(fake_hub, tmp_path):
    ckpt = make_checkpoint(tmp_path)
    assert _push(ckpt, "--repo-id", "me/m").exit_code == 0
    # a stale remote file from an earlier push is deleted by the next push
    fake_hub.files("me/m")["old-shard.safetensors"] = b"stale"
    res = _push(ckpt, "--repo-id", "me/m", "--revision", "v2", "--public")
    assert res.exit_code == 0, res.output
    assert fake_hub.created[-1]["visibility"] == "public"
    assert fake_hub.files("me/m", "v2") == {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert fake_hub.commits[-1]["revision"] == "v2"


def test_push_without_token_is_one_line(fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    ckpt = make_checkpoint(tmp_path)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = _push(ckpt, "--repo-id", "me/m")
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: no Hugging Face token") and len(res.output.strip().splitlines()) == 1
    assert fake_hub.requests == []


def test_push_with_a_bad_token_never_prints_it(fake_hub, tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path)
    bad = "hf_wrongtokenZZZZZZZZZZZZZZZZ"
    monkeypatch.setenv("HF_TOKEN", bad)
    res = _push(ckpt, "--repo-id", "me/m")
    assert res.exit_code == 2
    assert "401" in res.output and bad not in res.output and TOKEN not in res.output


def test_push_refuses_a_checkpoint_that_fails_verification(fake_hub, tmp_path):
    ckpt = make_checkpoint(tmp_path)
    (ckpt / "tokenizer.json").write_text('{"changed": true}')
    res = _push(ckpt, "--repo-id", "me/m")
    assert res.exit_code == 1  # a checkpoint that fails verification: exit 1 in every command, as inspect
    assert "fails verification" in res.output and "tokenizer.json" in res.output
    assert fake_hub.requests == []


def test_push_dry_run_uploads_nothing(tmp_path, monkeypatch):
    import huggingface_hub

    ckpt = make_checkpoint(tmp_path)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # not needed for a dry run
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("dry run touched the Hub"))
    res = _push(ckpt, "--repo-id", "me/m", "--dry-run")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "would push" in out and "me/m (private)" in out
    for name in ("config.json", "model.safetensors", "README.md", MANIFEST):
        assert name in out
    assert "# card body" in out


def test_push_rejects_a_bad_repo_id(tmp_path):
    res = _push(make_checkpoint(tmp_path), "--repo-id", "a/b/c", "--dry-run")
    assert res.exit_code == 2 and "namespace/name" in res.output


def test_push_says_what_it_deletes_and_the_hubs_visibility(fake_hub, tmp_path):
    ckpt = make_checkpoint(tmp_path)
    assert _push(ckpt, "--repo-id", "me/m", "--public").exit_code == 0
    fake_hub.files("me/m")["old-shard.safetensors"] = b"stale"
    fake_hub.files("me/m")[".gitattributes"] = b"*.safetensors filter=lfs"
    res = _push(ckpt, "--repo-id", "me/m")  # no --public, but the repository exists and is public
    assert res.exit_code == 0, res.output
    assert "(public)" in res.output and "(private)" not in res.output
    assert "already existed and stays public" in res.output
    assert "deleted 1 file(s)" in res.output and "old-shard.safetensors" in res.output
    assert "old-shard.safetensors" not in fake_hub.files("me/m") and ".gitattributes" in fake_hub.files("me/m")


def test_push_help_and_dry_run_say_that_remote_files_are_deleted(tmp_path):
    assert "DELETED" in CliRunner().invoke(main, ["push", "--help"]).output
    res = _push(make_checkpoint(tmp_path), "--repo-id", "me/m", "--dry-run")
    assert res.exit_code == 0 and "are deleted in the same commit" in res.output
    assert "an existing one keeps its own visibility" in res.output


def test_push_with_no_network_is_one_line(tmp_path, monkeypatch):
    import socket

    import huggingface_hub.constants as hc

    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    res = _push(make_checkpoint(tmp_path), "--repo-id", "me/m")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: push to me/m failed: cannot reach the Hub"), line
    assert TOKEN not in line
    # offline mode (HF_HUB_OFFLINE=1) too
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    (tmp_path / "again").mkdir()
    res = _push(make_checkpoint(tmp_path / "again"), "--repo-id", "me/m")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
