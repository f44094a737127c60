"""A local stand-in for the Hugging Face Hub: the API calls huggingface_hub 2.4 makes to push and download a repo.

Serves create_repo, validate-yaml, preupload ("regular" mode only, so no LFS or Xet transfer), NDJSON commits,
branches, pull requests, repo info at a revision, tree listings and file resolution (HEAD and GET) on
127.0.0.1, with blobs stored in a temporary folder. It knows one valid token; a request with another gets the
Hub's 401. `fail_from(route)` makes the server drop every connection from the first request to that route on,
as a Hub going down mid-upload would. Requests are bounded in size, time and number.

With hf_xet installed, upload_folder takes huggingface_hub's pipelined path (preupload, then one commit per batch
of files); "regular" upload mode keeps every file inside the NDJSON commit as base64, so no Xet or LFS server is
needed. huggingface_hub reads HF_ENDPOINT when it is imported, so tests point it here by patching its constants (see
the `hub` fixture in test_hub.py), and goat_hf makes a new HfApi for each call.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY = 64 * 1024 * 1024
MAX_REQUESTS = 2000
SOCKET_TIMEOUT = 10.0  # seconds a connection may sit idle
NAMESPACE = "goat-user"  # the token's user, for repo ids given without a namespace
EMPTY_COMMIT = "0" * 40

API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>[a-z-]+)(?:/(?P<rev>[^/]+)(?P<rest>/.*)?)?)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
BAD_TOKEN = "Invalid credentials in Authorization header"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.body = status, code, body


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=lambda: {"main": EMPTY_COMMIT})
    commits: dict[str, dict[str, str]] = field(default_factory=lambda: {EMPTY_COMMIT: {}})  # sha -> {path: blob}
    pulls: list[str] = field(default_factory=list)


class LocalHub:
    """The server and its state; `start()` and `stop()` (the test fixture calls both)."""

    def __init__(self, storage: Path, token: str) -> None:
        self.storage = storage
        self.storage.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.commit_messages: list[str] = []
        self.failing_route: str | None = None
        self.down = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def fail_from(self, route: str) -> None:
        """Drop every connection from the first request whose route is `route` (e.g. "commit") on."""
        self.failing_route = route

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.branches.get(revision, revision)
        return {path: (self.storage / blob).read_bytes() for path, blob in repo.commits[sha].items()}

    # ---- routes ----

    def handle(self, method: str, raw_path: str, query: dict, headers, body: bytes) -> tuple[int, dict, bytes]:
        self._authenticate(headers)
        if method == "POST" and raw_path == "/api/repos/create":
            return self._create_repo(json.loads(body), headers)
        if method == "POST" and raw_path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        match = API_REPO.match(raw_path)
        if match:
            repo_id, op = match["repo"], match["op"]
            rev = unquote(match["rev"]) if match["rev"] else None
            repo = self._repo(repo_id, headers)
            if method == "GET" and op in (None, "revision"):
                return self._repo_info(repo_id, repo, rev or "main")
            if method == "GET" and op == "tree":
                return self._tree(repo, rev, unquote((match["rest"] or "").lstrip("/")))
            if method == "POST" and op in ("preupload", "commit", "branch", "discussions"):
                self._require_write(headers)
                return getattr(self, f"_{op}")(repo_id, repo, rev, body, headers)
            if method == "GET" and op == "discussions":
                return self._pull_details(repo_id, repo, int(rev))
        match = RESOLVE.match(raw_path)
        if match and method in ("GET", "HEAD"):
            return self._resolve(match["repo"], unquote(match["rev"]), unquote(match["path"]), headers)
        raise HubError(404, f"No route for {method} {raw_path}")

    def _authenticate(self, headers) -> None:
        auth = headers.get("authorization")
        if auth is not None and auth != f"Bearer {self.token}":
            raise HubError(401, BAD_TOKEN)

    def _require_write(self, headers) -> None:
        if headers.get("authorization") is None:
            raise HubError(401, "You must be authenticated to write to a repo")

    def _repo(self, repo_id: str, headers) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and headers.get("authorization") is None):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _sha(self, repo: Repo, rev: str) -> str:
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")
        return sha

    def _create_repo(self, payload: dict, headers) -> tuple[int, dict, bytes]:
        self._require_write(headers)
        repo_id = f"{payload.get('organization') or NAMESPACE}/{payload['name']}"
        body = {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if repo_id in self.repos:
            return _json(409, {**body, "error": "You already created this model repo"})
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return _json(200, body)

    def _validate_yaml(self, payload: dict) -> tuple[int, dict, bytes]:
        content = payload["content"]
        errors = []
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content.split("---", 2)[1])
                if not isinstance(metadata, dict):
                    errors.append({"message": "metadata is not a mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        return _json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _preupload(self, repo_id: str, repo: Repo, rev: str, body: bytes, headers) -> tuple[int, dict, bytes]:
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in json.loads(body)["files"]
        ]
        return _json(200, {"files": files, "commitOid": self._sha(repo, rev)})

    def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes, headers) -> tuple[int, dict, bytes]:
        if headers.get("content-type") != "application/x-ndjson":
            raise HubError(400, "commit payloads are NDJSON")
        parent = self._sha(repo, rev)
        tree, summary = dict(repo.commits[parent]), ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file" and value.get("encoding") == "base64":
                content = base64.b64decode(value["content"])
                blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
                (self.storage / blob).write_bytes(content)
                tree[value["path"]] = blob
            elif item["key"] == "deletedFile":
                tree.pop(value["path"], None)
            else:
                raise HubError(400, f"this test hub takes regular base64 files only, not {item['key']}")
        sha = hashlib.sha1(json.dumps([parent, summary, sorted(tree.items())]).encode()).hexdigest()
        with self.lock:
            repo.commits[sha] = tree
            repo.branches[rev] = sha
            self.commit_messages.append(summary)
        return _json(200, {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def _branch(self, repo_id: str, repo: Repo, rev: str, body: bytes, headers) -> tuple[int, dict, bytes]:
        if rev in repo.branches:
            return _json(409, {"error": f"Branch {rev} already exists"})
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[rev] = self._sha(repo, start)
        return _json(200, {})

    def _discussions(self, repo_id: str, repo: Repo, rev: str, body: bytes, headers) -> tuple[int, dict, bytes]:
        payload = json.loads(body)
        repo.pulls.append(payload["title"])
        num = len(repo.pulls)
        repo.branches[f"refs/pr/{num}"] = repo.branches["main"]
        return _json(200, {"num": num})

    def _pull_details(self, repo_id: str, repo: Repo, num: int) -> tuple[int, dict, bytes]:
        return _json(
            200,
            {
                "num": num,
                "title": repo.pulls[num - 1],
                "status": "draft",
                "author": {"name": NAMESPACE},
                "createdAt": "2025-01-01T00:00:00.000Z",
                "repo": {"name": repo_id, "type": "model"},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
            },
        )

    def _repo_info(self, repo_id: str, repo: Repo, rev: str) -> tuple[int, dict, bytes]:
        sha = self._sha(repo, rev)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        return _json(
            200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings}
        )

    def _tree(self, repo: Repo, rev: str, prefix: str) -> tuple[int, dict, bytes]:
        tree = repo.commits[self._sha(repo, rev)]
        entries = [
            {"type": "file", "path": path, "oid": blob, "size": (self.storage / blob).stat().st_size}
            for path, blob in sorted(tree.items())
            if path.startswith(prefix)
        ]
        return _json(200, entries)

    def _resolve(self, repo_id: str, rev: str, path: str, headers) -> tuple[int, dict, bytes]:
        repo = self._repo(repo_id, headers)
        sha = self._sha(repo, rev)
        blob = repo.commits[sha].get(path)
        if blob is None:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        content = (self.storage / blob).read_bytes()
        return 200, {"X-Repo-Commit": sha, "ETag": f'"{blob}"', "Content-Type": "application/octet-stream"}, content


def _json(status: int, body) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def _serve(self, method: str) -> None:
        hub: LocalHub = self.server.hub
        split = urlsplit(self.path)
        route = self._route_name(split.path)
        length = int(self.headers.get("Content-Length") or 0)
        with hub.lock:
            hub.requests.append((method, split.path))
            if hub.failing_route is not None and route == hub.failing_route:
                hub.down = True
            down, too_many = hub.down, len(hub.requests) > MAX_REQUESTS
        if down:  # a Hub that went away: no answer at all
            self.close_connection = True
            self.connection.close()
            return
        if length > MAX_BODY or too_many:
            self._send(413 if length > MAX_BODY else 503, {"Content-Type": "application/json"}, b"{}", method)
            return
        body = self.rfile.read(length) if length else b""
        try:
            status, headers, payload = hub.handle(method, split.path, parse_qs(split.query), self.headers, body)
        except HubError as error:
            headers = {"Content-Type": "application/json", "X-Error-Message": str(error)}
            if error.code:
                headers["X-Error-Code"] = error.code
            status, payload = error.status, json.dumps(error.body or {"error": str(error)}).encode()
        self._send(status, headers, payload, method)

    @staticmethod
    def _route_name(path: str) -> str:
        match = API_REPO.match(path)
        if match and match["op"]:
            return match["op"]
        return "resolve" if RESOLVE.match(path) else path

    def _send(self, status: int, headers: dict, payload: bytes, method: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")
