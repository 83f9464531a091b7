"""The web page in a real headless Chromium (Debian's ``chromium``) driven by Playwright, against a real server.

The fixture indexes the bundled samples and a few real SD1.5 LoRAs with
``indexer.run_index`` (which also computes the collection maps), starts
``lorasearch serve`` on a free loopback port, and the tests upload files
through the page's file input like a person would. Playwright drives the
system browser (``executable_path``); its own browser downloads are never used.

Set ``LORASEARCH_SCREENSHOTS=DIR`` to keep the screenshots the tests take.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_server import CLI  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() == "true"
QUERY_FILE = "timohavdk__sd-lora__new.safetensors"  # kohya copy of 2100-lora's weights: not indexed itself
SAME_WEIGHTS = "timohavdk__sd-lora__2100-lora.safetensors"
SD15_INDEXED = 6
TIMEOUT_MS = 30_000
TOKEN = "web-test-token"


def _need(ok: bool, reason: str) -> None:
    """Skip when a prerequisite is missing on a dev machine; fail in CI."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the web test must run)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sd15_files(shared_loras: Path) -> list[Path]:
    """A few real SD1.5 LoRAs from the inventory (the query file's twin first), the query file left out."""
    with open(shared_loras / "inventory.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["base_family_guess"] == "sd1.x"]
    names = sorted(r["local_name"] for r in rows if r["local_name"] != QUERY_FILE)
    names.remove(SAME_WEIGHTS)
    picked = [SAME_WEIGHTS, *names[: SD15_INDEXED - 1]]
    return [shared_loras / n for n in picked]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, shared_loras: Path) -> Path:
    from indexer.pipeline import run_index

    db = tmp_path_factory.mktemp("web") / "db"
    out = run_index([str(SAMPLES), *map(str, _sd15_files(shared_loras))], db, progress=False)
    assert not out["failed"], out["failed"]
    assert (db / "maps").is_dir(), "run_index did not compute the collection maps"
    return db


@pytest.fixture(scope="module")
def server(store_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``lorasearch serve`` on a free port; yields its base URL."""
    try:
        import api.app  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the HTTP API (api/app.py) is not there yet: {exc}")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    token = log.parent / "token"
    token.write_text(TOKEN)
    for _ in range(3):  # the free port may be taken between choosing and binding it
        port = _free_port()
        with open(log, "wb") as fh:
            proc = subprocess.Popen([*CLI, "serve", "--db", str(store_dir), "--port", str(port),
                                     "--log-level", "warning", "--token-file", str(token)],
                                    cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"lorasearch serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _need(CHROMIUM.is_file(), f"no chromium binary at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install playwright; never `playwright install`)")
        raise
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A fresh browser page on the server, recording script errors and every request it makes."""

    def __init__(self, browser: Any, url: str, width: int = 1280, height: int = 900) -> None:
        self.url = url
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(f"{url}/")

    def upload(self, *files: Path) -> None:
        self.page.set_input_files("#file", [str(f) for f in files])

    def screenshot(self, tmp_path: Path, name: str) -> Path:
        folder = Path(os.environ.get("LORASEARCH_SCREENSHOTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def check_clean(self) -> None:
        """No script errors, and nothing was loaded from anywhere but the server itself."""
        assert not self.errors, self.errors
        foreign = [u for u in self.requests if not (u.startswith(self.url + "/") or u.startswith("data:"))]
        assert not foreign, foreign

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Page]:
    pg = Page(browser, server)
    try:
        yield pg
    finally:
        pg.close()


def _api_query(server: str, *files: Path, view: str = "delta") -> dict[str, Any]:
    parts = [("file", (f.name, f.read_bytes())) for f in files]
    r = httpx.post(f"{server}/v1/query", params={"k": 10, "view": view}, files=parts, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_shows_family_neighbours_and_map(page: Page, server: str, shared_loras: Path, tmp_path: Path) -> None:
    query_file = shared_loras / QUERY_FILE
    expected = _api_query(server, query_file)
    top = expected["results"][0]
    assert top["name"] == SAME_WEIGHTS
    pg = page.page

    page.upload(query_file)
    pg.wait_for_selector("#results li.result")
    pg.wait_for_selector("#map-svg g.hit")

    facts = pg.inner_text("#query-info")
    for text in ("sd15", expected["query_lora"]["format"], "Rank\n4"):
        assert text in facts, (text, facts)
    first = pg.locator("#results li.result").first
    assert first.locator(".r-name").inner_text() == SAME_WEIGHTS
    assert first.locator(".score").inner_text() == f"{top['score']:.4f}" == "1.0000"
    assert top["file_sha256"][:12] in first.inner_text()
    assert pg.locator("#results li.result").count() == len(expected["results"])
    assert "delta view" in pg.inner_text("#results-meta")

    # the map: every sd15 LoRA drawn, every neighbour highlighted and numbered, the best one on top
    assert pg.get_attribute("#map-canvas", "data-points") == str(SD15_INDEXED)
    hits = pg.locator("#map-svg g.hit")
    assert hits.count() == len(expected["results"])
    assert pg.get_attribute("#map-svg g.hit.top", "data-id") == str(top["id"])
    assert pg.text_content("#map-svg g.hit.top") == "1"

    # hovering the best marker names it; clicking shows its details
    pg.hover("#map-svg g.hit.top")
    pg.wait_for_selector("#tooltip:not([hidden])")
    assert SAME_WEIGHTS in pg.inner_text("#tooltip")
    shot = page.screenshot(tmp_path, "web-query")
    pg.click("#map-svg g.hit.top")
    pg.wait_for_selector("#detail dl")
    assert top["file_sha256"] in pg.inner_text("#detail")

    # keyboard: the numbered markers are focusable buttons; Enter opens the details and keeps the focus
    second = expected["results"][1]
    pg.focus(f"#map-svg g.hit[data-rank='2']")
    pg.keyboard.press("Enter")
    pg.wait_for_function("document.querySelector('#detail').innerText.includes(%s)" % json.dumps(second["file_sha256"]))
    assert pg.evaluate("document.activeElement.dataset.rank") == "2"
    assert second["name"] in pg.inner_text("#tooltip")
    assert shot.stat().st_size > 10_000
    page.check_clean()


def test_peft_folder_upload_and_view_switch(page: Page, server: str) -> None:
    pg = page.page
    peft = SAMPLES / "tiny_peft"
    page.upload(peft / "adapter_model.safetensors", peft / "adapter_config.json")
    pg.wait_for_selector("#results li.result")
    facts = pg.inner_text("#query-info")
    assert "peft" in facts and "adapter_config.json" in facts
    assert pg.locator("#results li.result .score").first.inner_text() == "1.0000"  # same update as other samples

    expected = _api_query(server, peft / "adapter_model.safetensors", peft / "adapter_config.json", view="style")
    pg.select_option("#view", "style")
    pg.wait_for_function("document.querySelector('#results-meta').textContent.startsWith('style view')")
    names = pg.locator("#results li.result .r-name").all_inner_texts()
    assert names == [r["name"] for r in expected["results"]]
    counts = {f["family"]: f["count"] for f in httpx.get(f"{server}/v1/families").json()["families"]}
    pg.wait_for_function("document.querySelector('#map-canvas').dataset.points === '%d'" % counts[expected["family"]])
    assert pg.locator("#map-svg g.hit").count() == len(expected["results"])
    page.check_clean()

BAD_UPLOADS = [
    # (file name, bytes, text the error must start with, and contain)
    ("evil.bin", b"\x80\x04\x95this would be unpickled", "Error 415:", "pickled"),
    ("model.ckpt", b"PK\x03\x04zip of a torch.save", "Error 415:", "ckpt"),
    ("short.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", "Error 400:", "short.safetensors"),
]


@pytest.mark.parametrize(("name", "data", "prefix", "needle"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_upload_shows_the_api_error(page: Page, tmp_path: Path, name: str, data: bytes, prefix: str,
                                        needle: str) -> None:
    pg = page.page
    bad = tmp_path / name
    bad.write_bytes(data)
    page.upload(bad)
    pg.wait_for_selector("#error:not([hidden])")
    text = pg.inner_text("#error")
    assert text.startswith(prefix) and needle in text, text
    assert pg.locator("#results li").count() == 0
    assert pg.is_hidden("#query-card")
    page.check_clean()


def test_config_alone_is_refused_in_the_page(page: Page, tmp_path: Path) -> None:
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"peft_type": "LORA"}))
    page.upload(cfg)
    page.page.wait_for_selector("#error:not([hidden])")
    assert "weights file" in page.page.inner_text("#error")
    assert page.page.is_disabled("#search")


def test_browse_a_family_map_and_narrow_layout(browser: Any, server: str, tmp_path: Path) -> None:
    page = Page(browser, server, width=420, height=900)
    try:
        pg = page.page
        pg.wait_for_function("document.querySelectorAll('#family option').length > 2")
        assert "LoRAs indexed" in pg.inner_text("#stats")
        pg.select_option("#family", "sd15")
        pg.wait_for_function("document.querySelector('#map-canvas').dataset.points === '%d'" % SD15_INDEXED)
        assert pg.locator("#map-svg g.hit").count() == 0  # no query yet: nothing highlighted
        assert "UMAP" in pg.inner_text("#map-meta") or "PCA" in pg.inner_text("#map-meta")
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 420, f"the page scrolls sideways on a phone ({width}px)"
        page.screenshot(tmp_path, "web-narrow")
        page.check_clean()
    finally:
        page.close()


def test_map_shows_unplaced_loras(page: Page, server: str) -> None:
    """A map behind the store (LoRAs added since its layout): the page says how many are not placed yet."""
    pg = page.page

    def behind(route: Any) -> None:
        m = route.fetch().json()
        m.update(unplaced=[10_001, 10_002], stale=True, count=m["count"] + 2)
        route.fulfill(json=m)

    pg.route("**/v1/map?*", behind)
    pg.wait_for_function("document.querySelectorAll('#family option').length > 2")
    pg.select_option("#family", "sd15")
    pg.wait_for_function("document.querySelector('#map-canvas').dataset.points === '%d'" % SD15_INDEXED)
    meta = pg.inner_text("#map-meta")
    assert f"{SD15_INDEXED + 2} LoRAs" in meta and "2 not placed yet" in meta, meta
    page.check_clean()


def test_map_follows_loras_added_through_the_api(page: Page, server: str, shared_loras: Path) -> None:
    """POST /v1/loras while the page shows the family: the new LoRA appears on the map without a reload."""
    indexed = {p.name for p in _sd15_files(shared_loras)}
    with open(shared_loras / "inventory.tsv", newline="") as fh:
        names = sorted(r["local_name"] for r in csv.DictReader(fh, delimiter="\t") if r["base_family_guess"] == "sd1.x")
    extra = shared_loras / next(n for n in reversed(names) if n not in indexed and n != QUERY_FILE)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pg = page.page
    pg.wait_for_function("document.querySelectorAll('#family option').length > 2")
    pg.select_option("#family", "sd15")
    pg.wait_for_function("document.querySelector('#map-canvas').dataset.points === '%d'" % SD15_INDEXED)
    r = httpx.post(f"{server}/v1/loras", files={"file": (extra.name, extra.read_bytes())}, headers=auth, timeout=60)
    assert r.status_code == 201, r.text
    lid = r.json()["id"]
    try:
        pg.select_option("#family", "")  # show the family again: the page reads the map now, behind or not
        pg.select_option("#family", "sd15")
        pg.wait_for_function("document.querySelector('#map-canvas').dataset.points === '%d'" % (SD15_INDEXED + 1))
        assert "not placed yet" not in pg.inner_text("#map-meta")
        page.check_clean()
    finally:
        assert httpx.delete(f"{server}/v1/loras/{lid}", headers=auth, timeout=60).status_code == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # leave the map as the other tests expect it
            m = httpx.get(f"{server}/v1/map", params={"family": "sd15"}, timeout=10).json()
            if not m["stale"] and len(m["points"]) == SD15_INDEXED:
                break
            time.sleep(0.2)
