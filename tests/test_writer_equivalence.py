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
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorasearch.formats import load_lora
from lorasearch.frobenius import compare
from lorasearch.tinymodels import make_tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

RANK, ALPHA = 4, 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
PEFT_PREFIX = "base_model.model."
# tiny UNet: 4 transformer blocks x (2 attentions x 4 linears + 2 feed-forward linears)
N_MODULES = 4 * (2 * 4 + 2)


def train_lora(steps: int = 6) -> Any:
    """peft LoRA on the tiny UNet after a few Adam steps (B starts at zero, so it must train)."""
    from peft import LoraConfig, get_peft_model

    unet = make_tiny_unet(0)
    pm = get_peft_model(unet, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 3, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores, intra-op threads make these tiny steps 100x slower
    try:
        for _ in range(steps):
            opt.zero_grad()
            pred = pm.base_model.model(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
            torch.nn.functional.mse_loss(pred, target).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return pm


def write_copies(pm: Any, root: Path) -> dict[str, Path]:
    """Every writer's copy of the same update; returns name -> path (file or folder)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out: dict[str, Path] = {}
    peft_dir = root / "a_peft"
    pm.save_pretrained(peft_dir)
    out["peft"] = peft_dir
    config = peft_dir / "adapter_config.json"

    sd = {k.removeprefix(PEFT_PREFIX): v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items()), "training left B at zero"

    diff_dir = root / "b_diffusers"
    StableDiffusionPipeline.save_lora_weights(
        diff_dir, unet_lora_layers=convert_state_dict_to_diffusers(sd),
        unet_lora_adapter_metadata=pm.peft_config["default"].to_dict(),
    )
    out["diffusers"] = diff_dir / "pytorch_lora_weights.safetensors"

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in sd.items()})
    # diffusers writes alpha = rank (scale 1); the real alpha keeps the update the same
    kohya = {k: (torch.tensor(ALPHA) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    assert sum(k.endswith(".alpha") for k in kohya) == sum(k.endswith("lora_A.weight") for k in sd)
    out["kohya"] = root / "c_kohya.safetensors"
    save_file(kohya, out["kohya"])

    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = root / f"d_{name}.safetensors"
        save_file({PEFT_PREFIX + k: v.to(dtype) for k, v in sd.items()}, path)
        shutil.copy(config, root / f"d_{name}.adapter_config.json")
        out[name] = path

    out["reparam"] = root / "e_reparam.safetensors"
    save_file({PEFT_PREFIX + k: v for k, v in reparameterise(sd, seed=3).items()}, out["reparam"])
    shutil.copy(config, root / "e_reparam.adapter_config.json")
    return out


def reparameterise(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``B -> B G``, ``A -> G^-1 A`` with a random well-conditioned G per module."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in sd:
        if not k.endswith("lora_A.weight"):
            continue
        kb = k.replace("lora_A.weight", "lora_B.weight")
        a, b = sd[k].double(), sd[kb].double()
        q, _ = torch.linalg.qr(torch.randn(RANK, RANK, generator=g, dtype=torch.float64))
        gmat = q @ torch.diag(0.5 + 1.5 * torch.rand(RANK, generator=g, dtype=torch.float64))
        out[k] = (torch.linalg.inv(gmat) @ a.reshape(RANK, -1)).reshape(a.shape).float()
        out[kb] = (b.reshape(b.shape[0], RANK) @ gmat).reshape(b.shape).float()
    return out


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
