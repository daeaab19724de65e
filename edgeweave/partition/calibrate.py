"""Price layers by measured time: FLOP counts redistributed by what each layer really costs.

A node's ``edgeweave.io/gflops`` label is the *whole* model's FLOPs over its time on
that node, so pricing a layer as ``flops / gflops`` assumes every layer runs at the
model's average FLOPs per second. They do not: a 7x7 convolution late in ResNet-50
runs at a fraction of the speed of the early ones, so a stage of late layers is
priced too cheap and becomes a bottleneck the planner did not see.

:func:`calibrate_flops` fixes the *shares* without touching the scale. Given each
layer's seconds on one reference CPU, a layer's "effective FLOPs" become::

    flops_i' = time_i * (sum(flops) / sum(time))

so the model's total is unchanged (the gflops labels, measured on the whole model,
keep their meaning) while each layer carries its measured part of it. The cost
model (:mod:`edgeweave.partition.costmodel`) then prices these FLOPs as any other:
this module only rewrites a profile, it prices nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from enum import StrEnum

from edgeweave.errors import EdgeweaveError
from edgeweave.partition.costmodel import ModelProfile


class LayerCosts(StrEnum):
    """How layers are priced: by FLOP count, or by FLOPs redistributed by each layer's
    measured time (:func:`calibrate_flops`; the model's total FLOPs unchanged)."""

    flops = "flops"
    measured = "measured"

class CalibrationError(EdgeweaveError, ValueError):
    """Measured layer times that do not fit the profile they are meant to calibrate."""


def calibrate_flops(profile: ModelProfile, layer_seconds: Sequence[float]) -> ModelProfile:
    """``profile`` with each layer's FLOPs proportional to its measured seconds.

    ``layer_seconds[i]`` is layer ``i``'s time per sample on one reference CPU (any
    CPU: only the ratios between layers are used). Measured ``time_s`` entries, names,
    sizes and ONNX bookkeeping are kept as they are, so shards split the same way.
    """
    seconds = _checked_seconds(profile, layer_seconds)
    total_flops = _total_flops(profile)
    scale = total_flops / math.fsum(seconds)
    layers = tuple(
        dataclasses.replace(layer, flops=time * scale)
        for layer, time in zip(profile.layers, seconds, strict=True)
    )
    return dataclasses.replace(profile, layers=layers)


def layer_speeds(profile: ModelProfile, layer_seconds: Sequence[float]) -> tuple[float, ...]:
    """Each layer's FLOPs per second relative to the whole model's (1.0 = average).

    Below 1 a layer is slower than its FLOP count says, so a FLOP-priced plan gives
    its stage too little time. Layers without FLOPs count as 0.
    """
    seconds = _checked_seconds(profile, layer_seconds)
    average = _total_flops(profile) / math.fsum(seconds)
    return tuple((layer.flops or 0.0) / time / average
                 for layer, time in zip(profile.layers, seconds, strict=True))


def _checked_seconds(profile: ModelProfile, layer_seconds: Sequence[float]) -> list[float]:
    seconds = [float(value) for value in layer_seconds]
    if len(seconds) != len(profile.layers):
        raise CalibrationError(
            f"model {profile.name!r} has {len(profile.layers)} layers but "
            f"{len(seconds)} measured times were given: measure the same chain of pieces"
        )
    for index, (layer, value) in enumerate(zip(profile.layers, seconds, strict=True)):
        if not (math.isfinite(value) and value > 0):
            raise CalibrationError(
                f"model {profile.name!r}: layer {index} ({layer.name!r}) has measured time "
                f"{value:g} s; every layer needs a positive, finite time"
            )
    return seconds


def _total_flops(profile: ModelProfile) -> float:
    missing = [layer.name for layer in profile.layers if layer.flops is None]
    if missing:
        raise CalibrationError(
            f"model {profile.name!r}: layer {missing[0]!r} has no FLOP count, so there is no "
            "total to redistribute (calibrate a FLOP-priced profile, not a measured one)"
        )
    total = profile.flops
    if not (math.isfinite(total) and total > 0):
        raise CalibrationError(
            f"model {profile.name!r} has {total:g} FLOPs in all: nothing to redistribute"
        )
    return total
