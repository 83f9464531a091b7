"""Read any LoRA file into the canonical LoraDelta.

``load_lora(path)`` validates the file, picks the reader whose key patterns
match, decodes every module and lets ``families.resolve`` name the modules
canonically. Readers register themselves on import (see ``base.register_format``).
"""
from __future__ import annotations

# Importing a reader module registers it.
from lorasearch.formats import cloneofsimo, diffusers, flux, kohya, peft  # noqa: F401
from lorasearch.formats.base import DictSource, ReadContext, TensorSource, pick_reader, readers, register_format
from lorasearch.formats.load import find_loras, load_lora, read_source

__all__ = [
    "DictSource", "ReadContext", "TensorSource", "find_loras", "load_lora", "pick_reader", "read_source", "readers",
    "register_format",
]
