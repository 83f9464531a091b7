"""Writing one trained zoo LoRA in a real format (peft, diffusers, kohya, LyCORIS LoHa/LoKr).

Every writer writes under a temporary name and renames into place, so a LoRA
either exists complete or not at all (the zoo resumes by existence).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from lorasearch.samples import PEFT_PREFIX, peft_state_dict

PEFT_FORMATS = ("peft", "diffusers", "kohya")
LYCORIS_FORMATS = ("loha", "lokr")
FORMATS = ("peft", "diffusers", "kohya", "loha", "lokr")
DTYPE = torch.float16  # halves the committed zoo; the reader upcasts


def lora_path(root: Path, stem: str, fmt: str) -> Path:
    """Where a LoRA of format ``fmt`` lives: a PEFT folder, else ``<stem>.safetensors``."""
    return root / stem if fmt == "peft" else root / f"{stem}.safetensors"


@contextmanager
def lycoris_targets(targets: list[str]) -> Iterator[None]:
    """Make lycoris wrap exactly the modules named ``*.<target>`` (its preset is class state: restored after)."""
    from lycoris import LycorisNetwork

    saved = (LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME)
    names = [rf".*\.{t.replace('.', '[.]')}$" for t in targets]
    LycorisNetwork.apply_preset({"target_module": [], "target_name": names})
    try:
        yield
    finally:
        LycorisNetwork.TARGET_REPLACE_MODULE, LycorisNetwork.TARGET_REPLACE_NAME = saved


def _tmp(path: Path) -> Path:
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def _publish(tmp: Path, path: Path) -> Path:
    """Rename ``tmp`` to ``path`` (replacing a stale copy)."""
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def _half(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(DTYPE).contiguous() for k, v in sd.items()}


def write_peft(pm: Any, path: Path) -> Path:
    """A PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) in fp16."""
    from safetensors.torch import save_file

    tmp = _tmp(path)
    tmp.mkdir(parents=True)
    sd = peft_state_dict(pm)
    save_file(_half({PEFT_PREFIX + k: v for k, v in sd.items()}), str(tmp / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    pm.peft_config["default"].save_pretrained(str(tmp))
    return _publish(tmp, path)


def _lora_config(pm: Any) -> dict[str, Any]:
    cfg = pm.peft_config["default"].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])  # a set: fix its order
    return cfg


def write_diffusers(pm: Any, path: Path) -> Path:
    """A diffusers ``save_lora_weights`` file (``unet.``-prefixed, LoraConfig metadata)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    tmp = _tmp(path)
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=convert_state_dict_to_diffusers(_half(peft_state_dict(pm))),
        unet_lora_adapter_metadata=_lora_config(pm),
    )
    os.replace(tmp / "pytorch_lora_weights.safetensors", path)
    shutil.rmtree(tmp)
    return path


def write_kohya(pm: Any, path: Path, alpha: float) -> Path:
    """A kohya file via diffusers' ``convert_state_dict_to_kohya``, with the run's real ``.alpha``."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in _half(peft_state_dict(pm)).items()})
    # diffusers writes alpha = rank (scale 1); the real alpha keeps the update the same
    kohya = {k: (torch.tensor(float(alpha), dtype=DTYPE) if k.endswith(".alpha") else v) for k, v in kohya.items()}
    tmp = _tmp(path)
    save_file(kohya, str(tmp), metadata={"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha)})
    return _publish(tmp, path)


def write_lycoris(net: Any, path: Path, algo: str, rank: int, alpha: float) -> Path:
    """A LyCORIS file written by ``lycoris-lora`` itself (``save_weights``) in fp16."""
    tmp = _tmp(path)
    meta = {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({"algo": algo}), "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
    net.save_weights(str(tmp), DTYPE, meta)
    return _publish(tmp, path)


def write(fmt: str, trained: Any, path: Path, rank: int, alpha: float) -> Path:
    """Dispatch on ``fmt`` (``FORMATS``): ``trained`` is the peft model or the lycoris network."""
    if fmt == "peft":
        return write_peft(trained, path)
    if fmt == "diffusers":
        return write_diffusers(trained, path)
    if fmt == "kohya":
        return write_kohya(trained, path, alpha)
    if fmt in LYCORIS_FORMATS:
        return write_lycoris(trained, path, fmt, rank, alpha)
    raise ValueError(f"unknown zoo format {fmt!r}; expected one of {', '.join(FORMATS)}")
