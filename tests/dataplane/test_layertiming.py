"""Per-layer times from onnxruntime's profiler, on real zoo models, and the store's use of them.

No timing is asserted beyond sanity: every layer gets a positive time, the layers
account for a whole run, and the figures land where the store promises to keep them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeweave import zoo
from edgeweave.layertiming import LayerTimes, LayerTimingError, measure_layer_times
from edgeweave.modelstore import LayerCostsError, ModelStore, StoredModel
from edgeweave.partition.chain import build_chain
from edgeweave.partition.graph import analyze, load_onnx
from edgeweave.partition.source import ProfiledModel

RUNS = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def resnet18(store: ModelStore) -> tuple[StoredModel, ProfiledModel]:
    model = store.resolve("zoo:resnet18")
    return model, store.profile(model)


@pytest.fixture(scope="module")
def times(resnet18: tuple[StoredModel, ProfiledModel]) -> LayerTimes:
    _, profiled = resnet18
    return measure_layer_times(profiled.model, profiled.profile, profiled.analysis, runs=RUNS)


def test_every_layer_of_the_chain_gets_a_positive_time(
    resnet18: tuple[StoredModel, ProfiledModel], times: LayerTimes
) -> None:
    _, profiled = resnet18

    assert times.layers == tuple(layer.name for layer in profiled.profile.layers)
    assert len(times.seconds) == len(profiled.profile.layers)
    assert all(seconds > 0 for seconds in times.seconds)
    assert (times.runs, times.threads) == (RUNS, 1)


def test_the_layers_account_for_a_whole_run(times: LayerTimes) -> None:
    # Within each run the kernels are nearly all of it (the executor adds a little);
    # medians per layer on a shared machine may sum to a little less than a median run.
    assert 0.8 < times.kernel_share <= 1.0
    assert 0.25 * times.run_s < times.kernel_s < 2.0 * times.run_s
    assert times.by_order_s < 0.2 * times.kernel_s


def test_a_convolution_cut_from_its_batchnorm_still_costs_time(
    resnet18: tuple[StoredModel, ProfiledModel], times: LayerTimes
) -> None:
    # onnxruntime fuses Conv + BatchNormalization + Relu into one kernel named after the
    # Relu; a piece holding only the convolution must not come out free.
    _, profiled = resnet18
    conv_only = [i for i, layer in enumerate(profiled.profile.layers)
                 if all(node.endswith("conv1") for node in layer.onnx_nodes)]

    assert conv_only, "the chain has no convolution-only piece to check"
    assert min(times.seconds[i] for i in conv_only) > 10e-6


def test_the_store_prices_layers_by_measured_time_when_asked(
    store: ModelStore, resnet18: tuple[StoredModel, ProfiledModel]
) -> None:
    model, by_flops = resnet18

    measured = store.profile(model, layer_costs="measured")

    assert [layer.name for layer in measured.profile.layers] == [
        layer.name for layer in by_flops.profile.layers]
    assert measured.profile.flops == pytest.approx(by_flops.profile.flops, rel=1e-9)
    assert [layer.flops for layer in measured.profile.layers] != [
        layer.flops for layer in by_flops.profile.layers]
    assert store.profile(model).profile == by_flops.profile


def test_measured_times_are_kept_on_disk_for_the_next_operator(
    store: ModelStore, resnet18: tuple[StoredModel, ProfiledModel]
) -> None:
    model, profiled = resnet18
    first = store.layer_times(model, profiled)

    again = ModelStore(store.root)
    second = again.layer_times(again.resolve("zoo:resnet18"), again.profile(model))

    assert second == first  # read back, not measured anew (that would differ)
    assert list((store.root / "timings").glob("*.json"))


def test_an_unknown_way_of_pricing_layers_is_refused(
    store: ModelStore, resnet18: tuple[StoredModel, ProfiledModel]
) -> None:
    model, _ = resnet18

    with pytest.raises(LayerCostsError, match="use one of flops, measured"):
        store.profile(model, layer_costs="guessed")


def test_a_model_without_its_weights_cannot_be_timed() -> None:
    skeleton = load_onnx(zoo.build("zoo:resnet18", materialize=False))
    analysis = analyze(skeleton)
    chain = build_chain(analysis, name="resnet18")

    with pytest.raises(LayerTimingError, match="'resnet18' cannot run in onnxruntime"):
        measure_layer_times(skeleton, chain, analysis, runs=1)


def test_a_profile_of_another_model_is_refused(
    resnet18: tuple[StoredModel, ProfiledModel],
) -> None:
    _, profiled = resnet18
    other = load_onnx(_two_matmuls())
    analysis = analyze(other)

    with pytest.raises(LayerTimingError, match="do not belong together"):
        measure_layer_times(other, profiled.profile, analysis, runs=1)


def test_weights_kept_beside_the_model_are_found(tmp_path: Path) -> None:
    # Models over 2 GiB keep their weights in NAME.onnx.data; a small one shows the path.
    onnx.save(_two_matmuls(), tmp_path / "mlp.onnx", save_as_external_data=True,
              location="mlp.onnx.data", size_threshold=0)
    model = load_onnx(tmp_path / "mlp.onnx")
    analysis = analyze(model)
    chain = build_chain(analysis, max_pieces=2, name="mlp")

    found = measure_layer_times(model, chain, analysis, runs=2, external_data_dir=tmp_path)

    assert len(found.seconds) == len(chain.layers) == 2
    assert all(seconds > 0 for seconds in found.seconds)


def _two_matmuls() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32),
                                       name=f"w{i}") for i in range(2)]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
         helper.make_node("Relu", ["h"], ["r"], name="relu0"),
         helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 256])],
        initializer=weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
