"""A fake Hugging Face Hub for tests: an in-memory Hub speaking the Hub's HTTP API on 127.0.0.1.

This is the HTTP boundary fake allowed by the project rule "Only the HF Hub, which is
unreachable here, may be faked at its HTTP boundary". A real HTTP server (``http.server`` in a
thread) answers on loopback, and the real, unmodified ``huggingface_hub`` client talks to it over
sockets through ``HF_ENDPOINT``. Nothing in ``huggingface_hub`` is mocked; the ``fake_hub``
fixture only points the client's settings (environment variables and the module constants derived
from them) at the server.

Model repos only. Endpoints, written against the huggingface_hub 2.4 client code:

- ``GET  /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds size/blobId/lfs to siblings):
  ``model_info``, ``repo_info``, ``repo_exists``, ``revision_exists``, ``resolve_revision``
- ``GET  /api/models/{repo}/tree/{rev}[/{path}]`` (recursive, expand, Link-header pagination):
  ``list_repo_tree``, ``list_repo_files``, ``HfFileSystem.ls/find/info``
- ``POST /api/models/{repo}/paths-info/{rev}`` (form data): ``get_paths_info``,
  ``HfFileSystem.info``
- ``GET  /api/models/{repo}/refs``, ``GET /api/models/{repo}/commits/{rev}``,
  ``POST /api/models/{repo}/branch/{branch}``: ``list_repo_refs/commits``, ``create_branch``
- ``HEAD|GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` and
  ``X-Linked-Size`` (LFS files), ``Content-Length``, ``Accept-Ranges`` and ``Range`` -> 206/416:
  ``hf_hub_download``, ``file_exists``, ``HfFileSystem.open``
- ``POST /api/repos/create``, ``DELETE /api/repos/delete``: ``create_repo``, ``delete_repo``
- ``POST /api/models/{repo}/preupload/{rev}`` ("lfs" for ``*.safetensors`` and files > 10 MiB),
  ``POST /{repo}.git/info/lfs/objects/batch`` (``transfer: basic``, never Xet), the upload (``PUT``,
  presigned-URL style) and verify actions it points to, and the NDJSON
  ``POST /api/models/{repo}/commit/{rev}``: ``create_commit``, ``upload_file``, ``upload_folder``,
  ``delete_file``, ``HfFileSystem.put_file/pipe_file/rm``
- ``GET /api/whoami-v2``, ``POST /api/validate-yaml`` (sent when a README.md is committed)

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). A private repo read without the token gets a 401 with
``RepoNotFound`` (the client turns it into ``RepositoryNotFoundError``, as it does for the real
Hub); a wrong token gets the real Hub's 401 "Invalid credentials in Authorization header".
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode

import pytest

LFS_THRESHOLD = 10 * 1024 * 1024  # bytes; larger files are stored with LFS, like on the Hub
LFS_SUFFIXES = (".safetensors",)
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"


@dataclass
class _Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha


@dataclass
class _Request:
    method: str
    path: str  # raw, still percent-encoded, without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body or b"{}")

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _HubError(Exception):
    """An error answered the way the Hub does: JSON body plus X-Error-Code / X-Error-Message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})

    def response(self) -> _Response:
        headers = {**self.headers, "X-Error-Message": self.message}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message}, self.status, headers)


def _json(obj, status: int = 200, headers=None, content_type="application/json") -> _Response:
    return _Response(
        status, json.dumps(obj).encode(), {"Content-Type": content_type, **(headers or {})}
    )


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub; every answer has a Content-Length

    def do_GET(self):
        self.server.hub._serve(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def setup(self):
        super().setup()
        self.server.hub._connections.add(self.connection)

    def finish(self):
        self.server.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass


class FakeHub:
    """An in-memory Hugging Face Hub speaking its HTTP API on 127.0.0.1 (a real HTTP server in a
    thread).

    ``token``: if set, private repos and every write need ``Authorization: Bearer <token>``; if
    ``None``, nothing is checked. ``requests`` logs ``(method, path)`` of every request received
    (path percent-decoded, without query) and ``request_headers`` their headers (lower-case names),
    index for index. ``fail_next`` injects failures. Repos created through the API start, as on
    the Hub, with an "initial commit" holding a ``.gitattributes``; ``add_repo`` seeds exactly the
    files given.
    """

    _ROUTES = [
        ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "_api_model_info"),
        ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "_api_tree"),
        ("POST", rf"/api/models/{_REPO}/paths-info/{_REV}", "_api_paths_info"),
        ("GET", rf"/api/models/{_REPO}/refs", "_api_refs"),
        ("GET", rf"/api/models/{_REPO}/commits/{_REV}", "_api_commits"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "_api_create_branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "_api_preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "_api_commit"),
        ("POST", r"/api/repos/create", "_api_create_repo"),
        ("DELETE", r"/api/repos/delete", "_api_delete_repo"),
        ("GET", r"/api/whoami-v2", "_api_whoami"),
        ("POST", r"/api/validate-yaml", "_api_validate_yaml"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "_lfs_batch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "_lfs_verify"),
        ("PUT", r"/__fakehub/lfs-upload/(?P<oid>[0-9a-f]{64})", "_lfs_upload"),
        ("GET", rf"/api/models/{_REPO}/xet-(?:read|write)-token/{_REV}", "_xet_token"),
        ("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "_resolve"),
    ]
    _ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in _ROUTES]

    def __init__(self, token: str | None = None, username: str = "fakehub-user"):
        self.token = token
        self.username = username
        self.url = ""
        self.requests: list[tuple[str, str]] = []
        self.request_headers: list[dict[str, str]] = []
        self.tree_page_size = 1000  # the Hub's page size (50 with expand=True)
        self._repos: dict[str, _Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}  # sha256 -> content: LFS uploads + committed files
        self._failures: list[list] = []  # [path substring, remaining, kind, method, body part]
        self._digests: dict[tuple[str, bytes], str] = {}
        self._counter = 0
        self._lock = threading.RLock()
        self._connections: set[socket.socket] = set()
        self._upload_signature = secrets.token_hex(16)  # "presigns" the LFS upload URLs
        self._server: ThreadingHTTPServer | None = None

    # ----------------------------------------------------------------------------------- lifecycle

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakehub",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for conn in list(self._connections):  # unblock keep-alive handler threads
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ test helpers

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """Create ``repo_id`` holding exactly ``files`` (one commit), or, if it exists, add a commit
        on ``main`` that adds/overwrites ``files``. Returns the new commit sha."""
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._repos[repo_id] = _Repo(repo_id, private, _now())
                return self._commit(repo, "main", dict(files), "initial commit").sha
            head = repo.commits[repo.branches["main"]]
            return self._commit(repo, "main", {**head.files, **files}, "add files").sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve_rev(self._repos[repo_id], revision).files)

    def commits(self, repo_id: str) -> list[str]:
        """Commit shas of ``main``, newest first (the order of ``HfApi.list_repo_commits``)."""
        with self._lock:
            repo = self._repos[repo_id]
            return [c.sha for c in self._history(repo, repo.commits[repo.branches["main"]])]

    def fail_next(
        self,
        path_contains: str,
        times: int = 1,
        *,
        kind: int | str = 500,
        method: str | None = None,
        body_contains: bytes = b"",
    ) -> None:
        """Make the next ``times`` requests whose path contains ``path_contains`` (and whose method
        is ``method``, and whose body contains ``body_contains``, if given) fail. ``kind``: an HTTP
        status (500, 503, 429...) answered with a JSON error; ``"drop"``: close the connection
        without answering; ``"truncate"``: answer normally but close the connection after half of
        the body (use ``method="GET"``)."""
        with self._lock:
            self._failures.append([path_contains, times, kind, method, body_contains])

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()

    # ------------------------------------------------------------------------------ HTTP plumbing

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        raw_path, _, query = handler.path.partition("?")
        headers = {k.lower(): v for k, v in handler.headers.items()}
        req = _Request(handler.command, raw_path, parse_qs(query), headers, _read_body(handler))
        with self._lock:
            self.requests.append((req.method, unquote(raw_path)))
            self.request_headers.append(headers)
            failure = self._pop_failure(req.method, unquote(raw_path), req.body)
        if failure == "drop":
            handler.close_connection = True
            return
        if isinstance(failure, int):
            resp = _HubError(failure, f"FakeHub: injected HTTP {failure}").response()
        else:
            resp = self._dispatch(req)
        handler.send_response(resp.status)
        for name, value in resp.headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(resp.body)))
        handler.end_headers()
        truncate = failure == "truncate"
        if req.method != "HEAD":
            handler.wfile.write(resp.body[: len(resp.body) // 2] if truncate else resp.body)
        if truncate:  # the client sees the connection die mid-body
            handler.close_connection = True

    def _pop_failure(self, method: str, path: str, body: bytes) -> int | str | None:
        for rule in self._failures:
            substring, remaining, kind, only_method, in_body = rule
            if (
                remaining > 0
                and substring in path
                and only_method in (None, method)
                and in_body in body
            ):
                rule[1] -= 1
                return kind
        return None

    def _dispatch(self, req: _Request) -> _Response:
        for method, pattern, name in self._ROUTES:
            match = pattern.fullmatch(req.path)
            if match and (method == req.method or (method, req.method) == ("GET", "HEAD")):
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                try:
                    with self._lock:
                        return getattr(self, name)(req, **args)
                except _HubError as err:
                    return err.response()
        return _HubError(404, f"FakeHub: no route for {req.method} {req.path}").response()

    # ------------------------------------------------------------------------------ model & state

    def _authorized(self, req: _Request) -> bool:
        if self.token is None:
            return True
        auth = req.headers.get("authorization")
        if auth is None:
            return False
        if auth != f"Bearer {self.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, req: _Request, repo_id: str, write: bool = False) -> _Repo:
        authorized = self._authorized(req)
        repo = self._repos.get(repo_id)
        if repo is None or ((repo.private or write) and not authorized):
            # As the Hub: 401 when anonymous, 404 when authenticated. Over https the client maps any
            # 401 on a repo URL to RepositoryNotFoundError; over http only X-Error-Code does.
            if authorized:
                raise _HubError(404, "Repository not found", "RepoNotFound")
            raise _HubError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _resolve_rev(self, repo: _Repo, rev: str) -> _Commit:
        rev = rev.removeprefix("refs/heads/")
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _commit(self, repo: _Repo, branch: str, files: dict[str, bytes], title: str, message=""):
        self._counter += 1
        parent = repo.branches.get(branch)
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{title}\n{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{self._oid(path, files[path])}\n".encode())
        for path, data in files.items():  # the LFS store knows every LFS file of every commit
            if _is_lfs(path, len(data)):
                self._lfs_objects[self._digest("sha256", data)] = data
        commit = _Commit(digest.hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit

    def _history(self, repo: _Repo, commit: _Commit) -> list[_Commit]:
        out = [commit]
        while out[-1].parent is not None:
            out.append(repo.commits[out[-1].parent])
        return out

    def _digest(self, kind: str, data: bytes) -> str:
        """``kind``: "sha256" or "git" (git blob sha1); cached, LFS files can be large."""
        key = (kind, data)
        if key not in self._digests:
            sha256 = kind == "sha256"
            self._digests[key] = hashlib.sha256(data).hexdigest() if sha256 else _git_sha1(data)
        return self._digests[key]

    def _lfs_pointer(self, data: bytes) -> bytes:
        sha256 = self._digest("sha256", data)
        spec = "version https://git-lfs.github.com/spec/v1"
        return f"{spec}\noid sha256:{sha256}\nsize {len(data)}\n".encode()

    def _oid(self, path: str, data: bytes) -> str:
        """Git blob id: of the content, or of the LFS pointer for LFS files (as on the Hub)."""
        return (
            _git_sha1(self._lfs_pointer(data))
            if _is_lfs(path, len(data))
            else self._digest("git", data)
        )

    def _lfs_info(self, path: str, data: bytes) -> dict | None:
        if not _is_lfs(path, len(data)):
            return None
        pointer_size = len(self._lfs_pointer(data))
        return {
            "sha256": self._digest("sha256", data),
            "size": len(data),
            "pointerSize": pointer_size,
        }

    @staticmethod
    def _dirs(files: dict[str, bytes]) -> set[str]:
        return {path.rsplit("/", i)[0] for path in files for i in range(1, path.count("/") + 1)}

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict:
        """A tree / paths-info entry, as the Hub serves it."""
        if path in commit.files:
            data = commit.files[path]
            entry = {"type": "file", "oid": self._oid(path, data), "size": len(data), "path": path}
            if lfs := self._lfs_info(path, data):
                entry["lfs"] = {
                    "oid": lfs["sha256"],
                    "size": lfs["size"],
                    "pointerSize": lfs["pointerSize"],
                }
        else:
            below = sorted(p for p in commit.files if p.startswith(path + "/"))
            tree = "".join(f"{p}\0{self._oid(p, commit.files[p])}\n" for p in below)
            entry = {
                "type": "directory",
                "oid": hashlib.sha1(tree.encode()).hexdigest(),
                "size": 0,
                "path": path,
            }
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
            if entry["type"] == "file":
                entry["securityFileStatus"] = {
                    "status": "safe",
                    "avScan": None,
                    "pickleImportScan": None,
                }
        return entry

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str) -> _Commit:
        def view(c: _Commit):
            if path in c.files:
                return c.files[path]
            return {p: d for p, d in c.files.items() if p.startswith(path + "/")}

        history = self._history(repo, commit)
        for newer, older in zip(history, history[1:], strict=False):
            if view(newer) != view(older):
                return newer
        return history[-1]

    # --------------------------------------------------------------------------------- read API

    def _api_model_info(self, req: _Request, repo: str, rev: str = "main") -> _Response:
        repo_ = self._repo(req, repo)
        commit = self._resolve_rev(repo_, rev)
        siblings = []
        for path in sorted(commit.files):
            sibling = {"rfilename": path}
            if req.flag("blobs"):
                data = commit.files[path]
                sibling.update(size=len(data), blobId=self._oid(path, data))
                if lfs := self._lfs_info(path, data):
                    sibling["lfs"] = lfs
            siblings.append(sibling)
        return _json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo_.created_at,
                "private": repo_.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(len(d) for d in commit.files.values()),
            }
        )

    def _api_tree(self, req: _Request, repo: str, rev: str, path: str = "") -> _Response:
        repo_ = self._repo(req, repo)
        commit = self._resolve_rev(repo_, rev)
        path = path.strip("/")
        dirs = self._dirs(commit.files)
        if path and path not in dirs:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound")
        prefix = path + "/" if path else ""
        below = [p for p in [*dirs, *commit.files] if p.startswith(prefix)]
        if not req.flag("recursive"):
            below = [p for p in below if "/" not in p[len(prefix) :]]
        below.sort(key=lambda p: (p not in dirs, p))  # folders first, like the Hub
        expand = req.flag("expand")
        page_size = 50 if expand else self.tree_page_size
        start = int(req.query.get("cursor", ["0"])[0])
        page = [self._entry(repo_, commit, p, expand) for p in below[start : start + page_size]]
        headers = {}
        if start + page_size < len(below):
            query = {k: v[0] for k, v in req.query.items()} | {"cursor": start + page_size}
            headers["Link"] = f'<{self.url}{req.path}?{urlencode(query)}>; rel="next"'
        return _json(page, headers=headers)

    def _api_paths_info(self, req: _Request, repo: str, rev: str) -> _Response:
        repo_ = self._repo(req, repo)
        commit = self._resolve_rev(repo_, rev)
        form = parse_qs(req.body.decode())
        expand = form.get("expand", ["false"])[0].lower() == "true"
        dirs = self._dirs(commit.files)
        paths = [p.strip("/") for p in form.get("paths", [])]
        entries = [
            self._entry(repo_, commit, p, expand) for p in paths if p in commit.files or p in dirs
        ]
        return _json(entries)

    def _api_refs(self, req: _Request, repo: str) -> _Response:
        repo_ = self._repo(req, repo)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
            for name, sha in sorted(repo_.branches.items())
        ]
        return _json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _api_commits(self, req: _Request, repo: str, rev: str) -> _Response:
        repo_ = self._repo(req, repo)
        commits = self._history(repo_, self._resolve_rev(repo_, rev))
        return _json(
            [
                {
                    "id": c.sha,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": self.username}],
                }
                for c in commits
            ]
        )

    def _resolve(self, req: _Request, repo: str, rev: str, path: str) -> _Response:
        commit = self._resolve_rev(self._repo(req, repo), rev)
        if path not in commit.files:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "ETag": f'"{self._oid(path, data)}"',
        }
        if lfs := self._lfs_info(path, data):
            # The Hub redirects LFS files to a CDN; the file metadata is in these headers.
            headers["ETag"] = headers["X-Linked-Etag"] = f'"{lfs["sha256"]}"'
            headers["X-Linked-Size"] = str(len(data))
        if "range" not in req.headers:
            return _Response(200, data, headers)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers["range"].strip())
        if not match or match.groups() == ("", ""):
            raise _HubError(416, "Invalid range", headers={"Content-Range": f"bytes */{len(data)}"})
        first, last = match.groups()
        if first:
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
        else:  # suffix range: the last N bytes
            start, end = max(len(data) - int(last), 0), len(data) - 1
        if start >= len(data) or start > end:
            raise _HubError(
                416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{len(data)}"}
            )
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return _Response(206, data[start : end + 1], headers)

    # -------------------------------------------------------------------------------- write API

    def _api_whoami(self, req: _Request) -> _Response:
        if not self._authorized(req):
            raise _HubError(401, "Invalid username or password.")
        return _json({"type": "user", "name": self.username, "fullname": self.username, "orgs": []})

    def _api_validate_yaml(self, req: _Request) -> _Response:
        return _json({"errors": [], "warnings": []})

    def _api_create_repo(self, req: _Request) -> _Response:
        if not self._authorized(req):
            raise _HubError(401, "Invalid username or password.")
        body = req.json()
        if body.get("type") not in (None, "model"):
            raise _HubError(400, "FakeHub only supports model repos")
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self._repos:
            return _json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = self._repos[repo_id] = _Repo(repo_id, private, _now())
        self._commit(repo, "main", {".gitattributes": DEFAULT_GITATTRIBUTES}, "initial commit")
        return _json(
            {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}
        )

    def _api_delete_repo(self, req: _Request) -> _Response:
        body = req.json()
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        self._repo(req, repo_id, write=True)
        del self._repos[repo_id]
        return _Response(200)

    def _api_create_branch(self, req: _Request, repo: str, branch: str) -> _Response:
        repo_ = self._repo(req, repo, write=True)
        if branch in repo_.branches:
            raise _HubError(409, f"Reference refs/heads/{branch} already exists")
        start = self._resolve_rev(repo_, req.json().get("startingPoint", "main"))
        repo_.branches[branch] = start.sha
        return _json({})

    def _writable_branch(self, req: _Request, repo: str, rev: str) -> tuple[_Repo, _Commit]:
        repo_ = self._repo(req, repo, write=True)
        if req.flag("create_pr"):
            raise _HubError(400, "FakeHub does not support create_pr")
        if rev.removeprefix("refs/heads/") not in repo_.branches:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo_, self._resolve_rev(repo_, rev)

    def _api_preupload(self, req: _Request, repo: str, rev: str) -> _Response:
        _, head = self._writable_branch(req, repo, rev)
        files = []
        for f in req.json()["files"]:
            path, lfs = f["path"], _is_lfs(f["path"], f["size"])
            remote = head.files.get(path)
            oid = None
            if (
                remote is not None
            ):  # sha256 for LFS files, git sha1 otherwise (as the client computes)
                oid = self._digest("sha256" if lfs else "git", remote)
            mode = "lfs" if lfs else "regular"
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": files, "commitOid": head.sha})

    def _api_commit(self, req: _Request, repo: str, rev: str) -> _Response:
        repo_, head = self._writable_branch(req, repo, rev)
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent is not None and parent != head.sha:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self._lfs_objects:
                    raise _HubError(400, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = self._lfs_objects[value["oid"]]
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].strip("/") + "/"
                if not any(p.startswith(folder) for p in files):
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                files = {p: d for p, d in files.items() if not p.startswith(folder)}
        branch = rev.removeprefix("refs/heads/")
        commit = self._commit(
            repo_, branch, files, header.get("summary", ""), header.get("description", "")
        )
        return _json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.url}/{repo}/commit/{commit.sha}",
                "pullRequestUrl": None,
            }
        )

    # -------------------------------------------------------------------------------- LFS API

    def _lfs_batch(self, req: _Request, repo: str) -> _Response:
        self._repo(req, repo, write=True)
        body = req.json()
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise _HubError(400, "FakeHub only supports LFS uploads with the basic transfer")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            if oid in self._lfs_objects:  # already stored: no action, the client skips the upload
                objects.append({"oid": oid, "size": size})
                continue
            signature = urlencode({"sig": self._upload_signature})
            upload = f"{self.url}/__fakehub/lfs-upload/{oid}?{signature}"
            verify = f"{self.url}/{quote(repo)}.git/info/lfs/objects/verify"
            actions = {
                "upload": {"href": upload, "header": {}},
                "verify": {"href": verify, "header": {}},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _json(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _xet_token(self, req: _Request, repo: str, rev: str) -> _Response:
        raise _HubError(501, "FakeHub speaks no Xet: set HF_HUB_DISABLE_XET=1 (fake_hub does)")

    def _lfs_upload(self, req: _Request, oid: str) -> _Response:
        """The presigned upload URL (S3 on the real Hub): authorized by its signature, no token."""
        if req.query.get("sig", [""])[0] != self._upload_signature:
            raise _HubError(403, "Bad upload signature")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise _HubError(400, "Uploaded content does not match its sha256")
        self._lfs_objects[oid] = req.body
        return _Response(200, headers={"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_verify(self, req: _Request, repo: str) -> _Response:
        self._repo(req, repo, write=True)
        body = req.json()
        data = self._lfs_objects.get(body["oid"])
        if data is None or len(data) != body["size"]:
            raise _HubError(404, f"LFS object {body['oid']} not found")
        return _json({"success": True})


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
        while handler.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


# ------------------------------------------------------------------------------------- fixture


def _fresh_constants():
    """Evaluate a private copy of ``huggingface_hub/constants.py`` in the current environment."""
    import huggingface_hub.constants

    spec = importlib.util.spec_from_file_location(
        "_fakehub_hf_constants", huggingface_hub.constants.__file__
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point_huggingface_hub_at(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, hf_home: Path) -> None:
    """Point the in-process ``huggingface_hub`` client at ``hub`` (all undone by ``monkeypatch``).

    ``huggingface_hub.constants`` reads its environment variables once, at import, and a few modules
    copied some of them (``from ..constants import ...``), so after setting the variables every
    module-level copy of a changed constant is patched too, plus the endpoint-derived values
    (``utils._http._HUB_ORIGINS``, the module-level ``HfApi``/``HfFileSystem`` instances).
    """
    import huggingface_hub.constants as constants
    from huggingface_hub import HfFileSystem, hf_api, hf_file_system
    from huggingface_hub.utils import _http

    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",  # else hf_xet uploads to a Xet CAS instead of HTTP/LFS
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_ASSETS_CACHE", "HF_XET_CACHE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if hub.token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", hub.token)

    fresh = _fresh_constants()
    missing = object()
    changed = {
        name: (getattr(constants, name), value)
        for name, value in vars(fresh).items()
        if name.isupper() and getattr(constants, name, missing) != value
    }
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("huggingface_hub"):
            continue
        for name, (old, new) in changed.items():
            if module is constants or getattr(module, name, missing) == old:
                monkeypatch.setattr(module, name, new)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(hub.url)})
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(hf_file_system.hffs, "endpoint", hub.url)
    monkeypatch.setattr(hf_file_system.hffs._api, "endpoint", hub.url)
    _reset_clients(HfFileSystem, hf_file_system.hffs, _http)


def _reset_clients(hffs_class, hffs, http_module) -> None:
    """Forget pooled connections and cached HfFileSystem instances/listings."""
    http_module.close_session()
    hffs_class.clear_instance_cache()
    hffs.invalidate_cache()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A started ``FakeHub`` (token ``hf_fakehub_token``) with ``huggingface_hub`` pointed at it:
    ``HF_ENDPOINT``, ``HF_TOKEN``, offline mode off, Xet and telemetry off, cache in
    ``tmp_path``."""
    from huggingface_hub import HfFileSystem, hf_file_system
    from huggingface_hub.utils import _http

    hub = FakeHub(token="hf_fakehub_token").start()
    try:
        point_huggingface_hub_at(monkeypatch, hub, tmp_path / "hf_home")
        yield hub
    finally:
        hub.stop()
        _reset_clients(HfFileSystem, hf_file_system.hffs, _http)
