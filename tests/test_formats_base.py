"""lorasearch.formats.base: key grouping by suffix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorasearch.formats.base import group_by_suffix
from lorasearch.formats.lycoris_suffixes import KOHYA_SUFFIX_ROLES

# One role whose suffix has no leading dot: it turns off the one-lookup path for dotted suffixes.
_SLOW = {**KOHYA_SUFFIX_ROLES, "_never_a_suffix": "never"}


def _layouts(shared_keys: Path) -> list[list[str]]:
    out = []
    for p in sorted(shared_keys.glob("*.json")):
        out.append(list(json.loads(p.read_text())["tensors"]))
    return out


def test_one_lookup_path_groups_like_the_suffix_scan(shared_keys: Path) -> None:
    layouts = _layouts(shared_keys) + [[
        "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
        "a.b.lora_down.weight",  # a dotted module name: no lookup hit, found by the scan
        ".alpha",  # empty module: no group
        "lora_unet_b.unknown_suffix", "plain",
    ]]
    assert len(layouts) > 30
    for keys in layouts:
        assert group_by_suffix(keys, KOHYA_SUFFIX_ROLES) == group_by_suffix(keys, _SLOW)


@pytest.mark.parametrize("drop", [True, False])
def test_name_rewrite_applies_on_both_paths(drop: bool) -> None:
    keys = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight"]
    name_of = (lambda m: None) if drop else (lambda m: m.upper())
    assert group_by_suffix(keys, KOHYA_SUFFIX_ROLES, name_of) == group_by_suffix(keys, _SLOW, name_of)
