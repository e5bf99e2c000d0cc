"""A small in-memory stand-in for the Hugging Face Hub, for tests that must never reach the real one.

It speaks the part of the Hub HTTP API that huggingface_hub (and through it timm and transformers) uses to
create a repo, upload in one commit and download files:

- ``POST /api/repos/create``, ``POST /api/models/<repo>/branch/<branch>``
- ``POST /api/models/<repo>/preupload/<rev>``: every file is "regular" (inline base64 in the commit), so
  neither LFS nor Xet is involved, and ``shouldIgnore`` is false
- ``POST /api/models/<repo>/commit/<rev>``: the ndjson commit (header, file, deletedFile lines)
- ``GET /api/models/<repo>/tree/<rev>``, ``GET /api/models/<repo>[/revision/<rev>]``
- ``HEAD|GET /<repo>/resolve/<rev>/<path>`` with ``X-Repo-Commit``, ``ETag`` and ``Content-Length``;
  misses answer 404 with the ``X-Error-Code`` huggingface_hub maps to its exceptions
- ``POST /api/validate-yaml`` (parses the card's YAML header), ``GET /api/whoami-v2``

Run it with ``with FakeHub() as hub: ... hub.url``; point clients at it with ``HF_ENDPOINT=hub.url`` before
huggingface_hub is imported (in a subprocess). ``hub.repos`` and ``hub.requests`` are there to inspect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def add_commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{message}\n{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(path.encode() + _git_blob_sha(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, files, parent)
        self.commits[commit.sha] = commit
        self.branches[branch] = commit.sha
        return commit


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read hub.requests instead
        return

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        self.server.hub.requests.append((self.command, url.path))
        body = self._body() if self.command == "POST" else b""
        hub = self.server.hub
        with hub.lock:
            if parts[:2] == ["api", "whoami-v2"]:
                return self._json(200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}})
            if parts[:2] == ["api", "validate-yaml"]:
                return self._validate_yaml(json.loads(body or b"{}"))
            if parts[:3] == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
                repo = self._repo(repo_id)
                if repo is None:
                    return None
                return self._repo_api(repo, rest, body, parse_qs(url.query))
            if len(parts) >= 5 and parts[2] == "resolve":
                repo = self._repo(f"{parts[0]}/{parts[1]}")
                if repo is None:
                    return None
                return self._resolve(repo, parts[3], "/".join(parts[4:]))
            return self._error(404, "NotFound", f"no route for {self.command} {url.path}")

    do_GET = do_POST = do_HEAD = _dispatch

    # ------------------------------------------------------------------ endpoints
    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            header = content.split("---", 2)[1]
            try:
                if not isinstance(yaml.safe_load(header), dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._json(400, {"errors": errors})
        return self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        hub = self.server.hub
        if repo_id in hub.repos:  # the Hub's 409 body carries the url too; create_repo(exist_ok=True) reads it
            message = "You already created this model repo"
            return self._json(409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message})
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        # The Hub starts every repo with a commit holding .gitattributes.
        repo.add_commit("main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs\n"})
        hub.repos[repo_id] = repo
        return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _repo_api(self, repo: Repo, rest: list[str], body: bytes, query: dict[str, list[str]]) -> None:
        if not rest or rest[0] == "revision":
            commit = repo.resolve(rest[1] if len(rest) > 1 else "main")
            if commit is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
            return self._json(
                200,
                {
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "sha": commit.sha,
                    "private": repo.private,
                    "siblings": siblings,
                    "tags": [],
                },
            )
        action, revision = rest[0], rest[1] if len(rest) > 1 else "main"
        if action == "branch":
            if revision in repo.branches:
                return self._error(409, "BranchExists", f"branch {revision} already exists")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            commit = repo.resolve(start)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {start}")
            repo.branches[revision] = commit.sha
            return self._json(200, {})
        commit = repo.resolve(revision)
        if action == "preupload":
            files = json.loads(body).get("files", [])
            current = commit.files if commit else {}
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": _git_blob_sha(current[f["path"]]) if f["path"] in current else None,
                }
                for f in files
            ]
            return self._json(200, {"files": answer, "commitOid": commit.sha if commit else None})
        if action == "commit":
            if revision not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return self._commit(repo, revision, body)
        if action == "tree":
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            entries = [
                {"type": "file", "path": path, "size": len(data), "oid": _git_blob_sha(data)}
                for path, data in sorted(commit.files.items())
            ]
            return self._json(200, entries)
        return self._error(404, "NotFound", f"no route for {action}")

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        hub = self.server.hub
        files = dict(repo.commits[repo.branches[branch]].files)
        message = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:  # lfsFile would need an LFS store; preupload never asks for it
                return self._error(400, "BadRequest", f"unsupported commit operation {key!r}")
        commit = repo.add_commit(branch, message, files)
        return self._json(
            200,
            {"success": True, "commitOid": commit.sha, "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{commit.sha}"},
        )

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if path not in commit.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{_git_blob_sha(data)}"',
            "Content-Type": "application/octet-stream",
        }
        self.server.hub.downloads.append((repo.repo_id, revision, path, self.command))
        return self._send(200, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class FakeHub:
    """``with FakeHub() as hub:`` serves on ``hub.url`` (127.0.0.1, a free port) until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.downloads: list[tuple[str, str, str, str]] = []
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits of ``branch``, newest first."""
        repo = self.repos[repo_id]
        out, sha = [], repo.branches.get(branch)
        while sha is not None:
            out.append(repo.commits[sha])
            sha = repo.commits[sha].parent
        return out
