"""Shared fixtures: the real-world file folder and tiny real models built from configs."""
from __future__ import annotations

import os
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
