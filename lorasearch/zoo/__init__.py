"""The style zoo: a labelled LoRA collection made by the project (issue 7).

``build_zoo`` makes a zoo folder; ``generate`` samples the zoo's base model with a LoRA merged in.
"""
from __future__ import annotations

from lorasearch.zoo.build import LABEL_FIELDS, build_zoo
from lorasearch.zoo.model import generate

__all__ = ["LABEL_FIELDS", "build_zoo", "generate"]
