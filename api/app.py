"""The HTTP API: query by uploaded LoRA, compare, browse, and (with a token) add and delete.

``create_app(db, max_upload_mb, token_file)`` builds the FastAPI app; ``serve``
runs it under uvicorn (``lorasearch serve``). The store is opened once, read
only, in the lifespan handler and shared by every request; it checks the
store's generation counter on each search and reloads the FAISS indexes an
indexer process changed, so new LoRAs show up within a query without a restart
and without blocking readers (SQLite WAL: one writer, many readers).

Writes (``POST /v1/loras``, ``DELETE /v1/loras/{id}``) need ``Authorization:
Bearer <token>`` with the token from ``--token-file``; without a token file
they are disabled (403). Each write opens its own writable ``Store`` while
holding the indexer's lock (``DB/indexer.lock``): 409 while an indexing run
holds it. After a write the family's collection map is refreshed in the
background (``api.maps``: coalesced, in a child process); until then
``GET /v1/map`` drops deleted LoRAs and lists new ones as ``unplaced``.

``POST /v1/attribute`` is ``lorasearch attribute --json`` for an uploaded
LoRA (file or PEFT folder files) or full checkpoint. A checkpoint needs
``base=<hub id>``, which must already be on the server (``DB/bases/`` or the
local Hugging Face cache, see ``api.bases``): the API never fetches URLs or
hub repositories given by a client, and never opens server paths a client
names (422 ``bad_base`` / ``base_not_local``).

``/v1/query`` answers with a ``Server-Timing`` header (upload, wait, load,
search, info, resume, encode) and hashes the upload only with ``hashes=true``.
"""
from __future__ import annotations

import contextlib
import gc
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal, Optional, TypeVar

import anyio
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.background import BackgroundTask
from starlette.staticfiles import StaticFiles

import lorasearch
from api import schemas
from api.errors import STATUS_MEANING, ApiError, from_bad_input, install_handlers, json_safe
from api.maps import MapRefresher, live_map
from api.uploads import CLOSE, LoraUpload, Upload, receive_upload
from lorasearch.errors import BadInput
from lorasearch.search import DeltaCache
from lorasearch.sketch import MODULE_GROUPS
from lorasearch.store import Store

log = logging.getLogger("lorasearch.api")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_ID = 2**63 - 1  # SQLite integer range: larger ids cannot exist (and would overflow the binding)
ENV_DB, ENV_MAX_MB, ENV_TOKEN_FILE = "LORASEARCH_API_DB", "LORASEARCH_API_MAX_UPLOAD_MB", "LORASEARCH_API_TOKEN_FILE"

View = Literal["delta", "style", "paper"]
Group = Literal[tuple(MODULE_GROUPS)]  # type: ignore[valid-type]
T = TypeVar("T")


class JSONOut(JSONResponse):
    """JSON without FastAPI's encoder pass: numpy scalars unwrapped, NaN/Inf as null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(json_safe(content), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Timing:
    """Stage durations of one request, for its ``Server-Timing`` header (stage names are tokens)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.stages: list[tuple[str, float]] = []

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages.append((stage, (now - self.t) * 1e3))
        self.t = now

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.stages)


class HeapFreezer:
    """Keeps the cyclic garbage collector's full passes off the request path.

    The process holds ~130k long-lived container objects (imports, the store, the candidate caches); a
    full (generation 2) collection walks all of them and took 86-122 ms here, once every ~50 queries, which
    landed on one query each time (its p99). ``gc.freeze()`` moves what is alive into a generation that is
    never scanned: once at start-up, and once more when the caches are warm (after ``warm`` requests).
    Garbage is collected first, so nothing unreachable is frozen (a cycle among frozen objects that
    dies later is not reclaimed: the frozen set is the start-up and warm-cache heap, which lives as long
    as the process).
    """

    def __init__(self, warm: int = 32) -> None:
        self.warm = warm
        self.count = 0
        self._lock = threading.Lock()

    @staticmethod
    def freeze() -> None:
        gc.collect()
        gc.freeze()

    def tick(self) -> None:
        """Count one request; at the ``warm``-th, collect and freeze (in the caller's thread)."""
        with self._lock:
            self.count += 1
            due = self.count == self.warm
        if due:
            self.freeze()


class TotalTiming:
    """ASGI middleware: a ``Server-Timing: app;dur=...`` header on every HTTP response (request start to response
    start, inside the app), beside the route's own stages."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                ms = (time.perf_counter() - t0) * 1e3
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", f"app;dur={ms:.2f}".encode())]}
            await send(message)

        await self.app(scope, receive, timed_send)


@dataclass
class Settings:
    """What one app serves and how.

    Attributes:
        db: the store directory.
        max_upload_bytes: cap for one uploaded weights file.
        token: the write token (None: writes disabled).
        tmp_dir: where uploads are spooled (None: the system temp folder).
    """

    db: Path
    max_upload_bytes: int
    token: bytes | None = None
    tmp_dir: Path | None = None
    write_lock: threading.Lock = field(default_factory=threading.Lock)


def read_token(token_file: str | Path | None) -> bytes | None:
    """The write token from its file (surrounding whitespace dropped).

    Raises:
        BadInput: unreadable or empty file.
    """
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_bytes().strip()
    except OSError as exc:
        raise BadInput(f"{token_file}: cannot read the token file: {exc.strerror or exc}", code="bad_parameter") from None
    if not token:
        raise BadInput(f"{token_file}: the token file is empty", code="bad_parameter")
    return token


def _responses(*statuses: int, ok: type | None = None, ok_status: int = 200) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {s: {"model": schemas.ErrorResponse, "description": STATUS_MEANING[s]}
                                            for s in statuses}
    if ok is not None:
        out[ok_status] = {"model": ok, "description": "OK"}
    return out


def _multipart_body(fields: dict[str, str]) -> dict[str, Any]:
    """OpenAPI request body for routes that read their multipart body themselves (streamed, see api.uploads)."""
    props = {name: {"type": "string", "format": "binary", "description": desc} for name, desc in fields.items()}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": list(fields), "properties": props, "additionalProperties": False}}}}}


FILE_DESC = ("A LoRA .safetensors file. For a PEFT adapter send the field twice: adapter_model.safetensors and "
             "adapter_config.json. Pickled files (.bin/.pt/.ckpt) are refused.")


ATTRIBUTE_FILE_DESC = ("A LoRA .safetensors file (for a PEFT adapter send the field twice: adapter_model.safetensors "
                       "and adapter_config.json), or a full checkpoint .safetensors with the base parameter. Pickled "
                       "files (.bin/.pt/.ckpt) are refused.")


def _client_view(obj: Any, lu: LoraUpload, extra: dict[str, str]) -> Any:
    """``obj`` with the server's temp paths replaced by the client's file names (and ``extra`` strings swapped)."""
    from api.errors import scrub

    subs = [*extra.items(), *lu.replacements()]
    if isinstance(obj, dict):
        return {k: _client_view(v, lu, extra) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_client_view(v, lu, extra) for v in obj]
    if isinstance(obj, str):
        return extra.get(obj) or scrub(obj, subs)
    return obj


def _lora_info(lu: LoraUpload, ld: Any) -> dict[str, Any]:
    """``info --json`` of an uploaded LoRA, with the client's file names instead of temp paths."""
    from lorasearch.report import info_dict

    d = info_dict(ld)
    d["path"] = lu.name
    d["config"] = lu.config.filename if lu.config is not None else None
    return d


def create_app(db: str | Path, max_upload_mb: float = 512, token_file: str | Path | None = None,
               tmp_dir: str | Path | None = None, query_concurrency: int = 1) -> FastAPI:
    """The API over one store.

    Args:
        db: the store directory (must hold a store).
        max_upload_mb: cap for one uploaded weights file, in MiB.
        token_file: file holding the bearer token for writes (None: writes disabled).
        tmp_dir: where uploads are spooled (default: the system temp folder).
        query_concurrency: queries/compares computed at once in this process (more wait their turn).

    Returns:
        the FastAPI app (the store is opened when it starts).
    """
    settings = Settings(Path(db), max(1, int(max_upload_mb * 2**20)), read_token(token_file),
                        Path(tmp_dir) if tmp_dir is not None else None)
    cache = DeltaCache()  # thread-safe on its own: shared by the request threads
    maps = MapRefresher(settings.db)
    freezer = HeapFreezer()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Reading, embedding and re-ranking hold the GIL most of the time: more than one at a time in a
        # process only shares the core (all finish late) and multiplies the memory held. Queued requests
        # wait on this semaphore without a thread; --workers scales across cores.
        app.state.cpu_slots = anyio.Semaphore(max(1, query_concurrency))
        # An attribution can take seconds (a full checkpoint streamed against its base): its own slot, so the
        # queries of this process go on beside it.
        app.state.attribution_slots = anyio.Semaphore(1)
        app.state.store = Store(settings.db, create=False, readonly=True)
        freezer.freeze()
        try:
            yield
        finally:
            maps.stop()
            app.state.store.close()

    app = FastAPI(title="lorasearch", version=lorasearch.__version__, lifespan=lifespan,
                  default_response_class=JSONOut,
                  description="Find LoRAs by their weights: upload a LoRA, get its nearest indexed LoRAs.")
    app.state.settings = settings
    app.state.maps = maps
    app.add_middleware(TotalTiming)
    install_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="Token from the server's --token-file (writes only).")

    def store(request: Request) -> Store:
        return request.app.state.store

    async def in_thread(fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(fn, *args)

    async def cpu_bound(fn: Callable[..., T], *args: Any) -> T:
        async with app.state.cpu_slots:
            return await run_in_threadpool(fn, *args)

    def authorize(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        """401 without a bearer token, 403 with a wrong one or when writes are disabled."""
        if settings.token is None:
            raise ApiError(403, "writes_disabled", "writes are disabled: the server was started without --token-file",
                           CLOSE)
        if creds is None or not creds.credentials:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token>",
                           {**CLOSE, "WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(creds.credentials.encode("utf-8", "replace"), settings.token):
            raise ApiError(403, "forbidden", "wrong token", CLOSE)

    # ---- reads -------------------------------------------------------------------------------------------

    @app.get("/healthz", response_model=None, responses=_responses(ok=schemas.Health), tags=["meta"])
    def healthz(request: Request) -> JSONOut:
        """Liveness: the store answers."""
        return JSONOut({"status": "ok", "generation": store(request).generation()})

    @app.get("/v1/stats", response_model=None, tags=["browse"])
    def stats(request: Request) -> JSONOut:
        """What the store holds (``lorasearch stats --json``)."""
        return JSONOut(store(request).stats())

    @app.get("/v1/families", response_model=None, responses=_responses(ok=schemas.Families), tags=["browse"])
    def families(request: Request) -> JSONOut:
        """Families with at least one live LoRA, with their counts."""
        rows = store(request).execute(
            "SELECT family, COUNT(*) FROM loras WHERE deleted=0 GROUP BY family ORDER BY family")
        return JSONOut({"families": [{"family": r[0], "count": int(r[1])} for r in rows]})

    @app.get("/v1/loras", response_model=None, responses=_responses(404, 422, ok=schemas.LoraList), tags=["browse"])
    def list_loras(
        request: Request,
        family: Optional[str] = Query(None, max_length=500, description="Only this family (e.g. sd15)."),
        source: Optional[str] = Query(None, max_length=4096, description="Only LoRAs seen in this source (SOURCE string or path)."),
        label: Optional[str] = Query(None, max_length=500, description="Only LoRAs with this label."),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=2**62),
    ) -> JSONOut:
        """Live LoRAs, oldest first."""
        st = store(request)
        if family is not None and family not in st.families():
            raise ApiError(404, "unknown_family", f"no indexed LoRAs of family {family!r}")
        rows = st.list(family=family, source=source, label=label, limit=limit, offset=offset)
        return JSONOut({"loras": rows, "limit": limit, "offset": offset, "count": len(rows)})

    @app.get("/v1/loras/{lora_id}", response_model=None, responses=_responses(404, 422), tags=["browse"])
    def get_lora(request: Request, lora_id: int = PathParam(..., ge=1, le=MAX_ID)) -> JSONOut:
        """Everything about one LoRA: metadata, ``info``, every source it was seen in."""
        row = store(request).get(lora_id)
        if row is None or row.get("deleted"):
            raise ApiError(404, "unknown_id", f"no LoRA with id {lora_id}")
        return JSONOut(row)

    @app.get("/v1/map", response_model=None, responses=_responses(404, 422, ok=schemas.CollectionMap), tags=["browse"])
    def collection_map(request: Request, family: str = Query(..., min_length=1, max_length=500)) -> JSONOut:
        """The 2-D map of one family's collection (computed at index time)."""
        try:
            from lorasearch.collection_map import MAP_VIEW, load_map
        except ImportError:
            raise ApiError(404, "no_map", "collection maps are not available in this build "
                           "(lorasearch.collection_map is missing)") from None
        st = store(request)
        try:
            m = load_map(st.root, family)
        except (OSError, ValueError) as exc:
            raise ApiError(404, "no_map", f"no readable collection map for family {family!r} ({exc})") from None
        live = [int(r[0]) for r in st.execute(
            "SELECT l.id FROM loras l JOIN vectors v ON v.lora_id = l.id WHERE l.family=? AND l.deleted=0"
            " AND v.view=? ORDER BY l.id", (family, MAP_VIEW))]
        if m is None and live:  # LoRAs of a new family added through the API: their first map is on its way
            m = {"family": family, "view": MAP_VIEW, "method": None, "points": [],
                 "note": "the map of this family is being computed"}
        if m is None:
            raise ApiError(404, "no_map", f"no collection map for family {family!r} (maps are computed at index time)")
        out = live_map(m, live)
        out["refreshing"] = maps.pending
        return JSONOut(out)

    # ---- uploads -----------------------------------------------------------------------------------------

    async def upload(request: Request, fields: tuple[str, ...]) -> Upload:
        return await receive_upload(request, fields, settings.max_upload_bytes, settings.tmp_dir)

    def run_query(st: Store, lu: LoraUpload, view: str, k: int, groups: list[str] | None, hashes: bool,
                  timing: Timing) -> dict[str, Any]:
        from lorasearch.search import query

        from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K

        timing.lap("wait")
        ld, emb = lu.load_and_embed(settings.max_upload_bytes, hashes, st.k or DEFAULT_K, st.dim or DEFAULT_DIM)
        timing.lap("load")
        try:
            res = query(st, ld, view=view, k=k, groups=groups or None, cache=cache, embedding=emb)
        except BadInput as exc:
            raise from_bad_input(exc, lu.replacements()) from None
        timing.lap("search")
        res.setdefault("query", lu.name)
        res["query_lora"] = _lora_info(lu, ld)
        timing.lap("info")
        del ld  # freed here, not on the way back to the event loop
        freezer.tick()
        return res

    @app.post("/v1/query", response_model=None, openapi_extra=_multipart_body({"file": FILE_DESC}), tags=["search"],
              responses=_responses(400, 413, 415, 422, ok=schemas.QueryResponse))
    async def query_route(
        request: Request,
        k: int = Query(10, ge=1, le=1000, description="Number of results."),
        view: View = Query("delta", description="delta (identity, exact re-rank), style (per-module normalised) or paper."),
        groups: Optional[list[Group]] = Query(None, description="Module groups for the style view (repeatable)."),
        hashes: bool = Query(False, description="Also hash the upload (query_lora's file_sha256, autov2, autov3; "
                             "null otherwise). The search does not need them; they cost ~3 ms per MB."),
    ) -> JSONOut:
        """The indexed LoRAs closest to the uploaded one, within its family: the JSON of ``lorasearch query --json``.

        The ``Server-Timing`` header splits the server's time: upload (receive, parse, spool), wait (for a
        compute slot and a thread), load (read the LoRA), search, info, resume (back from the thread), encode
        (JSON). The spooled upload is removed after the response is sent."""
        timing = Timing()
        up = await upload(request, ("file",))
        try:
            timing.lap("upload")
            lu = up.lora("file")
            res = await cpu_bound(run_query, store(request), lu, view, k, list(groups) if groups else None, hashes,
                                  timing)
            timing.lap("resume")
            out = JSONOut(res, background=BackgroundTask(up.close))
        except BaseException:
            up.close()
            raise
        timing.lap("encode")
        out.headers["Server-Timing"] = timing.header()
        return out

    def run_compare(a: LoraUpload, b: LoraUpload) -> dict[str, Any]:
        from lorasearch.frobenius import compare
        from lorasearch.report import compare_dict

        la, lb = a.load(settings.max_upload_bytes), b.load(settings.max_upload_bytes)
        d = compare_dict(la, lb, compare(la, lb))
        d["path_a"], d["path_b"] = a.name, b.name
        return d

    @app.post("/v1/compare", response_model=None, tags=["search"],
              openapi_extra=_multipart_body({"a": "First LoRA. " + FILE_DESC, "b": "Second LoRA. " + FILE_DESC}),
              responses=_responses(400, 413, 415, 422, ok=schemas.CompareResponse))
    async def compare_route(request: Request) -> JSONOut:
        """Exact cosine of two uploaded LoRAs over their shared modules: the JSON of ``lorasearch compare --json``."""
        with await upload(request, ("a", "b")) as up:
            a, b = up.lora("a"), up.lora("b")
            res = await cpu_bound(run_compare, a, b)
        return JSONOut(res)

    def run_attribute(st: Store, lu: LoraUpload, base: str | None, th: Any) -> dict[str, Any]:
        from lorasearch.attribution import attribute
        from lorasearch.attribution.engine import local_files

        assert lu.weights.path is not None
        if base is not None:
            from api.bases import parse_base

            parse_base(base)  # a URL or a path is refused even where no base is needed
        try:
            kinds = {tf.kind for tf in local_files(lu.weights.path)} if lu.config is None else {"lora"}
            if "checkpoint" in kinds:
                # a full checkpoint: ΔW against a base that must already be on this server
                if base is None:
                    raise ApiError(422, "needs_base", f"{lu.name}: a full checkpoint: give base=<hub id> (the model "
                                   "it was fine-tuned from; it must have a local copy on the server) to form ΔW")
                from api.bases import resolve_base

                local = resolve_base(base, settings.db)
                res = attribute(st, lu.weights.path, base=str(local), thresholds=th, cache=cache)
                return _client_view(res, lu, {str(local): base})
            ld = lu.load(settings.max_upload_bytes, hashes=False)  # attribution compares weights, not files
            ld.source["path"] = lu.name
            res = attribute(st, ld, thresholds=th, cache=cache)
        except BadInput as exc:
            raise from_bad_input(exc, lu.replacements()) from None
        return _client_view(res, lu, {})

    @app.post("/v1/attribute", response_model=None, openapi_extra=_multipart_body({"file": ATTRIBUTE_FILE_DESC}),
              tags=["search"], responses=_responses(400, 413, 415, 422, ok=schemas.AttributeResponse))
    async def attribute_route(
        request: Request,
        base: Optional[str] = Query(None, min_length=1, max_length=300, description=(
            "Base model of an uploaded full checkpoint, as a hub id (owner/name[@revision]). Only a copy already on "
            "the server is used (the store's bases/ folder or the local Hugging Face cache); the API never "
            "downloads it (422 base_not_local). Ignored for LoRA uploads.")),
        max_fpr: float = Query(2e-4, ge=0.0, le=1.0, description="A component counts when its calibrated "
                               "false-positive rate is at most this."),
        min_cosine: float = Query(0.1, ge=0.0, le=1.0, description="... and its (partial) cosine with the target "
                                  "is at least this."),
        max_components: int = Query(6, ge=1, le=64, description="Most components of a merge."),
    ) -> JSONOut:
        """Is the uploaded LoRA (or checkpoint) derived from indexed LoRAs or a merge of them, at what weight, how
        sure: the JSON of ``lorasearch attribute --json`` (``target`` and paths are the uploaded file's name)."""
        from lorasearch.attribution import Thresholds

        th = Thresholds(max_fpr=max_fpr, min_cosine=min_cosine, max_components=max_components)
        with await upload(request, ("file",)) as up:
            lu = up.lora("file")
            async with app.state.attribution_slots:
                res = await in_thread(run_attribute, store(request), lu, base, th)
        return JSONOut(res)

    # ---- writes ------------------------------------------------------------------------------------------

    def write(fn: Callable[[Store], T]) -> T:
        """Run ``fn`` on a writable store while holding the indexer lock (one writer per store)."""
        from indexer.pipeline import IndexerBusy, exclusive

        with settings.write_lock:
            try:
                with exclusive(settings.db):
                    w = Store(settings.db, create=False)
                    try:
                        return fn(w)
                    finally:
                        w.close()
            except IndexerBusy as exc:
                raise ApiError(409, "busy", str(exc)) from None

    def run_add(st: Store, lu: LoraUpload, name: str | None, labels: list[str]) -> tuple[dict[str, Any], bool]:
        from lorasearch.embed import embed
        from lorasearch.sketch import DEFAULT_DIM, DEFAULT_K

        ld = lu.load(settings.max_upload_bytes)
        emb = embed(ld, k=st.k or DEFAULT_K, dim=st.dim or DEFAULT_DIM)
        source = {"source": "upload", "path": lu.name, "name": name or lu.name}

        def add(w: Store) -> tuple[int, bool, dict[str, Any] | None]:
            lid, new = w.add(ld, emb, source, labels or None)
            return lid, new, w.get(lid)

        lid, new, row = write(add)
        maps.mark([ld.family])  # the page's map follows (in the background; names and labels too)
        return {"id": lid, "added": new, "lora": row}, new

    @app.post("/v1/loras", response_model=None, dependencies=[Depends(authorize)], tags=["write"],
              openapi_extra=_multipart_body({"file": FILE_DESC}),
              responses=_responses(400, 401, 403, 409, 413, 415, 422, ok=schemas.AddResponse, ok_status=201))
    async def add_route(
        request: Request,
        name: Optional[str] = Query(None, min_length=1, max_length=500, description="Name to list it under (default: the file name)."),
        label: list[str] = Query([], description="Labels (repeatable)."),
    ) -> JSONOut:
        """Index an uploaded LoRA (needs the bearer token). 201 when new, 200 when that content was already indexed."""
        with await upload(request, ("file",)) as up:
            lu = up.lora("file")
            res, new = await in_thread(run_add, store(request), lu, name, [str(x)[:500] for x in label[:64]])
        return JSONOut(res, status_code=201 if new else 200)

    @app.delete("/v1/loras/{lora_id}", response_model=None, dependencies=[Depends(authorize)], tags=["write"],
                responses=_responses(401, 403, 404, 409, 422, ok=schemas.DeleteResponse))
    def delete_route(lora_id: int = PathParam(..., ge=1, le=MAX_ID)) -> JSONOut:
        """Hide a LoRA from search and listings (needs the bearer token)."""
        def delete(w: Store) -> str | None:
            row = w.get(lora_id)
            return str(row["family"]) if row is not None and w.delete(lora_id) else None

        family = write(delete)
        if family is None:
            raise ApiError(404, "unknown_id", f"no live LoRA with id {lora_id}")
        maps.mark([family])
        return JSONOut({"id": lora_id, "deleted": True})

    # ---- the web page ------------------------------------------------------------------------------------
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def app_from_env() -> FastAPI:
    """``create_app`` configured from the environment (uvicorn's factory for ``--workers`` > 1)."""
    token = os.environ.get(ENV_TOKEN_FILE) or None
    return create_app(os.environ[ENV_DB], float(os.environ.get(ENV_MAX_MB, "512")), token)


def serve(db: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, max_upload_mb: float = 512,
          token_file: str | Path | None = None, log_level: str = "info") -> None:
    """Run the API under uvicorn until interrupted.

    Creates an empty store at ``db`` when there is none, so an indexer can fill
    it while the server runs.

    Raises:
        BadInput: unreadable token file, or a folder that is not a store.
    """
    import uvicorn

    from lorasearch.store import StoreError

    read_token(token_file)  # fail before starting workers
    try:
        if not (Path(db) / "lorasearch.sqlite").is_file():
            Store(db, create=True).close()
            log.warning("created an empty store at %s", db)
        Store(db, create=False, readonly=True).close()
    except StoreError as exc:
        raise BadInput(str(exc), code="no_store") from None
    common: dict[str, Any] = {"host": host, "port": port, "log_level": log_level, "proxy_headers": False,
                              "server_header": False}
    if workers > 1:
        os.environ[ENV_DB] = str(Path(db).resolve())
        os.environ[ENV_MAX_MB] = str(max_upload_mb)
        if token_file is not None:
            os.environ[ENV_TOKEN_FILE] = str(Path(token_file).resolve())
        uvicorn.run("api.app:app_from_env", factory=True, workers=workers, **common)
    else:
        uvicorn.run(create_app(db, max_upload_mb, token_file), **common)
