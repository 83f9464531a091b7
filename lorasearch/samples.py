"""Tiny LoRAs trained by the project and written by real writers (peft, diffusers, kohya, LyCORIS).

Used by ``make samples`` (the demo's bundled data) and the writer-equivalence
tests. Needs the test extras (peft, diffusers, lycoris-lora).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lorasearch.tinymodels import make_tiny_unet

RANK, ALPHA = 4, 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
PEFT_PREFIX = "base_model.model."


def train_lora(steps: int = 6, seed: int = 0, rank: int = RANK, alpha: int = ALPHA) -> Any:
    """A peft LoRA on the tiny UNet after a few Adam steps (B starts at zero, so it must train).

    Args:
        steps: optimizer steps.
        seed: drives the LoRA init and the training data; the base UNet is always seed 0.
        rank: LoRA rank.
        alpha: LoRA alpha (r != alpha so that the scale matters).

    Returns:
        the peft model.
    """
    from peft import LoraConfig, get_peft_model

    unet = make_tiny_unet(0)
    torch.manual_seed(seed)
    pm = get_peft_model(unet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    train_steps(pm, steps, data_seed=seed)
    return pm


def train_steps(pm: Any, steps: int, data_seed: int, lr: float = 1e-2) -> None:
    """``steps`` Adam steps of a peft-wrapped tiny UNet on the random data of ``data_seed`` (fresh optimiser).

    Args:
        pm: the peft model (its trainable parameters are the adapter's).
        steps: optimizer steps.
        data_seed: seeds the inputs, conditioning and targets (the LoRA's own training set).
        lr: learning rate.
    """
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 3, 32, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
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


def peft_state_dict(pm: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors with the ``base_model.model.`` prefix removed."""
    from peft import get_peft_model_state_dict

    return {k.removeprefix(PEFT_PREFIX): v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


def reparameterise(sd: dict[str, torch.Tensor], seed: int, rank: int = RANK) -> dict[str, torch.Tensor]:
    """``B -> B G``, ``A -> G^-1 A`` with a random well-conditioned G per module (same update)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for k in sd:
        if not k.endswith("lora_A.weight"):
            continue
        kb = k.replace("lora_A.weight", "lora_B.weight")
        a, b = sd[k].double(), sd[kb].double()
        q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
        gmat = q @ torch.diag(0.5 + 1.5 * torch.rand(rank, generator=g, dtype=torch.float64))
        out[k] = (torch.linalg.inv(gmat) @ a.reshape(rank, -1)).reshape(a.shape).float()
        out[kb] = (b.reshape(b.shape[0], rank) @ gmat).reshape(b.shape).float()
    return out


def write_copies(pm: Any, root: Path, alpha: int = ALPHA) -> dict[str, Path]:
    """Every writer's copy of one update.

    Writes (a) a PEFT folder, (b) a diffusers file (``convert_state_dict_to_diffusers``
    + the LoraConfig metadata diffusers writes), (c) a kohya file
    (``convert_state_dict_to_kohya`` with the real ``.alpha``), (d) fp16 and bf16
    copies, (e) re-parameterised factors.

    Returns:
        name -> path (file or folder).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    peft_dir = root / "a_peft"
    pm.save_pretrained(peft_dir)
    out["peft"] = peft_dir
    config = peft_dir / "adapter_config.json"
    sd = peft_state_dict(pm)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items()), "training left B at zero"

    diff_dir = root / "b_diffusers"
    lora_config = pm.peft_config["default"].to_dict()
    lora_config["target_modules"] = sorted(lora_config["target_modules"])  # a set: fix its order
    StableDiffusionPipeline.save_lora_weights(
        diff_dir, unet_lora_layers=convert_state_dict_to_diffusers(sd), unet_lora_adapter_metadata=lora_config,
    )
    out["diffusers"] = diff_dir / "pytorch_lora_weights.safetensors"

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in sd.items()})
    # diffusers writes alpha = rank (scale 1); the real alpha keeps the update the same
    kohya = {k: (torch.tensor(float(alpha)) if k.endswith(".alpha") else v) for k, v in kohya.items()}
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


def write_loha(path: Path, seed: int = 1, rank: int = 4, alpha: float = 2.0) -> Path:
    """A LyCORIS LoHa on the tiny UNet, written by ``lycoris-lora`` with random (non-zero) factors."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = make_tiny_unet(0)
    # the same modules as the peft samples, so that the two are comparable; the
    # preset is class state in lycoris, so restore it afterwards
    saved = (LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME)
    LycorisNetwork.apply_preset({"target_module": [], "target_name": [rf".*\.{t.replace('.', '[.]')}$" for t in TARGETS]})
    try:
        net = create_lycoris(unet, 1.0, linear_dim=rank, linear_alpha=alpha, algo="loha")
    finally:
        LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME = saved
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya"})
    return path
