"""Several gateway replicas sharing one set of stages: each result goes back to the replica
that holds its request (the frame's ``reply_to``), never wherever the last stage's
``--downstream`` leads.

In the scenarios with real gateway processes the last stage's ``--downstream`` is the
first replica: what a Service gives a last stage whose one long-lived link landed on
that replica. Results that followed ``--downstream`` would all reach it, so every
request through the other replica would time out. The stages run in this process, so
that the scenarios can also look at what they hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeweave.worker.frames import FrameHeader, encode_frame_bytes
from edgeweave.worker.gateway import GatewayConfig, GatewayConfigError, start_gateway
from edgeweave.worker.link import SINK_ROLE, LinkPool
from edgeweave.worker.protocol import (
    HEADER_LENGTH,
    ModelMetadata,
    TensorSpec,
    decode_infer_response,
    encode_infer_request,
)
from edgeweave.worker.stage import RunningStage, StageConfig, start_stage

pytest.importorskip("onnxruntime")

MODEL = "affine"
GATEWAY_COMMAND = (sys.executable, "-m", "edgeweave", "gateway")
HANG_GUARD_S = 60.0
"""Client-side timeout: only a hung gateway reaches it, never a slow machine."""


# --------------------------------------------------------------------------- the model
def _shard(path: Path, op: str, source: str, target: str, constant: float) -> Path:
    """``target = source <op> constant`` over float32 ``[N, 4]``."""
    graph = helper.make_graph(
        [helper.make_node(op, [source, "c"], [target], name=op.lower())],
        op.lower(),
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(target, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("c", TensorProto.FLOAT, [1], [constant])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@dataclass(frozen=True)
class Affine:
    """``y = 2 x + 1`` in two shards (``h = 2 x``, ``y = h + 1``) and its v2 metadata."""

    shards: tuple[Path, Path]
    metadata_path: Path

    @staticmethod
    def expected(x: np.ndarray) -> np.ndarray:
        return x * np.float32(2) + np.float32(1)


@pytest.fixture(scope="module")
def affine(tmp_path_factory: pytest.TempPathFactory) -> Affine:
    folder = tmp_path_factory.mktemp("affine")
    metadata = ModelMetadata(
        name=MODEL,
        inputs=[TensorSpec("x", "FP32", (-1, 4))],
        outputs=[TensorSpec("y", "FP32", (-1, 4))],
    )
    metadata_path = folder / "affine.json"
    metadata_path.write_text(json.dumps(metadata.to_dict()))
    return Affine(
        (_shard(folder / "s0.onnx", "Mul", "x", "h", 2.0),
         _shard(folder / "s1.onnx", "Add", "h", "y", 1.0)),
        metadata_path,
    )


def _x(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4)).astype(np.float32)


# --------------------------------------------------------------------------- clients
@dataclass
class Answer:
    status: int
    y: np.ndarray | None
    body: bytes


async def infer(session: aiohttp.ClientSession, url: str, x: np.ndarray) -> Answer:
    body, headers = encode_infer_request({"x": x})
    async with session.post(
        f"{url}/v2/models/{MODEL}/infer", data=body, headers=headers,
        timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S),
    ) as response:
        payload = await response.read()
        if response.status != 200:
            return Answer(response.status, None, payload)
        outputs = decode_infer_response(payload, response.headers.get(HEADER_LENGTH)).outputs
        return Answer(200, outputs["y"], payload)


async def wait_ready(dp: types.ModuleType, url: str) -> None:
    async def ready() -> bool:
        return (await dp.http_status(f"{url}/v2/health/ready")) == 200

    await dp.wait_until(ready, f"the gateway at {url} to be ready")


# --------------------------------------------------------------------------- processes
@dataclass
class GatewayReplica:
    """One ``edgeweave gateway`` process on a port chosen up front, advertising itself."""

    name: str
    port: int
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, affine: Affine, token_file: Path, stage0: str, *extra: str) -> None:
        args = [
            "--model-name", MODEL, "--metadata", str(affine.metadata_path),
            "--listen", f"127.0.0.1:{self.port}", "--advertise-url", self.url,
            "--stage0", stage0, "--token-file", str(token_file), *extra,
        ]
        with (self.log_dir / f"{self.name}.out").open("wb") as out, (
            self.log_dir / f"{self.name}.err"
        ).open("wb") as err:
            self.process = subprocess.Popen(
                [*GATEWAY_COMMAND, *args], stdout=out, stderr=err, env=dict(os.environ)
            )

    def kill(self) -> None:
        """SIGKILL: no goodbye to the stages, as when its node loses power."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[GatewayReplica]]:
    started: list[GatewayReplica] = []
    try:
        yield started
    finally:
        for replica in started:
            replica.kill()


@dataclass
class SharedStages:
    """Two gateway replicas in front of one stage 0 and one last stage."""

    gateways: list[GatewayReplica]
    stages: list[RunningStage] = field(default_factory=list)


@contextlib.asynccontextmanager
async def two_gateways(
    affine: Affine, replicas: list[GatewayReplica], token: str, token_file: Path,
    tmp_path: Path, dp: types.ModuleType, **stage_config: Any,
) -> AsyncIterator[SharedStages]:
    stage0_port = dp.free_port()
    stage0 = f"http://127.0.0.1:{stage0_port}"
    gateways = [GatewayReplica(name, dp.free_port(), tmp_path) for name in ("gw-a", "gw-b")]
    for gateway in gateways:
        gateway.start(affine, token_file, stage0, "--timeout-s", "10")
        replicas.append(gateway)
    shared = SharedStages(gateways)
    try:
        last = await start_stage(StageConfig(
            shard=str(affine.shards[1]), downstream=(gateways[0].url,), token=token,
            name="s1", **stage_config,
        ))
        shared.stages.append(last)
        first = await start_stage(StageConfig(
            shard=str(affine.shards[0]), downstream=(last.url,), token=token, name="s0",
            **stage_config,
        ), port=stage0_port)
        shared.stages.insert(0, first)
        for gateway in gateways:
            await wait_ready(dp, gateway.url)
        yield shared
    finally:
        for stage in shared.stages:
            await stage.stop()


async def stages_hold_nothing(stages: list[RunningStage], dp: types.ModuleType) -> bool:
    """What an operator sees on /metrics: no frame held, none waiting for an ack."""
    for stage in stages:
        samples = await dp.scrape(stage.url)
        for name in ("edgeweave_frames_held", "edgeweave_link_outstanding"):
            if dp.metric(samples, name) != 0:
                return False
    return True


# =========================================================================== scenarios
def test_a_request_entering_either_gateway_replica_is_answered_by_that_replica(
    affine: Affine, replicas: list[GatewayReplica], token: str, token_file: Path,
    tmp_path: Path, dp: types.ModuleType,
) -> None:
    per_replica = 30

    async def scenario() -> None:
        async with two_gateways(
            affine, replicas, token, token_file, tmp_path, dp
        ) as shared, aiohttp.ClientSession() as session:
            inputs = {
                gateway.url: [_x(seed) for seed in range(index * 100, index * 100 + per_replica)]
                for index, gateway in enumerate(shared.gateways)
            }
            # Both replicas at once, so that results for both are in the stages together.
            together = await asyncio.gather(
                *(infer(session, url, x) for url, xs in inputs.items() for x in xs)
            )
            answers = {url: together[i * per_replica:(i + 1) * per_replica]
                       for i, url in enumerate(inputs)}
            for url, xs in inputs.items():
                for x, answer in zip(xs, answers[url], strict=True):
                    assert answer.status == 200, (url, answer.body[:300])
                    assert answer.y is not None
                    np.testing.assert_allclose(answer.y, affine.expected(x), rtol=1e-6)
            last = shared.stages[1]
            samples = await dp.scrape(last.url)
            assert dp.metric(samples, "edgeweave_reply_targets") == 2
            for gateway in shared.gateways:
                served = await dp.scrape(gateway.url)
                ok = dp.metric(served, "edgeweave_gateway_requests_total", code="200")
                assert ok >= per_replica, gateway.name

    asyncio.run(scenario())


@pytest.mark.parametrize("victim", [0, 1], ids=["the-last-stages-downstream", "the-other"])
def test_killing_one_gateway_replica_under_load_leaves_the_other_serving_and_nothing_held(
    affine: Affine, replicas: list[GatewayReplica], token: str, token_file: Path,
    tmp_path: Path, dp: types.ModuleType, victim: int,
) -> None:
    concurrency, before_kill, after_kill = 4, 20, 60

    async def scenario() -> None:
        async with two_gateways(
            affine, replicas, token, token_file, tmp_path, dp,
            reply_idle_s=1.0, reply_max_wait_s=1.0,
        ) as shared, aiohttp.ClientSession() as session:
            doomed, survivor = shared.gateways[victim], shared.gateways[1 - victim]
            answers: dict[str, list[tuple[bool, Answer]]] = {doomed.url: [], survivor.url: []}
            killed = asyncio.Event()
            enough = asyncio.Event()

            async def client(url: str, seed: int) -> None:
                while not enough.is_set():
                    x = _x(seed)
                    seed += 1000
                    try:
                        answer = await infer(session, url, x)
                    except (aiohttp.ClientError, OSError):
                        assert url == doomed.url and killed.is_set(), "the survivor failed"
                        return
                    answers[url].append((killed.is_set(), answer))
                    if answer.status == 200:
                        assert answer.y is not None
                        np.testing.assert_allclose(answer.y, affine.expected(x), rtol=1e-6)
                    if url == doomed.url and killed.is_set():
                        return

            async def conductor() -> None:
                await dp.wait_until(
                    lambda: min(len(a) for a in answers.values()) >= before_kill,
                    "answers from both replicas",
                )
                doomed.kill()
                killed.set()
                await dp.wait_until(
                    lambda: sum(after for after, _ in answers[survivor.url]) >= after_kill,
                    "answers from the survivor after the kill",
                )
                enough.set()

            await asyncio.gather(
                conductor(),
                *(client(g.url, seed) for g in shared.gateways for seed in range(concurrency)),
            )
            failed = [a.body[:200] for _, a in answers[survivor.url] if a.status != 200]
            assert not failed, failed
            assert all(a.status == 200 for after, a in answers[doomed.url] if not after)

            # Whatever was on its way to the dead replica is dropped, acked upstream as
            # failed, and its link closed once idle: the stages hold nothing for it.
            await dp.wait_until(lambda: stages_hold_nothing(shared.stages, dp),
                                "the stages to hold nothing")
            last = shared.stages[1]
            await dp.wait_until(lambda: doomed.url not in last.worker.replies.targets,
                                "the dead replica's result link to close")
            fresh = await infer(session, survivor.url, _x(7))
            assert fresh.status == 200, fresh.body[:300]

    asyncio.run(scenario())


# =========================================================================== one stage
async def _frames_through(
    stage: RunningStage, token: str, dp: types.ModuleType, frames: Mapping[str, bytes]
) -> dict[str, Any]:
    """Send raw frames to ``stage``; how each one's trip ended (its delivery)."""
    pool = LinkPool([stage.url], token)
    try:
        await stage.worker.wait_loaded()
        futures = {key: await pool.send(key, [data]) for key, data in frames.items()}
        return {key: await asyncio.wait_for(f, HANG_GUARD_S) for key, f in futures.items()}
    finally:
        await pool.close()


def _raw(header: Mapping[str, Any], x: np.ndarray, name: str = "x") -> bytes:
    """A frame whose header is written by hand, so that ``reply_to`` can be anything."""
    document = {"deadline": None, "kind": "data",
                "tensors": [{"name": name, "dtype": "float32", "shape": list(x.shape)}],
                **header}
    text = json.dumps(document, separators=(",", ":")).encode()
    text += b" " * (-(16 + len(text)) % 8)
    payload = x.astype("<f4").tobytes() + bytes(-x.nbytes % 8)
    prefix = b"EWF\x01" + len(text).to_bytes(4, "little") + len(payload).to_bytes(8, "little")
    return prefix + text + payload


@pytest.mark.parametrize("reply_to", [
    "ftp://10.0.0.1:8080", "http://10.0.0.1:8080/v1/stream", "http://token:leak@10.0.0.1:8080",
    "http://" + "g" * 300 + ":8080", 8080, "",
], ids=["scheme", "path", "credentials", "too-long", "not-a-string", "empty"])
def test_a_bad_reply_to_is_a_refused_frame_and_the_stage_serves_on(
    affine: Affine, token: str, dp: types.ModuleType, reply_to: Any
) -> None:
    good_reply_to = "http://10.0.0.1:8080"

    async def scenario() -> None:
        sink = await dp.Sink(token).start()
        stage = await start_stage(StageConfig(
            shard=str(affine.shards[0]), downstream=(sink.url,), token=token, name="s0"))
        try:
            deliveries = await _frames_through(stage, token, dp, {
                "bad": _raw({"id": "bad", "reply_to": reply_to}, _x(1)),
                "good": _raw({"id": "good", "reply_to": good_reply_to}, _x(2)),
            })
            await sink.wait_for(2)
        finally:
            await stage.stop()
            await sink.stop()
        assert not deliveries["bad"].ok and "'reply_to'" in (deliveries["bad"].error or "")
        refused = sink.results["bad"].header
        assert (refused.kind, refused.category, refused.reply_to) == (
            "error", "invalid_input", None)
        assert deliveries["good"].ok
        # Not the last stage (its downstream is no gateway): reply_to travels on with the
        # result, and the result goes downstream.
        passed = sink.results["good"]
        assert passed.header.reply_to == good_reply_to
        np.testing.assert_allclose(passed.tensors["h"], _x(2) * 2)

    asyncio.run(scenario())


def test_the_last_stage_caps_its_reply_targets_and_drops_results_for_a_dead_one(
    affine: Affine, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        service = await dp.Sink(token, role=SINK_ROLE).start()
        replica = await dp.Sink(token, role=SINK_ROLE).start()
        another = await dp.Sink(token, role=SINK_ROLE).start()
        dead = f"http://127.0.0.1:{dp.free_port()}"
        stage = await start_stage(StageConfig(
            shard=str(affine.shards[1]), downstream=(service.url,), token=token, name="s1",
            max_reply_targets=1, reply_idle_s=0.5, reply_max_wait_s=0.5,
        ))
        deadline = time.time() + 60
        try:
            first = await _frames_through(stage, token, dp, {
                "mine": encode_frame_bytes(
                    FrameHeader("mine", deadline, reply_to=replica.url), {"h": _x(1)}),
                "beyond-the-cap": encode_frame_bytes(
                    FrameHeader("beyond-the-cap", deadline, reply_to=another.url),
                    {"h": _x(2)}),
            })
            assert first["mine"].ok and list(replica.results) == ["mine"]
            np.testing.assert_allclose(replica.results["mine"].tensors["y"], _x(1) + 1)
            # Refused with a reason the gateway turns into 503, at the default downstream.
            assert not first["beyond-the-cap"].ok
            refused = service.results["beyond-the-cap"].header
            assert (refused.kind, refused.category) == ("error", "overloaded")
            assert "gateway replicas" in (refused.error or "") and not another.results

            await dp.wait_until(lambda: stage.worker.replies.targets == [],
                                "the idle reply link to close")
            lost = await _frames_through(stage, token, dp, {
                "orphan": encode_frame_bytes(
                    FrameHeader("orphan", deadline, reply_to=dead), {"h": _x(3)}),
            })
            assert not lost["orphan"].ok
            assert "no live downstream link" in (lost["orphan"].error or "")
            assert "orphan" not in service.results  # never to a replica that did not ask
            await dp.wait_until(lambda: stages_hold_nothing([stage], dp), "nothing held")
            await dp.wait_until(lambda: stage.worker.replies.targets == [],
                                "the dead replica's link to close")
        finally:
            await stage.stop()
            for sink in (service, replica, another):
                await sink.stop()

    asyncio.run(scenario())


def test_receivers_from_before_the_optional_fields_never_see_them(
    affine: Affine, token: str, dp: types.ModuleType
) -> None:
    """A stage sends an older downstream results without reply_to and errors without a
    category; a gateway names itself only to a stage 0 that reads reply_to."""

    async def scenario() -> None:
        old = await dp.Sink(token, announce=False).start()
        stage = await start_stage(StageConfig(
            shard=str(affine.shards[0]), downstream=(old.url,), token=token, name="s0"))
        try:
            deliveries = await _frames_through(stage, token, dp, {
                "result": encode_frame_bytes(
                    FrameHeader("result", reply_to="http://10.0.0.1:8080"), {"x": _x(1)}),
                "refused": encode_frame_bytes(
                    FrameHeader("refused", reply_to="http://10.0.0.1:8080"), {"z": _x(1)}),
            })
            await old.wait_for(2)
        finally:
            await stage.stop()
            await old.stop()
        assert deliveries["result"].ok and not deliveries["refused"].ok
        for frame in old.results.values():
            assert (frame.header.reply_to, frame.header.category) == (None, None), frame

        metadata = ModelMetadata(name=MODEL, inputs=[TensorSpec("x", "FP32", (-1, 4))],
                                 outputs=[TensorSpec("y", "FP32", (-1, 4))])
        for announce, expected in ((False, None), (True, "http://127.0.0.1:1")):
            stage0 = await dp.Sink(token, announce=announce).start()
            gateway = await start_gateway(GatewayConfig(
                metadata=metadata, stage0_urls=(stage0.url,), token=token,
                advertise_url="http://127.0.0.1:1", timeout_s=5.0,
            ))
            try:
                await stage0.wait_for(1)  # the gateway's probe
            finally:
                await gateway.stop()
                await stage0.stop()
            assert {f.header.reply_to for f in stage0.results.values()} == {expected}

    asyncio.run(scenario())


def test_a_gateway_refuses_an_advertise_url_a_stage_would_refuse() -> None:
    metadata = ModelMetadata(name=MODEL, inputs=[TensorSpec("x", "FP32", (-1, 4))],
                             outputs=[TensorSpec("y", "FP32", (-1, 4))])
    for url in ("10.0.0.1:8080", "http://10.0.0.1:8080/v1/stream", "http://a:b@gw:1"):
        with pytest.raises(GatewayConfigError, match="--advertise-url"):
            GatewayConfig(metadata=metadata, stage0_urls=("http://s0:9000",), token="t",
                          advertise_url=url)
