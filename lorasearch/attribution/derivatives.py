"""Derived LoRAs and checkpoints, made the way people make them: for the attribution tests and benchmark.

- ``rank_resize``: every module's ΔW truncated to its best rank-r approximation
  (kohya sd-scripts ``networks/resize_lora.py`` with a fixed ``--new_rank``:
  an SVD of ΔW, the top r singular triplets kept, alpha set so the scale is 1);
- ``subset``: some modules kept (UNet only, one text encoder dropped...);
- ``scaled`` / ``reparameterised``: the same update times c / other factors;
- ``merge_concat``: ``Σ cᵢ ΔWᵢ`` as one LoRA whose factors are the components'
  side by side (rank Σ rᵢ; sd-scripts ``merge_lora.py --concat``);
- ``merge_svd``: the same sum compressed to rank r by SVD (sd-scripts ``svd_merge_lora.py``);
- ``write_kohya``: a LoraDelta written as a kohya file (``lora_unet_…`` /
  ``lora_te_…`` keys, ``.alpha`` = scale·rank), which ``load_lora`` reads back
  to the same canonical modules;
- ``write_checkpoint``: ``W0 + Σ cᵢ ΔWᵢ`` written as a full checkpoint;
- ``continue_training``: a tiny peft LoRA (``lorasearch.samples``) trained further
  from its saved adapter (torch and peft: test extras).

Pure numpy except ``continue_training`` and the writers' file output.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lorasearch.delta import Delta, Factored, LoraDelta

Part = tuple[LoraDelta, float]


def truncate(up: np.ndarray, down: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` factors of ``up @ down`` (QR of both factors, SVD of the small core).

    Returns:
        (up' p×rank', down' rank'×q), rank' = min(rank, current rank), singular values split evenly.
    """
    qu, ru = np.linalg.qr(up.astype(np.float64))
    qv, rv = np.linalg.qr(down.T.astype(np.float64))
    a, s, bt = np.linalg.svd(ru @ rv.T)
    r = min(rank, s.size)
    root = np.sqrt(s[:r])
    return (qu @ a[:, :r]) * root, (root[:, None] * bt[:r]) @ qv.T


def _map(ld: LoraDelta, fn: Callable[[str, Delta], Delta | None]) -> LoraDelta:
    mods = {}
    for n, d in ld.modules.items():
        nd = fn(n, d)
        if nd is not None:
            mods[n] = nd
    return replace(ld, modules=mods, source={}, metadata=dict(ld.metadata))


def rank_resize(ld: LoraDelta, rank: int) -> LoraDelta:
    """Every factored module's ΔW truncated to rank ``rank`` (others unchanged)."""
    def fn(n: str, d: Delta) -> Delta:
        if not isinstance(d, Factored) or d.rank <= rank:
            return d
        u, v = truncate(d.up * d.scale, d.down, rank)
        return Factored(u.astype(np.float32), v.astype(np.float32), 1.0, d.shape)
    return _map(ld, fn)


def subset(ld: LoraDelta, keep: Callable[[str], bool]) -> LoraDelta:
    """Only the modules ``keep(name)`` accepts."""
    return _map(ld, lambda n, d: d if keep(n) else None)


def scaled(ld: LoraDelta, c: float) -> LoraDelta:
    """ΔW × c (the scale changes; the factors stay)."""
    return _map(ld, lambda n, d: replace(d, scale=d.scale * c) if isinstance(d, Factored) else d)


def reparameterised(ld: LoraDelta, rng: np.random.Generator, cond: float = 4.0) -> LoraDelta:
    """``(U·G)(G⁻¹·V)`` with a random G of condition number ≤ ``cond`` per module: the same ΔW."""
    def fn(n: str, d: Delta) -> Delta:
        if not isinstance(d, Factored):
            return d
        r = d.rank
        q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
        q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
        g = (q1 * np.exp(rng.uniform(-0.5, 0.5, r) * np.log(cond))) @ q2
        return Factored((d.up.astype(np.float64) @ g).astype(np.float32),
                        np.linalg.solve(g, d.down.astype(np.float64)).astype(np.float32), d.scale, d.shape)
    return _map(ld, fn)


def merge_concat(parts: Sequence[Part], family: str | None = None) -> LoraDelta:
    """``Σ cᵢ ΔWᵢ`` as one LoRA: per module, the components' factors side by side (scale folded into up).

    Raises:
        ValueError: a component has a non-factored module.
    """
    fam = family or parts[0][0].family
    names = list(dict.fromkeys(n for ld, _ in parts for n in ld.modules))
    mods: dict[str, Delta] = {}
    for n in names:
        ups, downs, shape = [], [], ()
        for ld, c in parts:
            d = ld.modules.get(n)
            if d is None:
                continue
            if not isinstance(d, Factored):
                raise ValueError(f"{n}: only factored modules can be merged by concatenation")
            ups.append(d.up.astype(np.float64) * (c * d.scale))
            downs.append(d.down.astype(np.float64))
            shape = d.shape
        mods[n] = Factored(np.concatenate(ups, axis=1).astype(np.float32), np.concatenate(downs).astype(np.float32),
                           1.0, shape)
    return LoraDelta(fam, "merge", mods)


def merge_svd(parts: Sequence[Part], rank: int, family: str | None = None) -> LoraDelta:
    """``Σ cᵢ ΔWᵢ`` compressed to rank ``rank`` per module (SVD of the sum)."""
    cat = merge_concat(parts, family)
    return rank_resize(cat, rank)


# --------------------------------------------------------------------------- files


def kohya_prefix(name: str) -> str:
    """The kohya key prefix of a canonical module name (``unet.a.b`` -> ``lora_unet_a_b``)."""
    for comp, tag in (("unet.", "lora_unet_"), ("transformer.", "lora_unet_"), ("diffusion_model.", "lora_unet_"),
                      ("text_encoder_2.", "lora_te2_"), ("text_encoder_3.", "lora_te3_"), ("text_encoder.", "lora_te_")):
        if name.startswith(comp):
            return tag + name[len(comp):].replace(".", "_")
    raise ValueError(f"{name}: no kohya name for this module (not a diffusion-model module)")


def kohya_state(ld: LoraDelta, dtype: str = "float32") -> dict[str, np.ndarray]:
    """A LoraDelta's factored modules as kohya tensors (conv factors in their 4-D shapes)."""
    out: dict[str, np.ndarray] = {}
    for n, d in ld.modules.items():
        if not isinstance(d, Factored):
            raise ValueError(f"{n}: only factored modules can be written as kohya LoRA")
        key = kohya_prefix(n)
        r = d.rank
        down, up = d.down, d.up
        if len(d.shape) == 4:
            down = down.reshape(r, *d.shape[1:])
            up = up.reshape(d.shape[0], r, 1, 1)
        out[f"{key}.lora_down.weight"] = np.ascontiguousarray(down).astype(dtype)
        out[f"{key}.lora_up.weight"] = np.ascontiguousarray(up).astype(dtype)
        out[f"{key}.alpha"] = np.asarray(d.scale * r, dtype=np.float32)
    return out


def write_kohya(ld: LoraDelta, path: str | Path, dtype: str = "float32", metadata: Mapping[str, str] | None = None) -> Path:
    """Write a kohya ``.safetensors`` (``dtype`` ``float32``/``float16``/``bfloat16``)."""
    import torch
    from safetensors.torch import save_file

    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    sd = {k: (torch.from_numpy(np.array(v, dtype=np.float32)).to(tdt) if not k.endswith(".alpha")
              else torch.tensor(float(v))) for k, v in kohya_state(ld).items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(p), metadata=dict(metadata or {"ss_network_module": "networks.lora"}))
    return p


def weight_key(name: str, keys: Sequence[str]) -> str:
    """The checkpoint tensor that a canonical module name updates.

    ``unet.a.b`` / ``transformer.a.b`` -> ``a.b.weight``; an ``unknown:`` family's
    flattened ``diffusion_model.a_b`` -> the key whose dots, made underscores, match.
    """
    for comp in ("unet.", "transformer."):
        if name.startswith(comp) and f"{name[len(comp):]}.weight" in keys:
            return f"{name[len(comp):]}.weight"
    flat = name.split(".", 1)[1] if "." in name else name
    for k in keys:
        if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == flat:
            return k
    raise KeyError(f"{name}: no tensor of the checkpoint matches")


def merged_state(base: Mapping[str, np.ndarray], parts: Sequence[Part]) -> dict[str, np.ndarray]:
    """``W0 + Σ cᵢ ΔWᵢ`` for every tensor a component updates (other tensors as in the base)."""
    out = {k: np.array(v, dtype=np.float32) for k, v in base.items()}
    keys = list(base)
    for ld, c in parts:
        for n, d in ld.modules.items():
            k = weight_key(n, keys)
            out[k] = (out[k].astype(np.float64) + c * d.matrix().astype(np.float64).reshape(out[k].shape)).astype(np.float32)
    return out


def write_checkpoint(state: Mapping[str, np.ndarray], path: str | Path, dtype: str = "float32",
                     diffusers_folder: bool = False) -> Path:
    """Write a state dict as one ``.safetensors`` file, or as a diffusers folder (``path/unet/diffusion_pytorch_model.safetensors``)."""
    from safetensors.numpy import save_file

    p = Path(path)
    target = p / "unet" / "diffusion_pytorch_model.safetensors" if diffusers_folder else p
    target.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        import torch
        from safetensors.torch import save_file as save_torch

        save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in state.items()}, str(target))
    else:
        save_file({k: np.ascontiguousarray(v).astype(dtype) for k, v in state.items()}, str(target))
    if diffusers_folder:
        (p / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))
    return p


def unet_state(unet: Any) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in unet.state_dict().items()}


def continue_training(adapter: str | Path, out: str | Path, steps: int, data_seed: int, lr: float = 1e-2) -> Path:
    """Train a saved tiny peft LoRA (``lorasearch.samples.train_lora``) for ``steps`` more Adam steps.

    The optimiser starts afresh (as when a run is resumed from the weights
    alone); the data are ``train_lora``'s for ``data_seed`` (the same seed:
    the same data, i.e. training continued on its own set).

    Returns:
        the output adapter folder.
    """
    from peft import PeftModel

    from lorasearch.samples import train_steps
    from lorasearch.tinymodels import make_tiny_unet

    pm = PeftModel.from_pretrained(make_tiny_unet(0), str(adapter), is_trainable=True)
    train_steps(pm, steps, data_seed, lr)
    pm.save_pretrained(str(out))
    return Path(out)
