"""Shared fixtures: the real-world file folder and tiny real models built from configs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lorasearch.tinymodels import TINY_UNET_CONFIG, make_tiny_unet  # noqa: F401  (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LORASEARCH_SHARED", REPO.parent / "shared"))
SHARED_LORAS = SHARED / "loras"
SHARED_KEYS = SHARED / "lora-keys"


def require_shared(folder: Path) -> Path:
    """The shared test-data folder; in CI (CI=true) a missing folder fails instead of skipping."""
    if folder.is_dir():
        return folder
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{folder} is missing: the real-world suite needs ../shared (CI=true)")
    pytest.skip(f"{folder} not present")
    return folder


@pytest.fixture(scope="session")
def shared_loras() -> Path:
    return require_shared(SHARED_LORAS)


@pytest.fixture(scope="session")
def shared_keys() -> Path:
    return require_shared(SHARED_KEYS)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tree(tmp_path: Path, shared_loras: Path) -> Path:
    """A folder of real files for the indexer and source tests.

    6 readable LoRAs under visible paths (5 distinct contents: ``a`` and ``sub/a_copy`` are
    one file; ``sub/peft`` is a PEFT folder), one unsupported layout (``sub/vit``), two
    pickles (refused), and a hidden folder that is never listed.
    """
    from hub_server import GPT2, GPTNEO, SD15

    root = tmp_path / "loras"
    files = {
        "a.safetensors": f"{GPT2}.safetensors",
        "a.adapter_config.json": f"{GPT2}.adapter_config.json",
        "sub/a_copy.safetensors": f"{GPT2}.safetensors",
        "sub/peft/adapter_model.safetensors": f"{GPTNEO}.safetensors",
        "sub/peft/adapter_config.json": f"{GPTNEO}.adapter_config.json",
        "deep/er/disney.safetensors": f"{SD15}.safetensors",
        "deep/tiny.safetensors": "ironhack-labs__lab-lora-tuning-peft__peft_lab_outputs__checkpoint-14__adapter_model.safetensors",
        "sub/vit.safetensors": "JamesQFreeman__LoRA-ViT__lora.safetensors",
        ".hidden/ignored.safetensors": f"{SD15}.safetensors",
    }
    for rel, name in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_loras / name, root / rel)
    (root / "evil.bin").write_bytes(b"\x80\x04this would be unpickled")
    (root / "sub" / "model.ckpt").write_bytes(b"PK\x03\x04zip")
    return root
