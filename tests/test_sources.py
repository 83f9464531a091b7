"""Source expansion: files, folders (recursive, PEFT folders, pickles refused), hf: and hf-search: via the hub double."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from hub_server import DemoHub, dead_endpoint, demo_hub  # noqa: F401  (fixture)
from indexer.sources import Failure, WorkItem, expand_source, expand_sources, parse_hf, parse_search


def split(xs: list[WorkItem | Failure]) -> tuple[list[WorkItem], list[Failure]]:
    return [x for x in xs if isinstance(x, WorkItem)], [x for x in xs if isinstance(x, Failure)]


@pytest.mark.parametrize(
    "spec, want",
    [
        ("hf:alice/gpt2-lora", ("alice/gpt2-lora", None)),
        ("hf:alice/gpt2-lora@main", ("alice/gpt2-lora", "main")),
        ("hf:alice/gpt2-lora@refs/pr/1", ("alice/gpt2-lora", "refs/pr/1")),
        ("hf:gpt2", ("gpt2", None)),
        ("hf:Org-1/my_model.v2@" + "a" * 40, ("Org-1/my_model.v2", "a" * 40)),
        ("hf:", ValueError),
        ("hf:a/b/c", ValueError),
        ("hf:a b/c", ValueError),
        ("hf:alice/gpt2-lora@", ValueError),
        ("hf:/name", ValueError),
        ("hf:alice/..", ValueError),
        ("hf:al--ice/x", ValueError),
    ],
)
def test_parse_hf(spec: str, want: object) -> None:
    if want is ValueError:
        with pytest.raises(ValueError, match="malformed hub source"):
            parse_hf(spec)
    else:
        assert parse_hf(spec) == want


@pytest.mark.parametrize("spec, want", [("hf-search:lora", ["lora"]), ("hf-search: lora , peft", ["lora", "peft"]),
                                        ("hf-search:", ValueError), ("hf-search: , ", ValueError)])
def test_parse_search(spec: str, want: object) -> None:
    if want is ValueError:
        with pytest.raises(ValueError):
            parse_search(spec)
    else:
        assert parse_search(spec) == want


def test_folder_is_recursive_with_peft_folders_and_refuses_pickles(tree: Path) -> None:
    items, fails = split(list(expand_source(str(tree))))
    rel = sorted(Path(i.path).relative_to(tree).as_posix() for i in items)
    assert rel == ["a.safetensors", "deep/er/disney.safetensors", "deep/tiny.safetensors", "sub/a_copy.safetensors",
                   "sub/peft", "sub/vit.safetensors"]
    assert all(i.source == str(tree) and i.repo is None and i.size > 0 and i.mtime_ns > 0 for i in items)
    peft = next(i for i in items if i.path.endswith("peft"))
    assert peft.source_dict()["path"].endswith("sub/peft/adapter_model.safetensors")
    assert sorted(Path(f.item or "").name for f in fails) == ["evil.bin", "model.ckpt"]
    assert all("refused" in f.error and "never unpickled" in f.error for f in fails)


@pytest.mark.parametrize(
    "rel, n_items, n_fail, reason",
    [
        ("a.safetensors", 1, 0, None),
        ("sub/peft", 1, 0, None),  # a PEFT folder given directly is one LoRA
        ("evil.bin", 0, 1, "refused"),
        ("nope", 0, 1, "no such file or folder"),
        ("empty", 0, 1, "no .safetensors files"),
    ],
)
def test_single_sources(tree: Path, rel: str, n_items: int, n_fail: int, reason: str | None) -> None:
    (tree / "empty").mkdir()
    items, fails = split(list(expand_source(str(tree / rel))))
    assert (len(items), len(fails)) == (n_items, n_fail)
    if reason:
        assert reason in fails[0].error and str(tree / rel) in fails[0].error


def test_peft_folder_without_config_is_one_item(tree: Path) -> None:
    (tree / "sub" / "peft" / "adapter_config.json").unlink()
    for src in (tree, tree / "sub" / "peft"):
        items, _ = split(list(expand_source(str(src))))
        peft = tree / "sub" / "peft"
        assert [Path(i.path) for i in items if Path(i.path) in (peft, peft / "adapter_model.safetensors")] == [peft]


def test_find_loras_lists_a_peft_folder_once_with_or_without_config(tree: Path) -> None:
    from lorasearch.formats.load import find_loras

    peft = tree / "sub" / "peft"
    for drop_config in (False, True):
        if drop_config:
            (peft / "adapter_config.json").unlink()
        found = list(find_loras(tree))
        assert [p for p in found if p in (peft, peft / "adapter_model.safetensors")] == [peft]
        assert len(found) == len(set(found))
    assert list(find_loras(peft)) == []  # the folder itself is the caller's to read


def test_same_item_twice_in_one_source_list_is_listed_once(tree: Path) -> None:
    items, _ = split(list(expand_sources([str(tree), str(tree), str(tree / "a.safetensors")])))
    assert len(items) == 7  # 6 from the folder, once; the file again under its own source


def test_hf_source_pins_the_resolved_commit(demo_hub: DemoHub, tmp_path: Path) -> None:
    a1, a2 = demo_hub.shas["alice/gpt2-lora"]
    items, fails = split(list(expand_source("hf:alice/gpt2-lora", demo_hub.endpoint, tmp_path)))
    assert not fails
    assert sorted((i.repo, i.revision, i.path_in_repo) for i in items) == [
        ("alice/gpt2-lora", a2, "adapter_model.safetensors"),
        ("alice/gpt2-lora", a2, "extra/disney.safetensors"),
    ]
    root = next(i for i in items if i.path_in_repo == "adapter_model.safetensors")
    assert Path(root.path).is_dir() and (Path(root.path) / "adapter_config.json").is_file()  # read as a PEFT folder
    assert root.key == f"hf:alice/gpt2-lora@{a2}/adapter_model.safetensors" and root.mtime_ns == 0
    assert root.source_dict() == {"source": "hf:alice/gpt2-lora", "repo": "alice/gpt2-lora", "revision": a2,
                                  "path": "adapter_model.safetensors"}
    snapshot = Path(root.path)
    assert not (snapshot / "model.bin").exists()  # allow_patterns: pickles are never even downloaded
    asked = [p for _, p in demo_hub.hub.requests]
    assert "/api/models/alice/gpt2-lora/revision/main" in asked
    assert not any(p.endswith("model.bin") for p in asked)


@pytest.mark.parametrize("rev", ["sha", "branch"])
def test_hf_source_at_a_revision(demo_hub: DemoHub, tmp_path: Path, rev: str) -> None:
    a1, a2 = demo_hub.shas["alice/gpt2-lora"]
    spec = f"hf:alice/gpt2-lora@{a1}" if rev == "sha" else "hf:alice/gpt2-lora@main"
    items, fails = split(list(expand_source(spec, demo_hub.endpoint, tmp_path)))
    assert not fails
    want = [("adapter_model.safetensors", a1)] if rev == "sha" else [
        ("adapter_model.safetensors", a2), ("extra/disney.safetensors", a2)]
    assert sorted((i.path_in_repo, i.revision) for i in items) == want
    assert all(i.source == spec for i in items)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("hf:nobody/nothing", "repository nobody/nothing not found"),
        ("hf:alice/gpt2-lora@no-such-branch", "revision 'no-such-branch' not found in alice/gpt2-lora"),
        ("hf:carol/readme-only", "no .safetensors files in the repository"),
        ("hf:dave/bin-only", "no .safetensors files in the repository"),
        ("hf:bad//spec", "malformed hub source"),
        ("hf-search:no-such-tag", "no repositories on"),
        ("hf-search:", "malformed hub search"),
    ],
)
def test_bad_hub_sources_are_failures(demo_hub: DemoHub, tmp_path: Path, spec: str, reason: str) -> None:
    items, fails = split(list(expand_source(spec, demo_hub.endpoint, tmp_path)))
    assert items == [] and len(fails) == 1
    assert reason in fails[0].error and fails[0].source == spec


@pytest.mark.parametrize("spec", ["hf:alice/gpt2-lora", "hf-search:lora"])
def test_unreachable_hub_is_a_fast_failure(tmp_path: Path, spec: str) -> None:
    t0 = time.monotonic()
    items, fails = split(list(expand_source(spec, dead_endpoint(), tmp_path)))
    assert items == [] and len(fails) == 1 and "hub unreachable" in fails[0].error
    assert time.monotonic() - t0 < 10


def test_hub_endpoint_from_environment(demo_hub: DemoHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", demo_hub.endpoint)
    items, fails = split(list(expand_source("hf:bob/sd-lora", cache_dir=tmp_path)))
    assert not fails and sorted(i.path_in_repo for i in items) == [
        "disney.safetensors", "nested/peft/adapter_model.safetensors"]


def test_cached_repo_expands_when_the_hub_is_down(demo_hub: DemoHub, tmp_path: Path) -> None:
    online, _ = split(list(expand_source("hf:bob/sd-lora", demo_hub.endpoint, tmp_path)))
    offline, fails = split(list(expand_source("hf:bob/sd-lora", dead_endpoint(), tmp_path)))
    assert not fails and offline == online  # a resumed job keeps working offline from the cache


@pytest.mark.parametrize(
    "spec, repos",
    [
        ("hf-search:lora", ["alice/gpt2-lora", "bob/sd-lora"]),
        ("hf-search:lora,peft", ["alice/gpt2-lora"]),
        ("hf-search:base_model:adapter:distilgpt2", ["alice/gpt2-lora"]),
    ],
)
def test_hf_search_expands_every_matching_repo(demo_hub: DemoHub, tmp_path: Path, spec: str, repos: list[str]) -> None:
    items, fails = split(list(expand_source(spec, demo_hub.endpoint, tmp_path)))
    assert sorted({i.repo for i in items}) == repos
    assert all(i.source == spec for i in items)
    assert [f.item for f in fails] == (["hf:carol/readme-only"] if spec == "hf-search:lora" else [])


def test_hf_search_follows_pages(demo_hub: DemoHub, tmp_path: Path) -> None:
    demo_hub.hub.page_size = 1
    try:
        items, _ = split(list(expand_source("hf-search:lora", demo_hub.endpoint, tmp_path, search_limit=2)))
    finally:
        demo_hub.hub.page_size = 1000
    assert sorted({i.repo for i in items}) == ["alice/gpt2-lora", "bob/sd-lora"]
    assert any("cursor=1" in p for _, p in demo_hub.hub.requests)


def test_oversized_hub_files_are_not_downloaded(demo_hub: DemoHub, tmp_path: Path) -> None:
    items, fails = split(list(expand_source("hf:bob/sd-lora", demo_hub.endpoint, tmp_path, max_bytes=700_000)))
    assert [i.path_in_repo for i in items] == ["nested/peft/adapter_model.safetensors"]  # 596 KB
    assert len(fails) == 1 and "disney.safetensors: 811534 bytes, over the 700000-byte limit" in fails[0].error
    snapshot = Path(items[0].path).parents[1]
    assert (snapshot / "nested").is_dir() and not (snapshot / "disney.safetensors").exists()
