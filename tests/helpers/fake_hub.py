"""A tiny stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for the real ``huggingface_hub`` client.

Implements only what ``create_repo`` / ``repo_info`` / ``upload_folder`` / ``upload_file`` /
``file_exists`` call: ``POST /api/repos/create``, ``GET /api/models/<repo>[/revision/<rev>]``,
``POST /api/models/<repo>/preupload/<rev>`` (every file answered ``"regular"``, so contents travel
base64-encoded inside the commit: no LFS/xet transfer), ``POST /api/models/<repo>/commit/<rev>``
(NDJSON), ``HEAD|GET /<repo>/resolve/<rev>/<path>`` and ``POST /api/validate-yaml`` (model cards). Anything else is a 404 and is recorded,
so a test can assert that nothing unexpected was called.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    sha: str = "0" * 40


class FakeHub:
    def __init__(self, token: str | None = None, fail: dict[str, int] | None = None):
        self.token = token  # when set, write calls must carry "Bearer <token>"
        self.fail = fail or {}  # path regex -> status code to answer instead
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unhandled: list[str] = []
        self.validated_cards: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _read(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None, head: bool = False):
                data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if not isinstance(body, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _handle(self, method: str):
                body = self._read()
                hub.requests.append(Request(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                path = self.path.split("?")[0]
                for pattern, status in hub.fail.items():
                    if re.search(pattern, path):
                        return self._send(
                            status, {"error": f"forced {status}"}, {"X-Error-Message": f"forced {status}"}
                        )
                try:
                    return hub.dispatch(self, method, path, body)
                except Exception as exc:  # a bug in the fake: make it visible
                    hub.unhandled.append(f"{method} {path}: {exc!r}")
                    return self._send(500, {"error": repr(exc)})

            def do_GET(self):
                self._handle("GET")

            def do_HEAD(self):
                self._handle("HEAD")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- endpoints ----------------------------------------------------------------------------

    def _authorized(self, handler) -> bool:
        return self.token is None or handler.headers.get("Authorization") == f"Bearer {self.token}"

    def dispatch(self, h, method: str, path: str, body: bytes):
        not_found_repo = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
        if method == "POST" and path == "/api/repos/create":
            if not self._authorized(h):
                return h._send(401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials"})
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.repos:
                return h._send(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            self.repos[repo_id] = Repo(private=req.get("visibility") == "private" or bool(req.get("private")))
            return h._send(200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":  # upload_file("README.md") checks the card
            self.validated_cards.append(json.loads(body)["content"])
            return h._send(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/agent-harnesses":  # the client's optional registry fetch
            return h._send(404, {"error": "not served"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if method == "GET" and m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return h._send(404, {"error": "Repository not found"}, not_found_repo)
            return h._send(
                200,
                {
                    "id": m.group(1),
                    "sha": repo.sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in repo.files],
                },
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if method == "POST" and m:
            repo_id, what = m.group(1), m.group(2)
            repo = self.repos.get(repo_id)
            if repo is None:
                return h._send(404, {"error": "Repository not found"}, not_found_repo)
            if not self._authorized(h):
                return h._send(401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials"})
            if what == "preupload":
                files = json.loads(body)["files"]
                return h._send(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            ops = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(o["value"] for o in ops if o["key"] == "header")
            added = {}
            for op in ops:
                if op["key"] == "file":
                    v = op["value"]
                    assert v["encoding"] == "base64", v
                    added[v["path"]] = base64.b64decode(v["content"])
                elif op["key"] != "header":
                    raise ValueError(f"unsupported commit operation {op['key']}")
            repo.files.update(added)
            repo.sha = hashlib.sha1(repr(sorted(repo.files.items())).encode()).hexdigest()
            repo.commits.append({"summary": header["summary"], "files": sorted(added), "revision": m.group(3)})
            return h._send(
                200,
                {"commitUrl": f"{self.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha, "pullRequestUrl": None},
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("HEAD", "GET") and m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return h._send(404, None, not_found_repo, head=method == "HEAD")
            data = repo.files.get(m.group(3))
            if data is None:
                return h._send(
                    404,
                    None,
                    {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"},
                    head=method == "HEAD",
                )
            etag = hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            return h._send(200, data, headers, head=method == "HEAD")
        self.unhandled.append(f"{method} {path}")
        return h._send(404, {"error": "not implemented by FakeHub"})
