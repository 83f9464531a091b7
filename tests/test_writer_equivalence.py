"""One trained update, written by every writer we can run offline, reads as the same LoraDelta.

A LoRA is trained for a few steps with peft on the tiny UNet (r != alpha, so
the scale matters), then saved as (a) a PEFT folder, (b) a diffusers file
(``convert_state_dict_to_diffusers`` + the LoraConfig metadata diffusers
writes), (c) a kohya file (``convert_state_dict_to_kohya``, with per-module
``.alpha`` tensors), (d) fp16 and bf16 copies, (e) factors re-parameterised as
``(B G)(G^-1 A)``. Every copy must give cosine >= 0.9999 against (a),
coefficient ~ 1 and the same module names.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorasearch.formats import load_lora
from lorasearch.frobenius import compare
from lorasearch.samples import ALPHA, RANK, train_lora, write_copies

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# tiny UNet: 4 transformer blocks x (2 attentions x 4 linears + 2 feed-forward linears)
N_MODULES = 4 * (2 * 4 + 2)


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_copies(train_lora(), tmp_path_factory.mktemp("writers"))


COPIES = ["diffusers", "kohya", "fp16", "bf16", "reparam"]
TOLERANCE = {"fp16": 2e-3, "bf16": 1e-2}  # coefficient tolerance for the rounded copies


@pytest.mark.parametrize("name", COPIES)
def test_same_update_every_writer(copies: dict[str, Path], name: str) -> None:
    a, b = load_lora(copies["peft"]), load_lora(copies[name])
    assert a.family == b.family
    assert set(a.modules) == set(b.modules), (
        f"only peft: {sorted(set(a.modules) - set(b.modules))[:3]}, only {name}: {sorted(set(b.modules) - set(a.modules))[:3]}"
    )
    assert len(a.modules) == N_MODULES
    c = compare(a, b)
    assert c.shared_modules == len(a.modules) and c.only_a == c.only_b == 0
    assert c.cosine is not None and c.cosine >= 0.9999
    assert c.coefficient == pytest.approx(1.0, abs=TOLERANCE.get(name, 1e-4))


def test_scale_is_not_one(copies: dict[str, Path]) -> None:
    """r != alpha: the scale is part of the update, and every reader applied it."""
    for name in ("peft", "diffusers", "kohya"):
        scales = {d.scale for d in load_lora(copies[name]).modules.values()}
        assert scales == {ALPHA / RANK}, name


def test_cli_compare_json(copies: dict[str, Path]) -> None:
    if not (Path(__file__).resolve().parents[1] / "lorasearch" / "cli.py").is_file():
        pytest.skip("lorasearch/cli.py not written yet")
    proc = subprocess.run(
        [sys.executable, "-m", "lorasearch.cli", "compare", str(copies["diffusers"]), str(copies["kohya"]), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert {"family_a", "family_b", "shared_modules", "only_a", "only_b", "cosine", "coefficient"} <= d.keys()
    assert d["family_a"] == d["family_b"]
    assert d["only_a"] == d["only_b"] == 0 and d["shared_modules"] > 0
    assert d["cosine"] >= 0.9999 and d["coefficient"] == pytest.approx(1.0, abs=1e-4)
