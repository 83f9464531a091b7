"""Attribution: does a LoRA or a checkpoint derive from indexed LoRAs, which ones, at what weight, how sure?

- ``engine``: ``attribute(store, target, base=None, ...) -> dict`` (the CLI/API JSON), targets, verdicts;
- ``mixture``: Gram matrices, greedy selection, partial cosines, projected least squares (pure maths);
- ``checkpoint``: ΔW of a full checkpoint against its base, streamed tensor by tensor;
- ``calibration``: the null distribution of scores between unrelated indexed LoRAs, false-positive rates;
- ``derivatives``: derived LoRAs (rank resize, subsets, merges, checkpoints) for the tests and the benchmark.
"""
from __future__ import annotations

from lorasearch.attribution.calibration import Calibration, get_calibration
from lorasearch.attribution.engine import Target, Thresholds, attribute, attribute_target

__all__ = ["Calibration", "Target", "Thresholds", "attribute", "attribute_target", "get_calibration"]
