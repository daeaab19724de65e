"""The gateway: the Open Inference Protocol v2 in front of a pipeline of real stage workers.

Most scenarios run gateway and stages in this process (real aiohttp servers on loopback
ports, real onnxruntime sessions); the ones about processes dying, and the one that
checks a zoo model end to end, start ``python -m edgeweave worker`` and
``python -m edgeweave gateway`` processes as a user would. Every scenario is one
``asyncio.run``; the fuzzing tests talk to a pipeline served from a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.client
import json
import os
import secrets
import string
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgeweave.partition.split import split_model
from edgeweave.worker.frames import Frame, FrameHeader, encode_frame_bytes
from edgeweave.worker.gateway import (
    GatewayConfig,
    GatewayConfigError,
    RunningGateway,
    failure_of_error_frame,
    limits_for_body,
    load_metadata,
    metadata_from_onnx,
    start_gateway,
)
from edgeweave.worker.link import STREAM_PATH, Ack, LinkPool, StreamReceiver
from edgeweave.worker.protocol import (
    HEADER_LENGTH,
    ModelMetadata,
    TensorSpec,
    decode_infer_response,
    encode_infer_request,
)
from edgeweave.worker.stage import RunningStage, ShardRunner, StageConfig, start_stage

ort = pytest.importorskip("onnxruntime")

MODEL = "tiny"
GATEWAY_COMMAND = (sys.executable, "-m", "edgeweave", "gateway")
MAX_RELATIVE_DIFFERENCE = 1e-5
HANG_GUARD_S = 60.0
"""Client-side timeout: only a hung gateway reaches it, never a slow machine."""
FUZZ_HANG_GUARD_S = 10.0
"""The same for the fuzzing client's tiny requests, short because hypothesis replays a
failing example several times."""


# --------------------------------------------------------------------------- models
def tiny_model() -> onnx.ModelProto:
    """``y = relu(x @ w1) @ w2 + b`` and ``top = argmax(y)``: two outputs, two dtypes."""
    rng = np.random.default_rng(7)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w1", (8, 16)), ("w2", (16, 4)), ("b", (4,)))
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2"),
        helper.make_node("Add", ["z", "b"], ["y"], name="add"),
        helper.make_node("ArgMax", ["y"], ["top"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("top", TensorProto.INT64, ["N"]),
        ],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def reshape_model() -> onnx.ModelProto:
    """``y = reshape(x, shape)`` with ``x`` fixed at [2, 4]: a stage that can fail at compute
    time (a shape onnxruntime refuses) and refuse inputs (any other shape of ``x``)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@dataclass
class SplitModel:
    """A model cut into shard files, its protocol metadata, and how to compute the truth."""

    name: str
    model: onnx.ModelProto
    shards: list[Path]
    metadata: ModelMetadata
    metadata_path: Path
    _whole: Any = field(default=None, repr=False)

    def expected(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unsplit model's outputs, with the session options the stages use."""
        if self._whole is None:
            self._whole = ShardRunner(self.model.SerializeToString())
        return self._whole.run(dict(inputs))


def _split_in_two(model: onnx.ModelProto, name: str, folder: Path) -> SplitModel:
    nodes = [node.name for node in model.graph.node]
    middle = len(nodes) // 2
    shards = split_model(model, [nodes[:middle], nodes[middle:]])
    paths = [shard.save(folder / f"{name}-stage{shard.index}.onnx") for shard in shards]
    metadata = metadata_from_onnx(model, name)
    metadata_path = folder / f"{name}.json"
    metadata_path.write_text(json.dumps(metadata.to_dict()))
    return SplitModel(name, model, paths, metadata, metadata_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SplitModel:
    return _split_in_two(tiny_model(), MODEL, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> SplitModel:
    from edgeweave import zoo

    return _split_in_two(zoo.build("mobilenet_v2"), "mobilenet", tmp_path_factory.mktemp("mb"))


def tiny_inputs(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 8)).astype(np.float32)}


def assert_outputs_match(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = np.asarray(got[name])
        assert have.shape == want.shape and have.dtype == want.dtype, name
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        difference = float(np.max(np.abs(have.astype(np.float64) - want), initial=0.0))
        assert difference / scale <= MAX_RELATIVE_DIFFERENCE, f"{name}: {difference / scale}"


# --------------------------------------------------------------------------- http
@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def error(self) -> str:
        document = json.loads(self.body)
        assert isinstance(document, dict) and isinstance(document.get("error"), str), self.body
        assert document["error"]
        return document["error"]

    def outputs(self) -> dict[str, np.ndarray]:
        assert self.status == 200, self.body[:500]
        return decode_infer_response(self.body, self.headers.get(HEADER_LENGTH)).outputs

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    session: aiohttp.ClientSession,
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    async with session.request(
        method, url, data=body, headers=dict(headers or {}),
        timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S),
    ) as response:
        return Reply(response.status, dict(response.headers), await response.read())


async def infer(
    session: aiohttp.ClientSession,
    gateway_url: str,
    inputs: Mapping[str, np.ndarray],
    *,
    model: str = MODEL,
    binary: bool = True,
    headers: Mapping[str, str] | None = None,
    **request: Any,
) -> Reply:
    body, wire_headers = encode_infer_request(
        inputs, binary_inputs=binary, binary_outputs=binary, **request
    )
    return await call(
        session, f"{gateway_url}/v2/models/{model}/infer", method="POST", body=body,
        headers={**wire_headers, **(headers or {})},
    )


async def wait_ready(dp: types.ModuleType, gateway_url: str) -> None:
    async with aiohttp.ClientSession() as session:

        async def ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                return (await call(session, f"{gateway_url}/v2/health/ready")).status == 200
            return False

        await dp.wait_until(ready, "the gateway to be ready")


async def wait_served(
    dp: types.ModuleType, gateway_url: str, inputs: Mapping[str, np.ndarray]
) -> Reply:
    """Send ``inputs`` until a request succeeds (a pipeline coming back); that reply."""
    replies: list[Reply] = []
    async with aiohttp.ClientSession() as session:

        async def served() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                reply = await infer(session, gateway_url, inputs, headers={"Timeout": "2"})
                replies.append(reply)
                return reply.status == 200
            return False

        await dp.wait_until(served, "a request to succeed")
    return replies[-1]


# --------------------------------------------------------------------------- in process
@dataclass
class Served:
    gateway: RunningGateway
    stages: list[RunningStage]

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def model_url(self) -> str:
        return f"{self.url}/v2/models/{MODEL}"


@contextlib.asynccontextmanager
async def serving(
    split: SplitModel,
    token: str,
    dp: types.ModuleType,
    *,
    metadata: ModelMetadata | None = None,
    **config: Any,
) -> AsyncIterator[Served]:
    """Gateway → stage 0 → stage 1 → gateway, all in this event loop, ready to serve."""
    port0 = dp.free_port()
    gateway = await start_gateway(
        GatewayConfig(
            metadata=metadata or split.metadata,
            stage0_urls=(f"http://127.0.0.1:{port0}",),
            token=token,
            **config,
        )
    )
    stages: list[RunningStage] = []
    try:
        downstream = gateway.url
        for index in reversed(range(len(split.shards))):
            stage = await start_stage(
                StageConfig(
                    shard=str(split.shards[index]), downstream=(downstream,), token=token,
                    name=f"s{index}",
                ),
                port=port0 if index == 0 else 0,
            )
            stages.insert(0, stage)
            downstream = stage.url
        await wait_ready(dp, gateway.url)
        yield Served(gateway, stages)
    finally:
        await gateway.stop()
        for stage in stages:
            await stage.stop()


@dataclass
class SingleStage:
    """A one-stage pipeline around an arbitrary shard (for stage-side failures)."""

    gateway: RunningGateway
    stage: RunningStage


@contextlib.asynccontextmanager
async def single_stage(
    shard: Path, metadata: ModelMetadata, token: str, dp: types.ModuleType, **config: Any
) -> AsyncIterator[SingleStage]:
    port = dp.free_port()
    gateway = await start_gateway(
        GatewayConfig(
            metadata=metadata, stage0_urls=(f"http://127.0.0.1:{port}",), token=token, **config
        )
    )
    stage = await start_stage(
        StageConfig(shard=str(shard), downstream=(gateway.url,), token=token, name="only"),
        port=port,
    )
    try:
        yield SingleStage(gateway, stage)
    finally:
        await gateway.stop()
        await stage.stop()


class Hung:
    """A stage-0 replica that accepts frames and never answers: a hung process whose
    connection stays up, the one failure no link can see."""

    def __init__(self, token: str) -> None:
        self.frames: list[Frame] = []
        self.receiver = StreamReceiver(token, self._deliver)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _deliver(self, frame: Frame, ack: Ack) -> None:
        self.frames.append(frame)

    async def start(self) -> Hung:
        app = web.Application()
        app.router.add_post(STREAM_PATH, self.receiver.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self.receiver.close()
        if self._runner is not None:
            await self._runner.cleanup()


# =========================================================================== protocol
def test_json_and_binary_requests_get_the_unsplit_models_outputs(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            inputs = tiny_inputs(batch=3, seed=1)
            expected = tiny.expected(inputs)

            as_json = await infer(session, served.url, inputs, binary=False, request_id="c-1")
            assert as_json.headers["Content-Type"].startswith("application/json")
            assert as_json.json()["id"] == "c-1" and as_json.json()["model_name"] == MODEL
            assert_outputs_match(as_json.outputs(), expected)

            as_binary = await infer(session, served.url, inputs, request_id="c-2")
            assert as_binary.headers["Content-Type"] == "application/octet-stream"
            assert HEADER_LENGTH in as_binary.headers
            assert_outputs_match(as_binary.outputs(), expected)

            only_top = await infer(session, served.url, inputs, outputs=["top"])
            assert_outputs_match(only_top.outputs(), {"top": expected["top"]})

            versioned = await infer(session, served.url, inputs, model=f"{MODEL}/versions/1")
            assert_outputs_match(versioned.outputs(), expected)

    asyncio.run(scenario())


def test_health_and_metadata_endpoints(tiny: SplitModel, token: str, dp: types.ModuleType) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            assert (await call(session, f"{served.url}/v2/health/live")).status == 200
            assert (await call(session, f"{served.url}/v2/health/ready")).status == 200
            assert (await call(session, f"{served.model_url}/ready")).status == 200
            server = (await call(session, f"{served.url}/v2")).json()
            assert server["name"] == "edgeweave" and "binary_tensor_data" in server["extensions"]
            metadata = await call(session, served.model_url)
            assert metadata.status == 200
            assert metadata.json() == {
                "name": MODEL, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 8]}],
                "outputs": [
                    {"name": "y", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "top", "datatype": "INT64", "shape": [-1]},
                ],
            }

    asyncio.run(scenario())


def test_unknown_model_version_or_path_is_a_404_with_a_v2_error(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            for method, path in (
                ("GET", "/v2/models/resnet"),
                ("GET", "/v2/models/resnet/ready"),
                ("POST", "/v2/models/resnet/infer"),
                ("GET", f"/v2/models/{MODEL}/versions/7"),
                ("POST", f"/v2/models/{MODEL}/versions/7/infer"),
                ("GET", "/v3/nothing"),
            ):
                reply = await call(session, served.url + path, method=method, body=b"{}")
                assert reply.status == 404, path
                message = reply.error()
                if "resnet" in path:
                    assert "unknown model 'resnet'" in message and repr(MODEL) in message
            wrong_method = await call(session, f"{served.model_url}/infer")
            assert wrong_method.status == 405 and wrong_method.error()

    asyncio.run(scenario())


BINARY_HEADER = json.dumps({
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                "parameters": {"binary_data_size": 16}}],
}).encode()
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("not JSON", b"{nope", {}, "not valid JSON"),
    ("no inputs", b'{"inputs": []}', {}, "'inputs' is empty"),
    (
        "unknown input",
        json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 8}]}).encode(),
        {}, "has no input 'z'",
    ),
    (
        "wrong datatype",
        json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 8],
                                "data": [0] * 8}]}).encode(),
        {}, "expected datatype FP32, got INT32",
    ),
    (
        "wrong shape",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 7],
                                "data": [0.0] * 7}]}).encode(),
        {}, "expected shape [-1, 8], got [1, 7]",
    ),
    (
        "data shorter than the shape",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 7}]}).encode(),
        {}, "has 8 elements, but 'data' has 7",
    ),
    (
        "a string among the numbers",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 7 + ["a"]}]}).encode(),
        {}, "FP32 data must be numbers",
    ),
    (
        "binary size does not match the shape",
        BINARY_HEADER + bytes(16),
        {HEADER_LENGTH: str(len(BINARY_HEADER))}, "binary_data_size is 16 bytes",
    ),
    (
        "header length is not a number",
        b'{"inputs":[]}', {HEADER_LENGTH: "twelve"}, f"{HEADER_LENGTH} must be a decimal",
    ),
    (
        "unknown output",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 8}],
                    "outputs": [{"name": "logits"}]}).encode(),
        {}, "has no output 'logits'",
    ),
    (
        "timeout header that is not seconds",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 8}]}).encode(),
        {"Timeout": "soon"}, "Timeout header must be a positive number of seconds",
    ),
    (
        "timeout parameter that is not microseconds",
        json.dumps({"parameters": {"timeout": -5},
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8],
                                "data": [0.0] * 8}]}).encode(),
        {}, "timeout must be a positive integer of microseconds",
    ),
]


def test_each_kind_of_bad_input_is_a_400_saying_what_is_wrong(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            for what, body, headers, fragment in BAD_REQUESTS:
                reply = await call(
                    session, f"{served.model_url}/infer", method="POST", body=body,
                    headers={"Content-Type": "application/json", **headers},
                )
                assert reply.status == 400, (what, reply.body)
                assert fragment in reply.error(), (what, reply.error())
            # The refusals cost nobody else anything: a good request still works.
            good = await infer(session, served.url, tiny_inputs())
            assert_outputs_match(good.outputs(), tiny.expected(tiny_inputs()))

    asyncio.run(scenario())


def test_an_oversized_body_is_a_413_whether_its_length_is_declared_or_chunked(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    limit = 4096

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    async def scenario() -> None:
        async with serving(
            tiny, token, dp, limits=limits_for_body(limit)
        ) as served, aiohttp.ClientSession() as session:
            declared = await call(
                session, f"{served.model_url}/infer", method="POST", body=b" " * (limit + 1)
            )
            assert declared.status == 413
            assert f"above the limit of {limit}" in declared.error()
            async with session.post(
                f"{served.model_url}/infer", data=chunks(),
                timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S),
            ) as response:
                assert response.status == 413
                assert f"above the limit of {limit} bytes" in (await response.json())["error"]
            # Under the limit as binary tensors, over it as JSON numbers.
            big = {"x": np.full((120, 8), 0.123456, np.float32)}
            assert len(encode_infer_request(big)[0]) <= limit
            assert len(encode_infer_request(big, binary_inputs=False)[0]) > limit
            as_json = await infer(session, served.url, big, binary=False)
            assert as_json.status == 413 and "above the limit" in as_json.error()
            as_binary = await infer(session, served.url, big)
            assert_outputs_match(as_binary.outputs(), tiny.expected(big))

    asyncio.run(scenario())


def test_the_result_stream_wants_the_pipeline_token(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            frame = encode_frame_bytes(FrameHeader("forged.0"), {"y": np.zeros((1, 4), np.float32)})
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                reply = await call(
                    session, served.url + STREAM_PATH, method="POST", body=frame, headers=headers
                )
                assert reply.status == 401, headers
                assert "bearer token" in reply.error()
            good = await infer(session, served.url, tiny_inputs())
            assert good.status == 200

    asyncio.run(scenario())


def test_api_keys_guard_inference_and_metadata_but_not_health(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(
            tiny, token, dp, api_keys=frozenset({"key-one", "key-two"})
        ) as served, aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer key-three"}, {"Authorization": token}):
                refused = await infer(session, served.url, tiny_inputs(), headers=headers)
                assert refused.status == 401 and "API key" in refused.error()
                assert refused.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await call(session, served.model_url, headers=headers)).status == 401
            for key in ("key-one", "key-two"):
                accepted = await infer(
                    session, served.url, tiny_inputs(), headers={"Authorization": f"Bearer {key}"}
                )
                assert accepted.status == 200
            assert (await call(session, f"{served.url}/v2/health/live")).status == 200
            assert (await call(session, f"{served.url}/v2/health/ready")).status == 200
            assert (await call(session, f"{served.url}/metrics")).status == 200

    asyncio.run(scenario())


# =========================================================================== stage errors
def test_a_stages_refusal_and_compute_error_reach_the_client_with_its_message(
    tmp_path: Path, token: str, dp: types.ModuleType
) -> None:
    shard = tmp_path / "reshape.onnx"
    onnx.save(reshape_model(), shard)
    # Looser than the shard (any batch): the stage, not the gateway, refuses batch 3.
    metadata = ModelMetadata(
        name=MODEL,
        inputs=[TensorSpec("x", "FP32", (-1, 4)), TensorSpec("shape", "INT64", (2,))],
        outputs=[TensorSpec("y", "FP32", (-1, -1))],
    )
    x = np.arange(8, dtype=np.float32).reshape(2, 4)

    async def scenario() -> None:
        async with single_stage(shard, metadata, token, dp) as pipeline:
            url = pipeline.gateway.url
            await wait_ready(dp, url)
            async with aiohttp.ClientSession() as session:
                reshaped = await infer(session, url, {"x": x, "shape": np.array([4, 2])})
                np.testing.assert_array_equal(reshaped.outputs()["y"], x.reshape(4, 2))

                compute = await infer(session, url, {"x": x, "shape": np.array([3, 3])})
                assert compute.status == 500
                assert "stage only failed to compute frame" in compute.error()

                refused = await infer(
                    session, url, {"x": np.zeros((3, 4), np.float32), "shape": np.array([4, 3])}
                )
                assert refused.status == 400
                assert "input 'x' must have shape [2, 4], not [3, 4]" in refused.error()

                again = await infer(session, url, {"x": x, "shape": np.array([8, 1])})
                np.testing.assert_array_equal(again.outputs()["y"], x.reshape(8, 1))

    asyncio.run(scenario())


def tile_model() -> onnx.ModelProto:
    """``y = tile(x, [1, 1024])``: a result 1024 times its input, for a frame limit that
    admits the input and not the result."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"], name="tile")],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [numpy_helper.from_array(np.array([1, 1024], np.int64), "repeats")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


async def _error_frames_of(
    shard: Path, frames: Mapping[str, tuple[float, Mapping[str, np.ndarray]]], token: str,
    dp: types.ModuleType, **stage_config: Any,
) -> dict[str, Frame]:
    """Send ``frames`` (id → deadline, tensors) through one real stage; what it sent on.
    The frame ``header`` is mangled on the way (a dtype no frame carries)."""
    sink = await dp.Sink(token).start()
    stage = await start_stage(
        StageConfig(shard=str(shard), downstream=(sink.url,), token=token, name="s",
                    **stage_config)
    )
    pool = LinkPool([stage.url], token)
    try:
        await stage.worker.wait_loaded()
        await dp.wait_until(lambda: pool.links_up() == 1, "the link to the stage")
        for frame_id, (deadline, tensors) in frames.items():
            data = encode_frame_bytes(FrameHeader(frame_id, deadline), tensors)
            if frame_id == "header":
                data = data.replace(b'"float32"', b'"float99"')
            await pool.send(frame_id, [data])
        await sink.wait_for(len(frames))
    finally:
        await pool.close()
        await stage.stop()
        await sink.stop()
    return {frame_id: sink.results[frame_id] for frame_id in frames}


def test_each_stage_error_carries_a_category_that_maps_to_the_status_its_cause_deserves(
    tmp_path: Path, token: str, dp: types.ModuleType
) -> None:
    """Drive a real stage into each failure it can report and classify what reaches its
    downstream: the status comes from the category the stage set where it failed."""
    reshape, tile = tmp_path / "reshape.onnx", tmp_path / "tile.onnx"
    onnx.save(reshape_model(), reshape)
    onnx.save(tile_model(), tile)
    x = np.zeros((2, 4), np.float32)
    now = time.time()
    reshaping = {
        "late": (now - 1, {"x": x, "shape": np.array([4, 2])}),
        "compute": (now + 60, {"x": x, "shape": np.array([3, 3])}),
        "tensors": (now + 60, {"x": np.zeros((3, 4), np.float32), "shape": np.array([2, 6])}),
        "header": (now + 60, {"x": x, "shape": np.array([4, 2])}),
    }
    expected = {
        "late": ("deadline", 504), "compute": ("internal", 500),
        "tensors": ("invalid_input", 400), "header": ("invalid_input", 400),
        "huge": ("too_large", 413),
    }

    async def scenario() -> dict[str, Frame]:
        results = await _error_frames_of(reshape, reshaping, token, dp)
        # The input fits in 4 KiB, the stage's result (16 KiB) does not.
        tiling = {"huge": (now + 60, {"x": np.ones((1, 4), np.float32)})}
        results |= await _error_frames_of(tile, tiling, token, dp, max_frame_bytes=4096)
        return results

    results = asyncio.run(scenario())
    for frame_id, (category, status) in expected.items():
        header = results[frame_id].header
        assert header.kind == "error" and header.category == category, header
        failure = failure_of_error_frame(header.error or "", header.category)
        assert (failure.status, failure.answered) == (status, True), header.error
    assert failure_of_error_frame("boom", "a_category_from_the_future").status == 500


def test_error_frames_without_a_category_are_classified_by_their_wording(
    tmp_path: Path, token: str, dp: types.ModuleType
) -> None:
    """Stages from before categories (met during a rolling upgrade) wrote only the
    message; the wording of each of today's messages still earns the same status."""
    shard = tmp_path / "reshape.onnx"
    onnx.save(reshape_model(), shard)
    x = np.zeros((2, 4), np.float32)
    now = time.time()
    frames = {
        "late": (now - 1, {"x": x, "shape": np.array([4, 2])}),
        "compute": (now + 60, {"x": x, "shape": np.array([3, 3])}),
        "tensors": (now + 60, {"x": np.zeros((3, 4), np.float32), "shape": np.array([2, 6])}),
        "header": (now + 60, {"x": x, "shape": np.array([4, 2])}),
    }
    results = asyncio.run(_error_frames_of(shard, frames, token, dp))
    for frame_id, frame in results.items():
        header = frame.header
        by_wording = failure_of_error_frame(header.error or "")
        by_category = failure_of_error_frame(header.error or "", header.category)
        assert by_wording.status == by_category.status, (frame_id, header.error)
    assert failure_of_error_frame("something nobody foresaw").status == 500


# =========================================================================== deadlines
def test_a_hung_stage_costs_a_deadline_alone_and_a_retry_with_a_healthy_replica(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        hung = await Hung(token).start()
        try:
            async with serving(
                tiny, token, dp, timeout_s=10.0, min_retry_s=0.1
            ) as served, aiohttp.ClientSession() as session:
                gateway = served.gateway.gateway
                healthy = list(gateway.config.stage0_urls)

                gateway.set_stage0([hung.url])
                await dp.wait_until(lambda: gateway.pool.links_up() == 1, "only the hung link")
                late = await infer(session, served.url, tiny_inputs(), headers={"Timeout": "1.5"})
                assert late.status == 504
                message = late.error()
                assert message.startswith("deadline exceeded") and "1.5 s" in message
                attempts = {frame.id.rsplit(".", 1)[0] for frame in hung.frames}
                assert len(attempts) == 1 and len(hung.frames) >= 2  # it was retried

                gateway.set_stage0([hung.url, *healthy])
                await dp.wait_until(lambda: gateway.pool.links_up() == 2, "both links")
                before = len(hung.frames)
                batches = [tiny_inputs(seed=i) for i in range(24)]
                replies = await asyncio.gather(
                    *(infer(session, served.url, inputs) for inputs in batches)
                )
                for inputs, reply in zip(batches, replies, strict=True):
                    assert_outputs_match(reply.outputs(), tiny.expected(inputs))
                assert len(hung.frames) > before  # some requests did go to the hung replica
        finally:
            await hung.stop()

    asyncio.run(scenario())


def test_with_no_reachable_stage0_requests_get_503_with_the_reason(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        nowhere = f"http://127.0.0.1:{dp.free_port()}"
        gateway = await start_gateway(
            GatewayConfig(
                metadata=tiny.metadata, stage0_urls=(nowhere,), token=token,
                timeout_s=5.0, unavailable_grace_s=0.5,
            )
        )
        try:
            async with aiohttp.ClientSession() as session:
                held = await infer(session, gateway.url, tiny_inputs(), headers={"Timeout": "1"})
                assert held.status == 503
                assert "no live replica of stage 0" in held.error() and nowhere in held.error()
                refused = await infer(session, gateway.url, tiny_inputs())
                assert refused.status == 503 and nowhere in refused.error()
                ready = await call(session, f"{gateway.url}/v2/health/ready")
                assert ready.status == 400
                assert "not ready: no live replica of stage 0" in ready.error()
                assert (await call(session, f"{gateway.url}/v2/health/live")).status == 200
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_metrics_count_requests_by_status_latency_and_in_flight(
    tiny: SplitModel, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with serving(tiny, token, dp) as served, aiohttp.ClientSession() as session:
            for seed in range(3):
                assert (await infer(session, served.url, tiny_inputs(seed=seed))).status == 200
            bad = await call(session, f"{served.model_url}/infer", method="POST", body=b"[]")
            assert bad.status == 400
            samples = await dp.scrape(served.url)
            assert dp.metric(samples, "edgeweave_gateway_requests_total", code="200") == 3
            assert dp.metric(samples, "edgeweave_gateway_requests_total", code="400") == 1
            assert dp.metric(samples, "edgeweave_gateway_request_seconds_count") == 4
            assert dp.metric(samples, "edgeweave_gateway_inflight") == 0
            assert dp.metric(samples, "edgeweave_gateway_ready") == 1
            assert dp.metric(samples, "edgeweave_links_up") == 1

    asyncio.run(scenario())


def test_metadata_files_are_checked_with_a_message_naming_the_file(tmp_path: Path) -> None:
    cases = {
        "missing.json": None,
        "garbage.json": "{not json",
        "no-outputs.json": json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                   "shape": [-1]}]}),
        "bytes.json": json.dumps({
            "inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        }),
        "uint16.json": json.dumps({
            "inputs": [{"name": "x", "datatype": "UINT16", "shape": [-1]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
        }),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(GatewayConfigError) as caught:
            load_metadata(path, MODEL)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value), name
    with pytest.raises(GatewayConfigError, match="UINT16, which stage frames cannot carry"):
        load_metadata(tmp_path / "uint16.json", MODEL)


# =========================================================================== the command
def test_the_gateway_command_is_part_of_the_cli() -> None:
    result = subprocess.run(
        [*GATEWAY_COMMAND, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--model-name", "--metadata", "--listen", "--stage0", "--token-file", "--api-key-file",
        "--max-body-mb", "--timeout-s", "--advertise-url",
    ):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--metadata": "missing.json"}, "cannot read model metadata"),
        ({"--listen": "localhost"}, "HOST:PORT"),
        ({"--stage0": "ftp://somewhere"}, "is not an http(s) base URL"),
        ({"--advertise-url": "ftp://me:8080"}, "--advertise-url must be an http:// or https://"),
        ({"--advertise-url": "http://me:8080/v1/stream"}, "must be a base URL"),
        ({"--token-file": None}, "needs the pipeline token"),
        ({"--api-key-file": "empty"}, "holds no key"),
    ],
)
def test_a_gateway_that_cannot_serve_says_why_in_one_line(
    tiny: SplitModel, tmp_path: Path, change: dict[str, str | None], message: str
) -> None:
    (tmp_path / "token").write_text("secret\n")
    (tmp_path / "empty").write_text("# no keys yet\n")
    options: dict[str, str | None] = {
        "--model-name": MODEL, "--metadata": str(tiny.metadata_path),
        "--listen": "127.0.0.1:0", "--stage0": "http://127.0.0.1:9",
        "--token-file": "token", **change,
    }
    argv = [arg for key, value in options.items() if value is not None for arg in (key, value)]
    environment = {k: v for k, v in os.environ.items() if k != "EDGEWEAVE_TOKEN"}
    result = subprocess.run(
        [*GATEWAY_COMMAND, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=environment,
    )
    assert result.returncode == 1, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )


# =========================================================================== processes
@dataclass
class GatewayProcess:
    """``python -m edgeweave gateway`` with its output in files, killed when the test ends."""

    args: list[str]
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> GatewayProcess:
        with (self.log_dir / "gateway.out").open("wb") as out, (
            self.log_dir / "gateway.err"
        ).open("wb") as err:
            self.process = subprocess.Popen(
                [*GATEWAY_COMMAND, *self.args], stdout=out, stderr=err, env=dict(os.environ)
            )
        return self

    async def wait_listening(self, dp: types.ModuleType) -> str:
        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the gateway exited: {(self.log_dir / 'gateway.err').read_text()}"
                )
            for line in (self.log_dir / "gateway.out").read_text().splitlines():
                if " listening on " in line:
                    self.url = line.rsplit(" ", 1)[1]
                    return True
            return False

        await dp.wait_until(listening, "the gateway to listen", dp.STARTUP_TIMEOUT_S)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for gateway in started:
            gateway.stop()


@dataclass
class ProcessPipeline:
    gateway: GatewayProcess
    stages: list[list[Any]]
    """Worker processes by stage, replicas in order."""
    stage_ports: list[list[int]]


async def start_process_pipeline(
    split: SplitModel,
    workers: Any,
    gateways: list[GatewayProcess],
    token_file: Path,
    tmp_path: Path,
    dp: types.ModuleType,
    *,
    replicas: Sequence[int] = (1, 1),
    gateway_args: Sequence[str] = (),
) -> ProcessPipeline:
    """Gateway, then the last stage back to the first, each replica on a port it can be
    restarted on; returns once the gateway answers ready."""
    ports = [[dp.free_port() for _ in range(count)] for count in replicas]
    stage0_args = [arg for port in ports[0] for arg in ("--stage0", f"http://127.0.0.1:{port}")]
    gateway = GatewayProcess(
        [
            "--model-name", split.name, "--metadata", str(split.metadata_path),
            "--listen", "127.0.0.1:0", "--token-file", str(token_file), *stage0_args,
            *gateway_args,
        ],
        tmp_path,
    ).start()
    gateways.append(gateway)
    downstream = [await gateway.wait_listening(dp)]
    stages: list[list[Any]] = [[] for _ in replicas]
    for index in reversed(range(len(replicas))):
        for replica, port in enumerate(ports[index]):
            stages[index].append(
                workers.spawn(
                    split.shards[index], downstream, name=f"s{index}r{replica}",
                    listen=f"127.0.0.1:{port}",
                )
            )
        downstream = [f"http://127.0.0.1:{port}" for port in ports[index]]
    for replicas_of_stage in stages:
        for worker in replicas_of_stage:
            await worker.wait_ready()
    await wait_ready(dp, gateway.url)
    return ProcessPipeline(gateway, stages, ports)


def test_a_zoo_model_split_over_two_worker_processes_answers_like_the_whole_model(
    mobilenet: SplitModel, workers: Any, gateways: list[GatewayProcess], token_file: Path,
    tmp_path: Path, dp: types.ModuleType,
) -> None:
    rng = np.random.default_rng(2)
    inputs = {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    expected = mobilenet.expected(inputs)

    async def scenario() -> None:
        pipeline = await start_process_pipeline(
            mobilenet, workers, gateways, token_file, tmp_path, dp
        )
        url = pipeline.gateway.url
        async with aiohttp.ClientSession() as session:
            as_binary = await infer(session, url, inputs, model="mobilenet")
            assert_outputs_match(as_binary.outputs(), expected)
            as_json = await infer(session, url, inputs, model="mobilenet", binary=False)
            assert as_json.headers["Content-Type"].startswith("application/json")
            assert_outputs_match(as_json.outputs(), expected)

    asyncio.run(scenario())


def test_killing_one_of_two_replicas_under_load_fails_no_request(
    tiny: SplitModel, workers: Any, gateways: list[GatewayProcess], token_file: Path,
    tmp_path: Path, dp: types.ModuleType,
) -> None:
    total, concurrency, kill_after = 400, 16, 80
    batches = [tiny_inputs(seed=i) for i in range(total)]

    async def scenario() -> None:
        pipeline = await start_process_pipeline(
            tiny, workers, gateways, token_file, tmp_path, dp, replicas=(1, 2),
            gateway_args=["--timeout-s", "20"],
        )
        url = pipeline.gateway.url
        victim = pipeline.stages[1][0]
        replies: dict[int, Reply] = {}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(total):
            queue.put_nowait(index)
        killed = False

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal killed
            while not queue.empty():
                index = queue.get_nowait()
                replies[index] = await infer(session, url, batches[index])
                if len(replies) >= kill_after and not killed:
                    killed = True
                    await kill_while_holding_frames(victim)

        async def kill_while_holding_frames(victim: Any) -> None:
            """Kill the replica while it holds frames, so that recovery has work to do."""
            for _ in range(200):
                samples = await dp.scrape(victim.url)
                assert dp.metric(samples, "edgeweave_frames_computed_total") > 0
                if dp.metric(samples, "edgeweave_frames_held") > 0:
                    break
            victim.kill()

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
        assert killed, "the load ended before the kill"
        failed = {i: r.status for i, r in replies.items() if r.status != 200}
        assert not failed, failed
        for index, reply in replies.items():
            assert_outputs_match(reply.outputs(), tiny.expected(batches[index]))
        stage0 = await dp.scrape(pipeline.stages[0][0].url)
        assert dp.metric(stage0, "edgeweave_frames_resent_total") > 0  # frames were in flight

    asyncio.run(scenario())


def test_killing_the_only_replica_gives_503s_with_the_reason_until_it_returns(
    tiny: SplitModel, workers: Any, gateways: list[GatewayProcess], token_file: Path,
    tmp_path: Path, dp: types.ModuleType,
) -> None:
    inputs = tiny_inputs(seed=5)
    expected = tiny.expected(inputs)

    async def scenario() -> None:
        pipeline = await start_process_pipeline(
            tiny, workers, gateways, token_file, tmp_path, dp, gateway_args=["--timeout-s", "3"]
        )
        url = pipeline.gateway.url
        async with aiohttp.ClientSession() as session:
            assert_outputs_match((await infer(session, url, inputs)).outputs(), expected)

            # The last stage dies: stage 0 holds the frames until their deadline, then says
            # it has no path; the client hears that, within its deadline.
            pipeline.stages[1][0].kill()
            lost = await asyncio.gather(*(infer(session, url, inputs) for _ in range(4)))
            for reply in lost:
                assert reply.status in (503, 504), reply.body
                message = reply.error()
                assert "no path" in message or message.startswith("deadline exceeded"), message
            assert any(reply.status == 503 for reply in lost), [r.error() for r in lost]
            restarted = workers.spawn(
                tiny.shards[1], [url], name="s1-again",
                listen=f"127.0.0.1:{pipeline.stage_ports[1][0]}",
            )
            await restarted.wait_ready()
            assert_outputs_match((await wait_served(dp, url, inputs)).outputs(), expected)

            # Stage 0 dies: the gateway itself has no path.
            pipeline.stages[0][0].kill()
            for _ in range(2):
                reply = await infer(session, url, inputs)
                assert reply.status == 503
                assert "no live replica of stage 0" in reply.error()
            workers.spawn(
                tiny.shards[0], [f"http://127.0.0.1:{pipeline.stage_ports[1][0]}"],
                name="s0-again", listen=f"127.0.0.1:{pipeline.stage_ports[0][0]}",
            )
            assert_outputs_match((await wait_served(dp, url, inputs)).outputs(), expected)

    asyncio.run(scenario())


# =========================================================================== fuzzing
class ThreadedPipeline:
    """The in-process pipeline served from a background thread, for synchronous clients."""

    def __init__(self, split: SplitModel, dp: types.ModuleType) -> None:
        self.token = secrets.token_hex(16)
        self._split = split
        self._dp = dp
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._context: Any = None
        self.served: Served | None = None

    def __enter__(self) -> ThreadedPipeline:
        self._thread.start()
        self._context = serving(self._split, self.token, self._dp)
        self.served = self._run(self._context.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._run(self._context.__aexit__(None, None, None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(120)

    @property
    def port(self) -> int:
        assert self.served is not None
        return self.served.gateway.port

    def requests_with_status(self, code: str) -> float:
        assert self.served is not None
        registry = self.served.gateway.gateway.worker_metrics.registry
        value = registry.get_sample_value("edgeweave_gateway_requests_total", {"code": code})
        return value or 0.0


class Client:
    """One keep-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> Reply:
        for attempt in range(2):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=FUZZ_HANG_GUARD_S
                )
            try:
                self._connection.request(method, path, body=body, headers=dict(headers))
                response = self._connection.getresponse()
                data = response.read()
            except (ConnectionError, http.client.HTTPException):
                self._connection.close()
                self._connection = None
                if attempt:
                    raise
                continue
            if response.getheader("Connection", "").lower() == "close":
                self._connection.close()
                self._connection = None
            return Reply(response.status, {k: v for k, v in response.getheaders()}, data)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


@pytest.fixture(scope="module")
def dp_module(request: pytest.FixtureRequest) -> types.ModuleType:
    """The data-plane conftest as a module, for module-scoped fixtures (``dp`` is per test)."""
    conftest = Path(__file__).with_name("conftest.py")
    for plugin in request.config.pluginmanager.get_plugins():
        if isinstance(plugin, types.ModuleType) and getattr(plugin, "__file__", None) and (
            Path(plugin.__file__) == conftest
        ):
            return plugin
    raise AssertionError(f"{conftest} is not loaded")


@pytest.fixture(scope="module")
def threaded(tiny: SplitModel, dp_module: types.ModuleType) -> Iterator[ThreadedPipeline]:
    with ThreadedPipeline(tiny, dp_module) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def client(threaded: ThreadedPipeline) -> Iterator[Client]:
    connection = Client(threaded.port)
    yield connection
    connection.close()


VALID_REQUEST: dict[str, Any] = {
    "id": "fuzz",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8}],
}
MUTABLE_PATHS: list[tuple[Any, ...]] = [
    (), ("id",), ("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "datatype"),
    ("inputs", 0, "shape"), ("inputs", 0, "shape", 0), ("inputs", 0, "shape", 1),
    ("inputs", 0, "data"), ("inputs", 0, "data", 3), ("inputs", 0, "parameters"),
    ("outputs",), ("parameters",),
]
SAFE_TEXT = st.text(alphabet=string.printable.strip() + " ", max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(SAFE_TEXT.filter(lambda key: key != "timeout"), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def mutated_json_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    document: Any = copy.deepcopy(VALID_REQUEST)
    path = draw(st.sampled_from(MUTABLE_PATHS))
    value = draw(json_values)
    if not path:
        document = value
    else:
        parent = document
        with contextlib.suppress(KeyError, IndexError, TypeError):
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = value
    return json.dumps(document).encode(), {"Content-Type": "application/json"}


@st.composite
def broken_binary_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    shape = draw(st.sampled_from([(1, 8), (2, 8), (1, 7), (0, 8)]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.bool_]))
    body, headers = encode_infer_request({"x": np.ones(shape, dtype)})
    cut = draw(st.integers(0, len(body)))
    tail = draw(st.binary(max_size=40))
    body = body[:cut] + tail if draw(st.booleans()) else body + tail
    length = draw(
        st.one_of(st.just(headers[HEADER_LENGTH]), st.integers(-3, 400).map(str), SAFE_TEXT)
    )
    return body, {**headers, HEADER_LENGTH: length}


@st.composite
def raw_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    body = draw(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    headers: dict[str, str] = {}
    content_type = draw(
        st.sampled_from([None, "application/json", "application/octet-stream", "text/plain"])
    )
    if content_type is not None:
        headers["Content-Type"] = content_type
    if draw(st.booleans()):
        headers[HEADER_LENGTH] = draw(st.integers(-3, 400).map(str) | SAFE_TEXT)
    return body, headers


fuzzed_requests = st.tuples(
    st.one_of(mutated_json_request(), broken_binary_request(), raw_request()),
    st.sampled_from([None, None, None, "soon", "-1", "0", "1e3", "", "10", "4.5"]),
    st.sampled_from([MODEL] * 9 + ["other", f"{MODEL}/versions/2"]),
)


FUZZ_EXAMPLES = 1000


def test_fuzzed_requests_get_a_4xx_or_a_right_answer_and_the_gateway_serves_on(
    threaded: ThreadedPipeline, client: Client, tiny: SplitModel
) -> None:
    sent = 0

    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzzed_requests)
    def one(request: tuple[tuple[bytes, dict[str, str]], str | None, str]) -> None:
        nonlocal sent
        (body, headers), timeout, model = request
        if timeout is not None:
            headers = {**headers, "Timeout": timeout}
        reply = client.request("POST", f"/v2/models/{model}/infer", body, headers)
        sent += 1
        if reply.status == 200:  # the mutation left a valid request: then answer it right
            assert sorted(reply.outputs()) == ["top", "y"]
            return
        assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
        reply.error()

    one()
    assert sent >= FUZZ_EXAMPLES
    assert threaded.requests_with_status("500") == 0
    assert threaded.requests_with_status("400") > FUZZ_EXAMPLES / 2
    assert_well_formed_request_succeeds(client, tiny)


def assert_well_formed_request_succeeds(client: Client, tiny: SplitModel) -> None:
    inputs = tiny_inputs(batch=2, seed=9)
    body, headers = encode_infer_request(inputs)
    reply = client.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert_outputs_match(reply.outputs(), tiny.expected(inputs))


@st.composite
def fuzzed_stream(draw: st.DrawFn) -> bytes:
    """What a broken or hostile last stage could send the gateway's sink."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["frame", "error", "garbage", "cut"]))
        frame_id = draw(st.text(alphabet=string.ascii_letters + ".-", min_size=1, max_size=20))
        if kind == "error":
            parts.append(encode_frame_bytes(FrameHeader.for_error(frame_id, "boom"), {}))
        elif kind == "garbage":
            parts.append(draw(st.binary(max_size=64)))
        else:
            frame = encode_frame_bytes(
                FrameHeader(frame_id), {"y": np.zeros((1, 4), np.float32)}
            )
            parts.append(frame if kind == "frame" else frame[: draw(st.integers(0, len(frame)))])
    return b"".join(parts)


def test_fuzzed_result_streams_never_hurt_the_gateway(
    threaded: ThreadedPipeline, client: Client, tiny: SplitModel
) -> None:
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(fuzzed_stream())
    def one(stream: bytes) -> None:
        reply = client.request(
            "POST", STREAM_PATH, stream,
            {"Authorization": f"Bearer {threaded.token}",
             "Content-Type": "application/octet-stream"},
        )
        assert reply.status == 200
        for line in reply.body.splitlines():
            ack = json.loads(line)
            assert set(ack) <= {"id", "ok", "error"} and isinstance(ack["ok"], bool)

    one()
    assert_well_formed_request_succeeds(client, tiny)
