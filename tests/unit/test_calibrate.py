"""Pricing layers by measured time: the model's FLOPs kept, each layer's share measured."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeweave.errors import EdgeweaveError
from edgeweave.partition.calibrate import CalibrationError, calibrate_flops, layer_speeds
from edgeweave.partition.costmodel import Layer, ModelProfile, Node, evaluate, layer_time

# Three layers of 1, 2 and 1 GFLOP; measured, the last runs 3x slower per FLOP.
PROFILE = ModelProfile(
    name="convnet",
    input_bytes=600_000,
    layers=(
        Layer(name="early", out_bytes=400_000, mem_bytes=1_000_000, flops=1e9, params=10,
              onnx_nodes=("conv1", "relu1"), out_tensors=("t1",)),
        Layer(name="middle", out_bytes=200_000, mem_bytes=2_000_000, flops=2e9, params=20,
              onnx_nodes=("conv2",), out_tensors=("t2",)),
        Layer(name="late", out_bytes=4_000, mem_bytes=3_000_000, flops=1e9, params=30,
              onnx_nodes=("conv3", "fc"), out_tensors=("logits",)),
    ),
)
MEASURED_S = (0.010, 0.020, 0.030)


def fast_node(name: str, gflops: float) -> Node:
    return Node(name=name, device_class="cpu", memory_bytes=2**30,
                bandwidth_bytes_per_s=1e12, gflops=gflops)


def test_the_whole_models_flops_are_unchanged() -> None:
    calibrated = calibrate_flops(PROFILE, MEASURED_S)

    assert calibrated.flops == pytest.approx(PROFILE.flops, rel=1e-12)


def test_a_layer_slower_than_its_flops_say_carries_more_of_them() -> None:
    calibrated = calibrate_flops(PROFILE, MEASURED_S)
    flops = [layer.flops for layer in calibrated.layers]

    assert flops == pytest.approx([4e9 / 6, 8e9 / 6, 12e9 / 6])
    assert flops[2] > PROFILE.layers[2].flops
    assert flops[0] < PROFILE.layers[0].flops


def test_a_node_labelled_from_the_whole_model_prices_each_layer_at_its_measured_time() -> None:
    # The label is the whole model's FLOPs over its whole time on the reference CPU
    # (what profile-node measures): then the cost model reproduces every layer's time.
    reference = fast_node("reference", PROFILE.flops / sum(MEASURED_S) / 1e9)
    calibrated = calibrate_flops(PROFILE, MEASURED_S)

    priced = [layer_time(layer, reference) for layer in calibrated.layers]

    assert priced == pytest.approx(MEASURED_S)


def test_a_stage_of_slow_layers_is_priced_as_the_bottleneck_it_is() -> None:
    measured = (0.010, 0.015, 0.035)
    reference = PROFILE.flops / sum(measured) / 1e9
    nodes = [fast_node("a", reference), fast_node("b", reference)]
    stages = [(0, 1, [nodes[0]]), (2, 2, [nodes[1]])]

    by_flops = evaluate(PROFILE, stages)
    by_time = evaluate(calibrate_flops(PROFILE, measured), stages)

    assert by_flops.bottleneck_stage == 0
    assert by_time.bottleneck_stage == 1
    assert by_time.period_s == pytest.approx(0.035)


def test_everything_but_the_flops_is_kept() -> None:
    calibrated = calibrate_flops(PROFILE, MEASURED_S)

    assert calibrated.name == PROFILE.name
    assert calibrated.input_bytes == PROFILE.input_bytes
    for before, after in zip(PROFILE.layers, calibrated.layers, strict=True):
        assert (after.name, after.out_bytes, after.mem_bytes, after.params) == (
            before.name, before.out_bytes, before.mem_bytes, before.params)
        assert (after.onnx_nodes, after.out_tensors) == (before.onnx_nodes, before.out_tensors)


def test_measured_times_by_device_class_still_win_over_flops() -> None:
    timed = ModelProfile(name="mixed", input_bytes=1, layers=(
        Layer(name="a", out_bytes=1, mem_bytes=1, flops=1e9, time_s={"pi4": 0.5}),
        Layer(name="b", out_bytes=1, mem_bytes=1, flops=1e9),
    ))
    calibrated = calibrate_flops(timed, (1.0, 3.0))
    pi4 = Node(name="pi", device_class="pi4", memory_bytes=2**30,
               bandwidth_bytes_per_s=1e9, gflops=1.0)

    assert calibrated.layers[0].time_s == {"pi4": 0.5}
    assert layer_time(calibrated.layers[0], pi4) == 0.5


def test_speeds_say_which_layers_run_below_the_models_average() -> None:
    speeds = layer_speeds(PROFILE, MEASURED_S)

    assert speeds == pytest.approx([1.5, 1.5, 0.5])


@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=3, max_size=3))
def test_any_positive_times_keep_the_total_and_follow_the_times(times: list[float]) -> None:
    calibrated = calibrate_flops(PROFILE, times)
    flops = [layer.flops or 0.0 for layer in calibrated.layers]

    assert math.fsum(flops) == pytest.approx(PROFILE.flops, rel=1e-9)
    for i in range(3):
        assert flops[i] / flops[0] == pytest.approx(times[i] / times[0], rel=1e-9)


def test_a_time_per_layer_is_needed_for_every_layer() -> None:
    with pytest.raises(CalibrationError, match=r"'convnet' has 3 layers but 2 measured times"):
        calibrate_flops(PROFILE, (0.01, 0.02))


@pytest.mark.parametrize("bad", [0.0, -0.01, math.nan, math.inf])
def test_a_layer_without_a_positive_time_is_named(bad: float) -> None:
    with pytest.raises(CalibrationError, match=r"layer 1 \('middle'\)") as error:
        calibrate_flops(PROFILE, (0.01, bad, 0.03))

    assert isinstance(error.value, EdgeweaveError)


def test_a_measured_profile_without_flops_cannot_be_calibrated() -> None:
    measured = ModelProfile(name="pipeedge", input_bytes=1, layers=(
        Layer(name="l0", out_bytes=1, mem_bytes=1, time_s={"pi4": 0.5}),
    ))

    with pytest.raises(CalibrationError, match="layer 'l0' has no FLOP count"):
        calibrate_flops(measured, (0.5,))


def test_a_model_of_zero_flops_has_nothing_to_redistribute() -> None:
    empty = ModelProfile(name="reshape-only", input_bytes=1, layers=(
        Layer(name="l0", out_bytes=1, mem_bytes=1, flops=0.0),
    ))

    with pytest.raises(CalibrationError, match="0 FLOPs in all"):
        calibrate_flops(empty, (0.001,))
