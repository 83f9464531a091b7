"""The HTTP API against a real uvicorn (``lorasearch serve`` in a subprocess) on 127.0.0.1, with httpx.

One server for the module over a store indexed by ``indexer.run_index`` from
data/samples and a few real SD1.5 files. The tests run in file order: the
baseline query is taken first; every bad input of tests/test_bad_input.py is
sent over HTTP; the server must still answer and give the same result; then
schemathesis, a bounded load test, the write routes with their token, and a
live indexer process adding LoRAs while queries run. The last test checks
that no request ended in a traceback and no upload left a temp file.
"""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from api_server import CLI, ApiServer
from indexer import run_index
from test_bad_input import CASES, KOHYA, MARKER, Case

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
TOKEN = "s3cret-token-for-tests"
CAP_MB = 8  # the 3 MB SD1.5 files fit; the over-cap cases send more
CAP = CAP_MB * 2**20

SD15_INDEXED = [
    "Haseebae__Synthetic_dataset_generator_with_stable_diffusion__pytorch_lora_weights.safetensors",
    "wellCh4n__pokemon-diffusers__pytorch_lora_weights.safetensors",
    "reddinft__sandmantales-hackathon__lora_weights__checkpoint-250__pytorch_lora_weights.safetensors",
    "reddinft__sandmantales-hackathon__lora_weights__checkpoint-500__pytorch_lora_weights.safetensors",
]
QUERY = SD15_INDEXED[2]  # its sibling checkpoint is indexed too: a non-trivial second result
SD15_ADDED_BY_API = "Krishna4311__Cloud-LoRA-Object-Removal__pytorch_lora_weights.safetensors"
SD15_LIVE_INDEXED = [
    "Riniii09__IAssignment2__pytorch_lora_weights.safetensors",
    "mvclab-ntust-course__course3-B11115019__pytorch_lora_weights.safetensors",
]

# Over HTTP a few library codes become the API's own: the garbage file is not safetensors at all
# (415), and a folder without weights or no file at all is a request without its file (422).
HTTP_CODE = {"garbage": "not_safetensors", "folder_without_weights": "missing_file", "missing_path": "missing_file"}
HTTP_STATUS = {"truncated": 400, "bad_header": 400, "bad_dtype": 400, "bad_offsets": 400, "non_finite": 400,
               "bad_factors": 400, "bad_config": 400, "too_large": 413, "pickle_refused": 415, "not_safetensors": 415,
               "unsupported_layout": 422, "missing_file": 422}


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(shared_loras: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("api_store") / "db"
    res = run_index([str(SAMPLES), *(str(shared_loras / n) for n in SD15_INDEXED)], db, progress=False)
    assert res["failed"] == [] and res["added"] >= 8, res
    return db


@pytest.fixture(scope="module")
def server(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    work = tmp_path_factory.mktemp("api_server")
    token = work / "token"
    token.write_text(TOKEN + "\n")
    srv = ApiServer(store_dir, work / "server.log", token_file=token, max_upload_mb=CAP_MB, workers=2,
                    tmp_dir=work / "tmp")
    with srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def query_bytes(shared_loras: Path) -> bytes:
    return (shared_loras / QUERY).read_bytes()


def post_query(client: httpx.Client, data: bytes, name: str = QUERY, **params: Any) -> httpx.Response:
    return client.post("/v1/query", params=params, files={"file": (name, data, "application/octet-stream")})


@pytest.fixture(scope="module")
def baseline(client: httpx.Client, query_bytes: bytes) -> dict[str, Any]:
    r = post_query(client, query_bytes)
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r: httpx.Response) -> dict[str, Any]:
    """The JSON error body, checked for its shape."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


# -- raw HTTP: to watch what the server does before a body is complete -----------------------------------
def read_response(sock: socket.socket, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length framed) from a socket."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {buf!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:n]


def part_head(name: str, filename: str, boundary: str = "B0UNDARY") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()


def request_head(port: int, path: str, extra: str, boundary: str = "B0UNDARY") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{extra}\r\n").encode()


def send_until_answered(sock: socket.socket, chunks: Iterator[bytes]) -> int:
    """Send chunks until the server answers (or closes); returns the bytes sent."""
    sent = 0
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    return sent


# -- reads -------------------------------------------------------------------------------------------------
def test_query_is_the_cli_json(baseline: dict[str, Any], store_dir: Path, shared_loras: Path) -> None:
    cli = subprocess.run([*CLI, "query", str(shared_loras / QUERY), "--db",
                          str(store_dir), "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    got = dict(baseline)
    assert got.pop("query") == QUERY and want.pop("query") == str(shared_loras / QUERY)
    info = got.pop("query_lora")
    assert got == want
    assert (info["family"], info["format"], info["rank"], info["path"]) == ("sd15", "diffusers", {"min": 4, "max": 4}, QUERY)
    top = baseline["results"]
    assert top[0]["name"] == QUERY and top[0]["score"] == pytest.approx(1.0, abs=1e-6) and baseline["exact"] is True
    assert "checkpoint-500" in top[1]["name"] and 0.6 < top[1]["score"] < 0.95


@pytest.mark.parametrize("view,groups,expect", [("style", None, "style"), ("style", ["attention"], "style:attention"),
                                                ("paper", None, "paper")])
def test_query_views(client: httpx.Client, query_bytes: bytes, view: str, groups: list[str] | None, expect: str) -> None:
    r = post_query(client, query_bytes, k=3, view=view, **({"groups": groups} if groups else {}))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["view"] == expect and d["results"][0]["name"] == QUERY


def test_peft_folder_upload(client: httpx.Client) -> None:
    folder = SAMPLES / "tiny_peft"
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in sorted(folder.iterdir())]
    r = client.post("/v1/query", params={"k": 3}, files=files)  # README.md rides along and is ignored
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["query_lora"]["format"] == "peft" and d["query_lora"]["config"] == "adapter_config.json"
    assert d["results"][0]["score"] == pytest.approx(1.0, abs=1e-6)


def test_query_hashes_on_request(client: httpx.Client, query_bytes: bytes, baseline: dict[str, Any]) -> None:
    """Hashing the upload is opt-in (the search does not use it); the results are the same either way."""
    import hashlib

    assert baseline["query_lora"]["file_sha256"] is None and baseline["query_lora"]["autov3"] is None
    r = post_query(client, query_bytes, hashes="true")
    d = r.json()
    assert d["query_lora"]["file_sha256"] == hashlib.sha256(query_bytes).hexdigest()
    assert d["query_lora"]["autov3"] == d["results"][0]["autov3"]  # the indexed copy of the same file
    assert d["results"] == baseline["results"]
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert {"upload", "load", "search", "encode"} <= set(stages) and all(float(v) >= 0 for v in stages.values())


@pytest.mark.parametrize("env,length,free_gib,want", [
    (None, 3 << 20, 24, "ram"),
    (None, None, 24, None),         # chunked, no length: could be anything, goes to disk
    (None, 65 << 20, 24, None),     # over RAM_SPOOL_MAX_BYTES
    (None, 3 << 20, 0.01, None),    # RAM folder nearly full
    ("", 3 << 20, 24, None),        # turned off
])
def test_ram_spool_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str | None, length: int | None,
                          free_gib: float, want: str | None) -> None:
    from api import uploads

    monkeypatch.setenv(uploads.ENV_RAM_TMP, str(tmp_path) if env is None else env)
    real = os.statvfs

    class Fake:
        f_frsize, f_bavail = 4096, int(free_gib * 2**30 / 4096)

    monkeypatch.setattr(uploads.os, "statvfs", lambda p: Fake() if str(p) == str(tmp_path) else real(p))
    got = uploads.ram_spool_dir(length)
    assert got == (str(tmp_path) if want == "ram" else None)


def test_heap_freezer_freezes_once_warm() -> None:
    import gc

    from api.app import HeapFreezer

    f = HeapFreezer(warm=3)
    try:
        before = gc.get_freeze_count()
        f.tick()
        f.tick()
        assert gc.get_freeze_count() == before
        junk = [[i] for i in range(1000)]
        f.tick()
        assert gc.get_freeze_count() >= before + 1000
        f.tick()  # only once
        del junk
    finally:
        gc.unfreeze()


def test_compare_is_the_cli_json(client: httpx.Client) -> None:
    from lorasearch.formats import load_lora
    from lorasearch.frobenius import compare
    from lorasearch.report import compare_dict

    a, b = SAMPLES / "tiny_kohya.safetensors", SAMPLES / "tiny_diffusers.safetensors"
    r = client.post("/v1/compare", files=[("a", (a.name, a.read_bytes())), ("b", (b.name, b.read_bytes()))])
    assert r.status_code == 200, r.text
    la, lb = load_lora(a), load_lora(b)
    want = compare_dict(la, lb, compare(la, lb))
    want["path_a"], want["path_b"] = a.name, b.name
    got = r.json()
    assert got.keys() == want.keys() and got["cosine"] == pytest.approx(want["cosine"], abs=1e-9)
    assert {k: v for k, v in got.items() if not isinstance(v, float)} == {k: v for k, v in want.items() if not isinstance(v, float)}
    r = client.post("/v1/compare", files=[("a", (a.name, a.read_bytes()))])
    assert r.status_code == 422 and error_of(r)["code"] == "missing_file"


def test_browse_routes(client: httpx.Client, baseline: dict[str, Any]) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    fams = {f["family"]: f["count"] for f in client.get("/v1/families").json()["families"]}
    assert fams["sd15"] == len(SD15_INDEXED)
    stats = client.get("/v1/stats").json()
    assert stats["families"] == fams and stats["loras"] == sum(fams.values())
    page = client.get("/v1/loras", params={"family": "sd15", "limit": 2, "offset": 1}).json()
    assert page["count"] == 2 and [x["family"] for x in page["loras"]] == ["sd15", "sd15"]
    lid = baseline["results"][0]["id"]
    one = client.get(f"/v1/loras/{lid}").json()
    assert one["name"] == QUERY and one["info"]["family"] == "sd15" and one["sources"]
    for url, status, code in [("/v1/loras/999999", 404, "unknown_id"), ("/v1/loras?family=nope", 404, "unknown_family"),
                              ("/v1/loras/0", 422, "bad_parameter"), (f"/v1/loras/{2**64}", 422, "bad_parameter"),
                              ("/v1/loras?limit=0", 422, "bad_parameter"), ("/v1/map?family=nope", 404, "no_map"),
                              ("/v1/nowhere", 404, "not_found")]:
        r = client.get(url)
        assert r.status_code == status and error_of(r)["code"] == code, (url, r.text)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_collection_map_route(client: httpx.Client) -> None:
    """The map is written at index time by lorasearch.collection_map (another part of issue 4)."""
    r = client.get("/v1/map", params={"family": "sd15"})
    if r.status_code == 404:
        assert error_of(r)["code"] == "no_map"
        pytest.skip(f"no collection map for sd15 in this build: {error_of(r)['message']}")
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["family"] == "sd15" and len(m["points"]) == len(SD15_INDEXED)
    assert {"id", "name", "x", "y", "labels"} <= set(m["points"][0])


# -- attribution -------------------------------------------------------------------------------------------
TINY_BASE = "tiny/base"  # DB/bases/tiny/base.safetensors: the only base this server has


@pytest.fixture(scope="module")
def tiny_checkpoint(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full weights W0 + 0.7·ΔW(tiny_peft) of the modules tiny_peft adapts, and W0 in the store's bases/ folder.

    W0 is random (ΔW does not depend on it) with the diffusers names of those modules (from the PEFT keys),
    so no model has to be built; the engine's own tests use a real tiny UNet.
    """
    from safetensors import safe_open

    from lorasearch.attribution import derivatives as dv
    from lorasearch.formats import load_lora

    peft = SAMPLES / "tiny_peft" / "adapter_model.safetensors"
    rng = np.random.default_rng(0)
    state: dict[str, np.ndarray] = {}
    with safe_open(str(peft), "np") as f:
        for key in f.keys():
            if ".lora_A." in key:
                a, b = f.get_tensor(key), f.get_tensor(key.replace(".lora_A.", ".lora_B."))
                name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                state[name] = (0.05 * rng.standard_normal((b.shape[0], a.shape[1]))).astype(np.float32)
    (store_dir / "bases" / "tiny").mkdir(parents=True, exist_ok=True)
    dv.write_checkpoint(state, store_dir / "bases" / "tiny" / "base.safetensors")
    out = tmp_path_factory.mktemp("api_ckpt") / "merged-unet.safetensors"
    return dv.write_checkpoint(dv.merged_state(state, [(load_lora(SAMPLES / "tiny_peft"), 0.7)]), out)


def post_attribute(client: httpx.Client, parts: list[tuple[str, tuple[str, bytes]]], **params: Any) -> httpx.Response:
    return client.post("/v1/attribute", params=params, files=parts)


def cli_attribute(path: Path, store_dir: Path) -> dict[str, Any]:
    cli = subprocess.run([*CLI, "attribute", str(path), "--db", str(store_dir),
                          "--json"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert cli.returncode == 0, cli.stderr
    return json.loads(cli.stdout)


def as_uploaded(cli: dict[str, Any], name: str) -> dict[str, Any]:
    """The CLI's JSON with the target's path replaced by the uploaded file's name (what the API reports)."""
    out = json.loads(json.dumps(cli))
    out["target"] = name
    for f in out["per_file"]:
        f["path"] = name
    for m in out["matches"]:
        m["file"] = name
    return out


@pytest.mark.parametrize("source,expect", [(SD15_INDEXED[1], "derived"), (SD15_ADDED_BY_API, "none")])
def test_attribute_is_the_cli_json(client: httpx.Client, store_dir: Path, shared_loras: Path, tmp_path: Path,
                                   source: str, expect: str) -> None:
    """A re-saved copy (new name, new metadata) of an indexed LoRA is derived from it; an unrelated LoRA is none."""
    from safetensors.numpy import load_file

    copy = tmp_path / "my-new-upload.safetensors"
    save_file(load_file(str(shared_loras / source)), str(copy), metadata={"ss_output_name": "someone else's"})
    r = post_attribute(client, [("file", (copy.name, copy.read_bytes()))])
    assert r.status_code == 200, r.text
    got = r.json()
    assert got == as_uploaded(cli_attribute(copy, store_dir), copy.name)
    assert got["verdict"] == expect and got["family"] == "sd15" and got["target"] == copy.name
    if expect == "derived":
        ids = {x["name"]: x["id"] for x in client.get("/v1/loras", params={"family": "sd15"}).json()["loras"]}
        (m,) = got["matches"]
        assert m["id"] == ids[source] and m["name"] == source
        assert m["coefficient"] == pytest.approx(1.0, abs=1e-4) and m["cosine"] == pytest.approx(1.0, abs=1e-4)
        assert m["fpr"] <= got["thresholds"]["max_fpr"]
    else:
        assert got["matches"] == [] and got["explained"] == 0.0
    assert "lorasearch-upload-" not in r.text


def test_attribute_peft_folder_upload(client: httpx.Client) -> None:
    files = [("file", (p.name, p.read_bytes())) for p in sorted((SAMPLES / "tiny_peft").iterdir())]
    d = post_attribute(client, files).json()
    assert d["verdict"] == "derived" and d["target"] == "adapter_model.safetensors"
    assert d["matches"][0]["coefficient"] == pytest.approx(1.0, abs=1e-4)


ATTRIBUTE_BAD: dict[str, tuple[dict[str, Any], tuple[int, str]]] = {
    "checkpoint_without_base": ({}, (422, "needs_base")),
    "base_not_on_server": ({"base": "someone/sd-base"}, (422, "base_not_local")),
    "base_revision_not_on_server": ({"base": "tiny/base@v2"}, (422, "base_not_local")),
    "base_url": ({"base": "https://example.com/model.safetensors"}, (422, "bad_base")),
    "base_path": ({"base": "/etc/passwd"}, (422, "bad_base")),
    "base_dotdot": ({"base": "../../db/bases/tiny/base"}, (422, "bad_base")),
    "bad_threshold": ({"base": TINY_BASE, "max_fpr": 2}, (422, "bad_parameter")),
}


@pytest.mark.parametrize("what", list(ATTRIBUTE_BAD))
def test_attribute_checkpoint_base_is_never_fetched(client: httpx.Client, tiny_checkpoint: Path, what: str) -> None:
    params, want = ATTRIBUTE_BAD[what]
    r = post_attribute(client, [("file", (tiny_checkpoint.name, tiny_checkpoint.read_bytes()))], **params)
    assert (r.status_code, error_of(r)["code"]) == want, r.text
    assert str(tiny_checkpoint.parent) not in r.text and "lorasearch-upload-" not in r.text


def test_attribute_checkpoint_with_a_local_base(client: httpx.Client, tiny_checkpoint: Path, store_dir: Path) -> None:
    r = post_attribute(client, [("file", (tiny_checkpoint.name, tiny_checkpoint.read_bytes()))], base=TINY_BASE)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["verdict"] == "derived" and d["base"] == TINY_BASE and d["per_file"][0]["kind"] == "checkpoint"
    assert d["per_file"][0]["base"] == TINY_BASE and str(Path(tiny_checkpoint).parent) not in r.text
    (m,) = d["matches"]
    assert m["name"].startswith("tiny_") and m["coefficient"] == pytest.approx(0.7, abs=1e-3)
    assert str(store_dir) not in r.text  # the server's own paths stay private


@pytest.mark.parametrize("parts,want", [
    ([("file", ("model.ckpt", b"PK\x03\x04"))], (415, "pickle_refused")),
    ([("file", ("x.safetensors", b"\x80\x04" + b"x" * 64))], (415, "pickle_refused")),
    ([("file", ("x.safetensors", b"hello, not a model"))], (415, "not_safetensors")),
    ([("file", ("x.safetensors", (100).to_bytes(8, "little") + b"{" * 10))], (400, "truncated")),
    ([], (422, "missing_file")),
    ([("other", ("x.safetensors", b"x"))], (422, "unexpected_field")),
])
def test_attribute_bad_input(client: httpx.Client, parts: list[tuple[str, tuple[str, bytes]]], want: tuple[int, str]) -> None:
    r = post_attribute(client, parts) if parts else client.post("/v1/attribute", content=b"--B0UNDARY--\r\n",
                                                                 headers=MULTIPART)
    assert (r.status_code, error_of(r)["code"]) == want, r.text


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api_bad_input")
    out: dict[str, Path] = {}
    for case in CASES:
        (root / case.id).mkdir()
        out[case.id] = case.build(root / case.id)
    return out


def over_cap_file(path: Path) -> Path:
    """A valid kohya LoRA a little over the server's cap (the body still fits the body cap: the file cap trips)."""
    n = CAP // 4096 + 16
    save_file({f"{KOHYA}.lora_down.weight": np.zeros((n, 1024), np.float32),
               f"{KOHYA}.lora_up.weight": np.zeros((1, n), np.float32)}, str(path))
    assert CAP < path.stat().st_size < CAP + 2**20
    return path


def upload_parts(path: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """A file as one ``file`` part, a folder as one part per file in it, a missing path as none."""
    if path.is_dir():
        return [("file", (p.name, p.read_bytes())) for p in sorted(path.iterdir()) if p.is_file()]
    return [("file", (path.name, path.read_bytes()))] if path.exists() else []


def post_parts(server: ApiServer, parts: list[tuple[str, tuple[str, bytes]]]) -> tuple[int, dict[str, Any]]:
    """POST /v1/query over a raw socket, so that an early answer (413/415) is read even while the body is being sent."""
    body = b"".join(part_head(field, name) + data + b"\r\n" for field, (name, data) in parts) + b"--B0UNDARY--\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_head(server.port, "/v1/query?k=3", f"Content-Length: {len(body)}\r\n"))
        send_until_answered(s, (body[i:i + 65536] for i in range(0, len(body), 65536)))
        status, _, raw = read_response(s)
    return status, json.loads(raw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_over_http(case: Case, built: dict[str, Path], server: ApiServer, baseline: dict[str, Any],
                             tmp_path: Path) -> None:
    path = built[case.id]
    if case.max_bytes is not None:  # the size cap is the server's: send a file over it
        path = over_cap_file(tmp_path / "big.safetensors")
    status, body = post_parts(server, upload_parts(path))
    code = HTTP_CODE.get(case.id, case.code)
    assert (status, body["error"]["code"]) == (HTTP_STATUS[code], code), body
    msg = body["error"]["message"]
    assert "lorasearch-upload-" not in msg and "\n" not in msg, msg  # names the client's file, never a temp path
    if path.is_file():
        assert path.name in msg, msg
    assert not (path.parent / MARKER).exists() and not (path / MARKER).exists(), "a pickle was unpickled"


def test_server_survives_bad_input(client: httpx.Client, baseline: dict[str, Any], query_bytes: bytes) -> None:
    assert client.get("/healthz").status_code == 200
    assert post_query(client, query_bytes).json() == baseline


MULTIPART = {"content-type": "multipart/form-data; boundary=B0UNDARY"}
MALFORMED: dict[str, tuple[dict[str, Any], tuple[int, str]]] = {
    "json_body": ({"json": {"file": "x"}}, (415, "unsupported_media_type")),
    "no_boundary": ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, (400, "bad_multipart")),
    "unknown_field": ({"files": {"other": ("a.safetensors", b"x")}}, (422, "unexpected_field")),
    "no_parts": ({"content": b"--B0UNDARY--\r\n", "headers": MULTIPART}, (422, "missing_file")),
    "no_closing_boundary": ({"content": part_head("file", "a.safetensors") + (100).to_bytes(8, "little") + b"{" * 50, "headers": MULTIPART},
                            (400, "bad_multipart")),
    "pickle_suffix": ({"files": {"file": ("model.ckpt", b"PK\x03\x04")}}, (415, "pickle_refused")),
    "pickle_magic": ({"files": {"file": ("model.safetensors", b"\x80\x04" + b"x" * 100)}}, (415, "pickle_refused")),
    "two_weights": ({"files": [("file", ("a.safetensors", b"x")), ("file", ("b.safetensors", b"y"))]},
                    (422, "too_many_files")),
    "bad_view": ({"params": {"view": "clip"}, "files": {"file": ("a.safetensors", b"x")}}, (422, "bad_parameter")),
    "bad_group": ({"params": {"view": "style", "groups": "mlp"}, "files": {"file": ("a.safetensors", b"x")}},
                  (422, "bad_parameter")),
    "k_too_big": ({"params": {"k": 100000}, "files": {"file": ("a.safetensors", b"x")}}, (422, "bad_parameter")),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_requests(client: httpx.Client, what: str) -> None:
    kwargs, want = MALFORMED[what]
    r = client.post("/v1/query", **kwargs)
    assert (r.status_code, error_of(r)["code"]) == want, r.text


def test_content_length_over_cap_is_refused_before_the_body(server: ApiServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_head(server.port, "/v1/query", f"Content-Length: {100 * CAP}\r\n"))
        t = time.monotonic()
        status, headers, body = read_response(s, timeout=10)  # not one body byte was sent
        assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
        assert headers.get("connection") == "close" and time.monotonic() - t < 10


def test_plain_client_sees_413(client: httpx.Client) -> None:
    """A client that sends the whole over-cap body anyway (httpx) still reads the JSON 413."""
    r = client.post("/v1/query", files={"file": ("big.safetensors", (100).to_bytes(8, "little") + bytes(3 * CAP))})
    assert (r.status_code, error_of(r)["code"]) == (413, "too_large")


def test_growing_body_is_cut_off_at_the_cap(server: ApiServer) -> None:
    """A chunked upload with no length: the 413 comes once the cap is passed, long before the body ends."""
    def chunks() -> Iterator[bytes]:
        first = part_head("file", "endless.safetensors") + (100).to_bytes(8, "little") + b"{"
        yield b"%x\r\n%s\r\n" % (len(first), first)
        block = b"\0" * 65536
        for _ in range(40 * CAP // len(block)):  # 40x the cap: never sent in full
            yield b"%x\r\n%s\r\n" % (len(block), block)

    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(request_head(server.port, "/v1/query", "Transfer-Encoding: chunked\r\n"))
        sent = send_until_answered(s, chunks())
        status, headers, body = read_response(s)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert CAP < sent < 4 * CAP, sent


# -- contract fuzzing and load -----------------------------------------------------------------------------
def test_openapi_fuzz_has_no_server_errors(server: ApiServer) -> None:
    """schemathesis over /openapi.json, valid and invalid data, a bounded number of examples per operation: no 5xx.

    """
    import hypothesis
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures: list[str] = []
    ran = 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in schemathesis.GenerationMode:
            try:
                strategy = op.as_strategy(generation_mode=mode)
            except Exception:  # noqa: BLE001 - an operation with nothing to make invalid has no negative cases
                continue

            @hypothesis.settings(max_examples=15, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=strategy)
            def run(case: Any) -> None:
                nonlocal ran
                ran += 1
                resp = case.call(timeout=60)
                if resp.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {resp.status_code}: {resp.text[:300]}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:
                pass  # no invalid data can be made for this operation
    assert ran >= 200 and not failures, failures[:5]


def test_bounded_load(server: ApiServer, query_bytes: bytes, baseline: dict[str, Any]) -> None:
    """8 concurrent clients x 50 queries with the 3 MB SD1.5 upload: zero errors, every answer the baseline."""
    want = [(r["id"], r["score"]) for r in baseline["results"]]

    def client_run(_: int) -> list[str]:
        errors = []
        with httpx.Client(base_url=server.url, timeout=120.0) as c:
            for _ in range(50):
                try:
                    r = post_query(c, query_bytes)
                    if r.status_code != 200 or [(x["id"], x["score"]) for x in r.json()["results"]] != want:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
        return errors

    with ThreadPoolExecutor(8) as pool:
        errors = [e for errs in pool.map(client_run, range(8)) for e in errs]
    assert errors == [], errors[:5]


# -- writes ------------------------------------------------------------------------------------------------
def test_writes_need_the_token(client: httpx.Client, query_bytes: bytes) -> None:
    f = {"file": ("x.safetensors", query_bytes)}
    for headers, status, code in [({}, 401, "unauthorized"), ({"Authorization": "Basic abc"}, 401, "unauthorized"),
                                  ({"Authorization": "Bearer wrong"}, 403, "forbidden")]:
        r = client.post("/v1/loras", files=f, headers=headers)
        assert (r.status_code, error_of(r)["code"]) == (status, code), r.text
        r = client.delete("/v1/loras/1", headers=headers)
        assert (r.status_code, error_of(r)["code"]) == (status, code), r.text


def test_writes_disabled_without_token_file(store_dir: Path, query_bytes: bytes) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(store_dir)) as c:
        r = c.delete("/v1/loras/1", headers={"Authorization": f"Bearer {TOKEN}"})
        assert (r.status_code, error_of(r)["code"]) == (403, "writes_disabled")
        assert c.get("/healthz").status_code == 200


def test_add_query_delete(client: httpx.Client, shared_loras: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    data = (shared_loras / SD15_ADDED_BY_API).read_bytes()
    r = client.post("/v1/loras", params={"label": ["api-test"]}, files={"file": (SD15_ADDED_BY_API, data)}, headers=auth)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    assert r.json()["added"] is True and r.json()["lora"]["labels"] == ["api-test"]
    again = client.post("/v1/loras", files={"file": ("copy.safetensors", data)}, headers=auth)
    assert again.status_code == 200 and again.json() == {**again.json(), "id": lid, "added": False}
    top = post_query(client, data, name=SD15_ADDED_BY_API).json()["results"][0]
    assert top["id"] == lid and top["score"] == pytest.approx(1.0, abs=1e-6) and top["exact"] is True
    assert [x["id"] for x in client.get("/v1/loras", params={"label": "api-test"}).json()["loras"]] == [lid]
    assert client.delete(f"/v1/loras/{lid}", headers=auth).json() == {"id": lid, "deleted": True}
    assert client.get(f"/v1/loras/{lid}").status_code == 404
    assert client.delete(f"/v1/loras/{lid}", headers=auth).status_code == 404
    assert lid not in [x["id"] for x in post_query(client, data).json()["results"]]
    bad = client.post("/v1/loras", files={"file": ("x.pt", b"PK\x03\x04")}, headers=auth)
    assert (bad.status_code, error_of(bad)["code"]) == (415, "pickle_refused")


def wait_for_map(client: httpx.Client, family: str, ok: Any, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /v1/map until ``ok(map)`` (the refresh runs in the background)."""
    deadline = time.monotonic() + timeout
    m: dict[str, Any] = {}
    while time.monotonic() < deadline:
        m = client.get("/v1/map", params={"family": family}).json()
        if ok(m):
            return m
        time.sleep(0.2)
    raise AssertionError(f"map never got there: {json.dumps(m)[:500]}")


def test_map_follows_api_writes(client: httpx.Client, shared_loras: Path) -> None:
    """POST/DELETE /v1/loras: the request does not wait for the map; the new LoRA is 'unplaced' until the
    background refresh lays it out; a deleted one leaves the map at once."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = client.get("/v1/map", params={"family": "sd15"}).json()
    assert before["stale"] is False and before["unplaced"] == [] and len(before["points"]) == before["count"]
    data = (shared_loras / SD15_ADDED_BY_API).read_bytes()
    r = client.post("/v1/loras", files={"file": (SD15_ADDED_BY_API, data)}, headers=auth)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    now = client.get("/v1/map", params={"family": "sd15"}).json()
    assert now["count"] == before["count"] + 1
    assert lid in now["unplaced"] or lid in [p["id"] for p in now["points"]]  # placed already if the refresh was quick
    m = wait_for_map(client, "sd15", lambda m: lid in [p["id"] for p in m["points"]] and not m["stale"])
    assert m["unplaced"] == [] and len(m["points"]) == before["count"] + 1 and m["generation"] > before["generation"]
    assert client.delete(f"/v1/loras/{lid}", headers=auth).status_code == 200
    gone = client.get("/v1/map", params={"family": "sd15"}).json()
    assert lid not in [p["id"] for p in gone["points"]] and gone["count"] == before["count"]
    wait_for_map(client, "sd15", lambda m: not m["stale"] and len(m["points"]) == before["count"])


def test_map_refresher_coalesces_bursts(tmp_path: Path) -> None:
    from api.maps import MapRefresher

    calls: list[list[str]] = []
    gate = threading.Event()

    def runner(db: Path, fams: list[str]) -> dict[str, Any]:
        calls.append(fams)
        gate.wait(10)
        return {f: "ok" for f in fams}

    ref = MapRefresher(tmp_path, runner, delay=0.3, max_delay=2.0)
    for i in range(20):  # a burst: one refresh for all of it
        ref.mark(["sd15", "sdxl" if i % 2 else "sd15"])
    assert ref.pending and calls == []
    time.sleep(0.8)
    assert calls == [["sd15", "sdxl"]]
    ref.mark(["flux"])  # while one runs: queued for the next one, not run beside it
    ref.mark(["flux"])
    time.sleep(0.5)
    assert len(calls) == 1
    gate.set()
    assert ref.wait_idle(10) and calls == [["sd15", "sdxl"], ["flux"]] and ref.runs == 2 and not ref.pending
    ref.stop(5)


def test_map_refresher_survives_a_failing_refresh(tmp_path: Path) -> None:
    from api.maps import MapRefresher

    def runner(db: Path, fams: list[str]) -> dict[str, Any]:
        raise RuntimeError("boom")

    ref = MapRefresher(tmp_path, runner, delay=0.01)
    ref.mark(["sd15"])
    assert ref.wait_idle(10) and ref.last_result["*"].startswith("failed: RuntimeError")
    ref.mark(["sd15"])
    assert ref.wait_idle(10) and ref.runs == 2
    ref.stop(5)


@pytest.mark.parametrize("points,live,want_points,want_unplaced,stale", [
    ([1, 2, 3], [1, 2, 3], [1, 2, 3], [], False),
    ([1, 2, 3], [1, 3], [1, 3], [], True),          # 2 deleted: dropped at once
    ([1, 2], [1, 2, 5], [1, 2], [5], True),          # 5 added: not placed yet
    ([], [4], [], [4], True),                        # a new family's first map is on its way
])
def test_live_map(points: list[int], live: list[int], want_points: list[int], want_unplaced: list[int],
                  stale: bool) -> None:
    from api.maps import live_map

    m = {"family": "f", "points": [{"id": i, "x": 0.0, "y": 0.0} for i in points], "layout_count": len(points),
         "layout_points": len(points)}
    out = live_map(m, live)
    assert ([p["id"] for p in out["points"]], out["unplaced"], out["stale"], out["count"]) == \
        (want_points, want_unplaced, stale, len(live))


def test_base_resolution_is_local_only(tmp_path: Path) -> None:
    """Bases come from DB/bases/ or the Hugging Face cache on disk; nothing else, and never the network."""
    from api.bases import resolve_base
    from api.errors import ApiError

    db, cache = tmp_path / "db", tmp_path / "hub"
    (db / "bases" / "org").mkdir(parents=True)
    (db / "bases" / "org" / "single.safetensors").write_bytes(b"x")
    (db / "bases" / "org" / "pipe" / "unet").mkdir(parents=True)
    (db / "bases" / "org" / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    sha = "a" * 40
    snap = cache / "models--acme--sd" / "snapshots" / sha
    (snap / "unet").mkdir(parents=True)
    (snap / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (cache / "models--acme--sd" / "refs").mkdir()
    (cache / "models--acme--sd" / "refs" / "main").write_text(sha)
    ok = {"org/single": db / "bases" / "org" / "single.safetensors", "hf:org/pipe": db / "bases" / "org" / "pipe",
          "acme/sd": snap, f"acme/sd@{sha}": snap, "acme/sd@main": snap}
    for spec, want in ok.items():
        assert resolve_base(spec, db, cache) == want, spec
    bad = {"acme/sd@dev": "base_not_local", "acme/other": "base_not_local", "org/single@main": "base_not_local",
           "http://x/y": "bad_base", "/abs/path": "bad_base", "~/x": "bad_base", "org/../x": "bad_base",
           "a\\b": "bad_base", "acme/sd@../../x": "bad_base", "": "bad_base"}
    for spec, code in bad.items():
        with pytest.raises(ApiError) as ei:
            resolve_base(spec, db, cache)
        assert (ei.value.status, ei.value.code) == (422, code), spec


def test_writes_while_an_indexer_holds_the_store(client: httpx.Client, store_dir: Path, query_bytes: bytes) -> None:
    from indexer.pipeline import exclusive

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with exclusive(store_dir):
        r = client.post("/v1/loras", files={"file": (QUERY, query_bytes)}, headers=auth)
        assert (r.status_code, error_of(r)["code"]) == (409, "busy"), r.text
        assert client.delete("/v1/loras/1", headers=auth).status_code == 409
        assert post_query(client, query_bytes).status_code == 200  # reads go on
        from lorasearch.collection_map import refresh_maps

        assert refresh_maps(store_dir)["*"].startswith("skipped")  # the indexer updates the maps when it ends


# -- a live indexer ----------------------------------------------------------------------------------------
def test_live_indexer_is_seen_without_restart(client: httpx.Client, store_dir: Path, shared_loras: Path,
                                              tmp_path: Path) -> None:
    """``lorasearch index`` in another process while queries run: no query fails or stalls, the new LoRAs appear."""
    new = [shared_loras / n for n in SD15_LIVE_INDEXED]
    target = new[-1].read_bytes()
    stop = threading.Event()
    slowest: list[float] = []
    errors: list[str] = []

    def keep_querying() -> None:
        with httpx.Client(base_url=client.base_url, timeout=60.0) as c:
            while not stop.is_set():
                t = time.monotonic()
                r = post_query(c, target, name=new[-1].name)
                slowest.append(time.monotonic() - t)
                if r.status_code != 200:
                    errors.append(r.text)

    before = client.get("/v1/stats").json()["generation"]
    worker = threading.Thread(target=keep_querying)
    worker.start()
    try:
        proc = subprocess.run([*CLI, "index", *map(str, new), "--db", str(store_dir),
                               "--json"], capture_output=True, text=True, timeout=180, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["added"] == len(new)
        deadline = time.monotonic() + 10
        top: dict[str, Any] = {}
        while time.monotonic() < deadline:
            res = post_query(client, target, name=new[-1].name).json()["results"]
            top = res[0] if res else {}
            if top.get("name") == new[-1].name:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(60)
    assert top.get("name") == new[-1].name and top["score"] == pytest.approx(1.0, abs=1e-6), top
    assert client.get("/v1/stats").json()["generation"] > before
    fams = {f["family"]: f["count"] for f in client.get("/v1/families").json()["families"]}
    assert fams["sd15"] == len(SD15_INDEXED) + len(new)
    assert errors == [] and slowest and max(slowest) < 20, (errors[:3], max(slowest, default=0))


# -- hygiene -----------------------------------------------------------------------------------------------
def test_no_tracebacks_and_no_temp_files_left(server: ApiServer) -> None:
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert server.tmp_dir is not None and server.ram_dir is not None
    deadline = time.monotonic() + 5  # an upload is removed just after its response is sent
    while server.spooled() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.spooled() == []
