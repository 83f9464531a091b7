"""A TEST DOUBLE of the Hugging Face Hub HTTP API, served on 127.0.0.1.

The real hub (huggingface.co) is unreachable from the machines this project is
built and tested on, so the hub source of the indexer is tested against this
small threaded ``http.server`` instead. It is not a hub: it serves a few model
repositories built from local files, and implements exactly the requests that
``huggingface_hub`` 2.x makes for ``snapshot_download``, ``model_info`` /
``repo_info``, ``list_repo_tree``, ``list_models`` and ``hf_hub_download``:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``:
  model info JSON with ``id``, ``sha``, ``siblings`` (``rfilename``; with
  ``?blobs=true`` also ``size``, ``blobId``, ``lfs``), ``tags``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: the file listing
  (``type``, ``oid``, ``size``, ``path``, ``lfs`` for ``.safetensors``).
- ``GET /api/models?filter=...&search=...&author=...&limit=...``: model search,
  every ``filter`` value must be one of the repo's tags; paginated with a
  ``Link: <...>; rel="next"`` header like the hub.
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with
  ``X-Repo-Commit``, ``ETag`` (git blob sha1, or the sha256 for LFS files),
  ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Content-Length`` and
  ``Range: bytes=N-`` support.
- Errors: 404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound`` (and ``X-Error-Message``), which ``huggingface_hub`` maps
  to its typed exceptions.

Every request is recorded in ``HubDouble.requests`` as ``(method, path)`` so
tests can check what the client asked for.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_DATE = "2024-01-01T00:00:00.000Z"


@dataclass
class RepoFileEntry:
    """One file of one commit: where its bytes live and its hub identifiers."""

    path: str
    local: Path
    size: int
    git_sha1: str
    sha256: str

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def etag(self) -> str:
        # The hub's ETag is the sha256 for LFS files and the git blob id otherwise.
        return self.sha256 if self.is_lfs else self.git_sha1


@dataclass
class Repo:
    """A model repository: commits (sha -> files) and refs (branch/tag -> sha)."""

    repo_id: str
    tags: list[str] = field(default_factory=list)
    commits: dict[str, dict[str, RepoFileEntry]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """A branch, tag or full commit sha -> the commit sha, or None."""
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def _entry(path: str, local: Path) -> RepoFileEntry:
    data = local.read_bytes()
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return RepoFileEntry(path, local, len(data), git, hashlib.sha256(data).hexdigest())


class HubDouble:
    """The repositories the fake hub serves, plus the server that serves them.

    Args:
        root: a folder where files given as bytes are written.
        page_size: models per page of ``/api/models`` (the hub uses 1000).
    """

    def __init__(self, root: Path, page_size: int = 1000) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ---------------------------------------------------------------------------------------------
    def add_commit(
        self, repo_id: str, files: Mapping[str, Path | bytes], tags: list[str] | None = None, branch: str = "main"
    ) -> str:
        """Add a commit to a repo (created if new) and move ``branch`` to it.

        Args:
            repo_id: ``owner/name``.
            files: path in repo -> local file or bytes (the whole tree of the commit).
            tags: the repo's tags (search filters match them); kept when None.
            branch: the branch that now points at the commit.

        Returns:
            the commit sha (40 hex digits).
        """
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        if tags is not None:
            repo.tags = list(tags)
        entries: dict[str, RepoFileEntry] = {}
        for path, src in sorted(files.items()):
            if isinstance(src, bytes):
                local = self.root / hashlib.sha256(src).hexdigest()
                local.write_bytes(src)
                src = local
            entries[path] = _entry(path, Path(src))
        parent = repo.refs.get(branch, "")
        listing = json.dumps([repo_id, parent, [(p, e.git_sha1) for p, e in entries.items()]])
        sha = hashlib.sha1(listing.encode()).hexdigest()
        repo.commits[sha] = entries
        repo.refs[branch] = sha
        return sha

    # -- server ----------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` (pass as ``endpoint=`` or ``HF_ENDPOINT``)."""
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubDouble:
        """Serve on a free port of 127.0.0.1 in a daemon thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="hub-double", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    # -- answers ---------------------------------------------------------------------------------------------
    def model_json(self, repo: Repo, sha: str, full: bool = True, blobs: bool = False) -> dict[str, Any]:
        """The ``/api/models/...`` JSON of a repo at a commit (``blobs``: siblings with size, blob id, lfs)."""
        out: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": sha,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": list(repo.tags),
            "lastModified": _DATE,
            "createdAt": _DATE,
            "downloads": 0,
            "likes": 0,
        }
        if full:
            out["siblings"] = [self._sibling(e, blobs) for e in repo.commits[sha].values()]
        return out

    @staticmethod
    def _sibling(e: RepoFileEntry, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": e.path}
        out: dict[str, Any] = {"rfilename": e.path, "size": e.size, "blobId": e.git_sha1}
        if e.is_lfs:
            out["lfs"] = {"sha256": e.sha256, "size": e.size, "pointerSize": 134}
        return out

    def tree_json(self, entries: Mapping[str, RepoFileEntry], prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """The ``/tree/`` listing under ``prefix`` (folders first, like the hub)."""
        base = prefix.strip("/")
        dirs: set[str] = set()
        files: list[dict[str, Any]] = []
        for path, e in entries.items():
            if base and not path.startswith(base + "/"):
                continue
            rest = path[len(base) + 1:] if base else path
            parts = rest.split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):
                dirs.add("/".join(([base] if base else []) + parts[:i]))
            if recursive or len(parts) == 1:
                item: dict[str, Any] = {"type": "file", "oid": e.git_sha1, "size": e.size, "path": path}
                if e.is_lfs:
                    item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
                files.append(item)
        folders = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
                   for d in sorted(dirs)]
        return folders + files

    def search(self, params: Mapping[str, list[str]]) -> list[dict[str, Any]]:
        """``/api/models`` results before paging, sorted by id."""
        filters = params.get("filter", [])
        search = (params.get("search") or [""])[0].lower()
        author = (params.get("author") or [""])[0]
        out = []
        for rid in sorted(self.repos):
            repo = self.repos[rid]
            if not all(f in repo.tags for f in filters):
                continue
            if search and search not in rid.lower():
                continue
            if author and not rid.startswith(author + "/"):
                continue
            sha = repo.refs.get("main") or next(iter(repo.commits))
            out.append(self.model_json(repo, sha, full=bool(params.get("full"))))
        return out


class _Handler(BaseHTTPRequestHandler):
    """Routes the hub requests huggingface_hub makes (see the module docstring)."""

    server_version = "HubDouble/1.0"

    @property
    def hub(self) -> HubDouble:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the stderr access log
        return

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    # -- routing ---------------------------------------------------------------------------------------------
    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        self.hub.log(self.command, url.path + (f"?{url.query}" if url.query else ""))
        params = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        try:
            if parts[:2] == ["api", "models"] and len(parts) == 2:
                return self._list_models(params, url.path)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                return self._api_model(parts[2:], params)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
            if len(parts) >= 4 and parts[1] == "resolve":  # legacy repos without an owner
                return self._resolve(parts[0], parts[2], "/".join(parts[3:]), head)
        except BrokenPipeError:
            return
        self._error(404, "NotFound", f"no route for {url.path}")

    def _api_model(self, rest: list[str], params: Mapping[str, list[str]]) -> None:
        repo_id, tail = "/".join(rest[:2]), rest[2:]
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        blobs = (params.get("blobs") or ["false"])[0].lower() in ("true", "1")
        if not tail:
            return self._json(self.hub.model_json(repo, repo.refs["main"], blobs=blobs))
        if tail[0] == "revision" and len(tail) == 2:
            sha = repo.resolve(tail[1])
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {tail[1]}")
            return self._json(self.hub.model_json(repo, sha, blobs=blobs))
        if tail[0] == "tree" and len(tail) >= 2:
            sha = repo.resolve(tail[1])
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {tail[1]}")
            recursive = (params.get("recursive") or ["false"])[0].lower() in ("true", "1")
            return self._json(self.hub.tree_json(repo.commits[sha], "/".join(tail[2:]), recursive))
        return self._error(404, "NotFound", f"unknown model route {'/'.join(tail)}")

    def _list_models(self, params: Mapping[str, list[str]], path: str) -> None:
        results = self.hub.search(params)
        cursor = int((params.get("cursor") or ["0"])[0])
        limit = int((params.get("limit") or [str(self.hub.page_size)])[0])
        size = min(limit, self.hub.page_size)
        page = results[cursor:cursor + size]
        headers = {}
        if cursor + size < len(results):
            nxt = {k: v for k, v in params.items() if k != "cursor"} | {"cursor": [str(cursor + size)]}
            headers["Link"] = f'<{self.hub.endpoint}{path}?{urlencode(nxt, doseq=True)}>; rel="next"'
        self._json(page, headers)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        entry = repo.commits[sha].get(path)
        if entry is None:
            return self._error(404, "EntryNotFound", f"Entry not found: {path}", {"X-Repo-Commit": sha})
        start = self._range_start()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        if entry.is_lfs:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{entry.size - 1}/{entry.size}"
        self._send(status, "application/octet-stream", entry.size - start, headers)
        if not head:
            with open(entry.local, "rb") as fh:
                fh.seek(start)
                self.wfile.write(fh.read())

    # -- responses -------------------------------------------------------------------------------------------
    def _range_start(self) -> int:
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            return int(rng[6:-1] or 0)
        return 0

    def _send(self, status: int, ctype: str, length: int, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(200, "application/json", len(body), headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, "application/json", len(body), {"X-Error-Code": code, "X-Error-Message": message} | dict(headers or {}))
        if self.command != "HEAD":
            self.wfile.write(body)


def iter_repo_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(path in repo, local file) for every file under a folder, to build a commit from a tree."""
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            yield p.relative_to(folder).as_posix(), p



# -- the repos the tests use ---------------------------------------------------------------------------------------
GPT2 = "phuongsky__lora-gpt2-pipeline__outputs__adapter_model"
GPTNEO = "ironhack-labs__lab-lora-tuning-peft__peft_lab_outputs__checkpoint-35__adapter_model"
SD15 = "cloneofsimo__lora__example_loras__lora_disney_inpainting"


@dataclass
class DemoHub:
    """The started double and the commit shas of its demo repos."""

    hub: HubDouble
    shas: dict[str, list[str]]

    @property
    def endpoint(self) -> str:
        return self.hub.endpoint


def build_demo_hub(root: Path, shared_loras: Path) -> DemoHub:
    """Repos built from real files of ``shared_loras`` (read in place, never copied into the repo).

    - ``alice/gpt2-lora``: commit 1 is a PEFT adapter at the root (weights + config + README);
      commit 2 (``main``) adds ``extra/disney.safetensors`` and a pickled ``model.bin``.
      Tags ``lora``, ``peft``, ``base_model:adapter:distilgpt2``.
    - ``bob/sd-lora``: ``disney.safetensors`` and a PEFT folder ``nested/peft/``. Tags ``lora``, ``diffusers``.
    - ``carol/readme-only``: only a README (tag ``lora``): nothing to index.
    - ``dave/bin-only``: only a pickled ``pytorch_lora_weights.bin`` (tag ``pickle``).
    """
    s = Path(shared_loras)
    hub = HubDouble(root).start()
    peft_root = {"adapter_model.safetensors": s / f"{GPT2}.safetensors",
                 "adapter_config.json": s / f"{GPT2}.adapter_config.json", "README.md": b"# gpt2 lora\n"}
    a1 = hub.add_commit("alice/gpt2-lora", peft_root, tags=["lora", "peft", "base_model:adapter:distilgpt2"])
    a2 = hub.add_commit("alice/gpt2-lora", peft_root | {"extra/disney.safetensors": s / f"{SD15}.safetensors",
                                                        "model.bin": b"\x80\x04not unpickled"})
    b1 = hub.add_commit("bob/sd-lora", {"disney.safetensors": s / f"{SD15}.safetensors",
                                        "nested/peft/adapter_model.safetensors": s / f"{GPTNEO}.safetensors",
                                        "nested/peft/adapter_config.json": s / f"{GPTNEO}.adapter_config.json"},
                        tags=["lora", "diffusers"])
    c1 = hub.add_commit("carol/readme-only", {"README.md": b"# nothing here\n"}, tags=["lora"])
    d1 = hub.add_commit("dave/bin-only", {"pytorch_lora_weights.bin": b"\x80\x04not unpickled"}, tags=["pickle"])
    return DemoHub(hub, {"alice/gpt2-lora": [a1, a2], "bob/sd-lora": [b1], "carol/readme-only": [c1],
                         "dave/bin-only": [d1]})


def dead_endpoint() -> str:
    """A loopback URL where nothing listens (a port that was free a moment ago)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def demo_hub(tmp_path_factory: pytest.TempPathFactory, shared_loras: Path) -> Iterator[DemoHub]:
    """The hub double with the demo repos, started for a test module and stopped after it."""
    demo = build_demo_hub(tmp_path_factory.mktemp("hub-files"), shared_loras)
    try:
        yield demo
    finally:
        demo.hub.stop()
