"""The CLI contract: commands, JSON shapes on stdout, exit codes (0 ok, 2 bad input)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorasearch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store") / "db"
    res = cli("index", str(SAMPLES), "--db", str(root), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert {"added", "duplicates", "failed"} <= summary.keys()
    # tiny_peft and tiny_diffusers hold the same tensor bytes under other names: one AutoV3, one entry
    assert summary["added"] == 5 and summary["duplicates"] == 1 and summary["failed"] == []
    return root


def test_info_json_contract() -> None:
    res = cli("info", str(SAMPLES / "tiny_kohya.safetensors"), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert {"path", "format", "family", "modules", "rank", "dtype", "needs_base", "file_sha256", "autov3", "metadata"} <= d.keys()
    assert d["format"] == "kohya" and d["modules"] == 40 and d["rank"] == {"min": 4, "max": 4}


def test_info_folder_is_json_lines() -> None:
    res = cli("info", str(SAMPLES), "--json")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 6 and all("family" in r for r in rows)


def test_compare_same_update_two_formats() -> None:
    res = cli("compare", str(SAMPLES / "tiny_peft"), str(SAMPLES / "tiny_kohya.safetensors"), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert {"family_a", "family_b", "shared_modules", "only_a", "only_b", "cosine", "coefficient"} <= d.keys()
    assert d["cosine"] >= 0.9999 and d["coefficient"] == pytest.approx(1.0, abs=1e-4)


def test_index_again_is_a_no_op(db: Path) -> None:
    res = cli("index", str(SAMPLES), "--db", str(db), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["added"] == 0 and d["failed"] == []


@pytest.mark.parametrize("view", ["delta", "style", "paper"])
def test_query_finds_itself_first(db: Path, view: str) -> None:
    res = cli("query", str(SAMPLES / "tiny_kohya.safetensors"), "--db", str(db), "-k", "3", "--view", view, "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert {"family", "view", "exact", "results"} <= d.keys()
    top = d["results"][0]
    assert {"id", "name", "source", "path", "file_sha256", "score"} <= top.keys()
    assert top["score"] == pytest.approx(1.0, abs=1e-3)
    if view == "delta":
        assert d["exact"] is True
        # the peft, diffusers and kohya copies of one update tie at 1.0
        assert {r["name"] for r in d["results"] if r["score"] > 0.9999} >= {"tiny_kohya.safetensors", "tiny_diffusers.safetensors"}


def test_query_other_family_says_so(db: Path, shared_loras: Path) -> None:
    res = cli("query", str(shared_loras / "timohavdk__sd-lora__new.safetensors"), "--db", str(db), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["family"] == "sd15" and d["results"] == []
    assert "no indexed LoRAs" in d["message"]


def test_stats(db: Path) -> None:
    res = cli("stats", "--db", str(db), "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["loras"] == 5


@pytest.mark.parametrize("args,fragment", [
    (["query", "data/samples/tiny_kohya.safetensors", "--db", "/nonexistent/db"], "no lorasearch store"),
    (["query", "data/samples/tiny_kohya.safetensors", "--db", "DB", "--view", "bogus"], "--view"),
    (["query", "data/samples/tiny_kohya.safetensors", "--db", "DB", "--view", "style", "--groups", "nope"], "module group"),
    (["stats", "--db", "/nonexistent/db"], "no lorasearch store"),
    (["query", "data/samples/missing.safetensors", "--db", "DB"], "no such file"),
])
def test_bad_input_exits_2(db: Path, args: list[str], fragment: str) -> None:
    res = cli(*[str(db) if a == "DB" else a for a in args])
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert res.stdout == ""
