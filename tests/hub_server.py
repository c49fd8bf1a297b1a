"""A fake Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client talks to it.

It implements the endpoints huggingface_hub calls to resolve and download a model repo (read in
huggingface_hub's hf_api.py, file_download.py and _snapshot_download.py):

* ``GET /api/models/{repo}/revision/{rev}``: repo info (``sha``, ``siblings``);
* ``GET /api/models/{repo}/tree/{rev}``: the recursive file listing (one page);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a file, with the ``X-Repo-Commit``, ``ETag``
  and ``Content-Length`` headers the client checks.

Errors carry the ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) that huggingface_hub turns into its typed errors. Every request is logged, so a test
can assert exactly which files a command downloaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    """A model repo: commits (sha -> {path: bytes}) and refs (branch/tag -> sha)."""

    commits: dict[str, dict[str, bytes]]
    refs: dict[str, str]
    gated: bool = False
    moves: dict[str, str] = field(default_factory=dict)
    """ref -> the commit it points to once it has been resolved (``GET /api/.../revision/REF``):
    a branch pushed to while a command runs."""

    def commit_for(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


def commit_sha(label: str) -> str:
    """A 40-hex commit id (what the Hub uses, and what huggingface_hub's regex expects)."""
    return hashlib.sha1(label.encode()).hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def downloaded(self, method: str = "GET") -> set[str]:
        """Repository paths fetched with ``method`` from /resolve/ (any repo, any revision)."""
        return downloaded(self.requests, method)

    def clear(self) -> None:
        self.requests.clear()


def downloaded(requests: list[tuple[str, str]], method: str = "GET") -> set[str]:
    """Repository paths of ``requests`` (a FakeHub's log) fetched with ``method`` from
    /resolve/ (any repo, any revision)."""
    out = set()
    for m, path in requests:
        if m == method and "/resolve/" in path:
            out.add(path.split("/resolve/", 1)[1].split("/", 1)[1])
    return out


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: the log is FakeHub.requests
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.fake.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:
            repo, what, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
            self._api(repo, what, rev)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            self._resolve(repo, rev, file, body)
        else:
            self._error(404, "RepoNotFound", "not a Hub endpoint")

    def _repo(self, repo_id: str, rev: str) -> tuple[FakeRepo, str] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated:
            self._error(401, "GatedRepo", "Access to this model is restricted")
            return None
        commit = repo.commit_for(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, commit

    def _api(self, repo_id: str, what: str, rev: str) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        if what == "revision" and rev in repo.moves:
            repo.refs[rev] = repo.moves.pop(rev)  # answered with the old commit, then moved
        if what == "revision":
            data: object = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": False,
                "siblings": [{"rfilename": f} for f in sorted(files)],
            }
        elif what == "tree":
            data = [
                {"type": "file", "path": f, "size": len(b), "oid": _git_oid(b)}
                for f, b in sorted(files.items())
            ]
        else:
            self._error(404, "RepoNotFound", "unknown API")
            return
        self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, rev: str, file: str, body: bool) -> None:
        found = self._repo(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        data = repo.commits[commit].get(file)
        if data is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{_git_oid(data)}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, data, headers, body=body)

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        payload = json.dumps({"error": message}).encode()
        self._send(status, payload, {"Content-Type": "application/json", **headers})

    def _send(self, status: int, data: bytes, headers: dict, body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)


def _git_oid(data: bytes) -> str:
    # The Hub's ETag for a regular file is its git blob id.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
