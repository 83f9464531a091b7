"""Regenerate data/samples: tiny LoRAs trained here and written by real writers.

Run: ``make samples`` (or ``python scripts/make_samples.py --out data/samples``).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lorasearch.samples import train_lora, write_copies, write_loha


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("data/samples"))
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    tmp = out / "_tmp"
    copies = write_copies(train_lora(seed=0), tmp)
    shutil.copytree(copies["peft"], out / "tiny_peft")
    shutil.copy(copies["kohya"], out / "tiny_kohya.safetensors")
    shutil.copy(copies["diffusers"], out / "tiny_diffusers.safetensors")
    shutil.copy(copies["bf16"], out / "tiny_peft_bf16.safetensors")
    shutil.copy(tmp / "d_bf16.adapter_config.json", out / "tiny_peft_bf16.adapter_config.json")
    other = write_copies(train_lora(seed=1), out / "_tmp_other")
    shutil.copytree(other["peft"], out / "tiny_other_peft")
    write_loha(out / "tiny_loha.safetensors")
    for t in (tmp, out / "_tmp_other"):
        shutil.rmtree(t)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
