"""The gateway follows stage 0 when a re-plan moves it: ``PUT /v1/stage0`` and the route file.

Two independent one-stage pipelines share one real gateway: A multiplies by 2, B by 3,
both stream their results to the gateway. Which factor a reply carries says which
pipeline served it, so every check is on what a client gets back. The gateway and the
stages run in this process (real aiohttp servers, real onnxruntime); the command-line
checks start ``python -m edgeweave gateway`` as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest

from edgeweave.worker import gateway as gateway_module
from edgeweave.worker.gateway import (
    GatewayConfig,
    RunningGateway,
    metadata_from_onnx,
    start_gateway,
)
from edgeweave.worker.protocol import (
    HEADER_LENGTH,
    ModelMetadata,
    decode_infer_response,
    encode_infer_request,
)
from edgeweave.worker.routing import STAGE0_PATH, Stage0Route
from edgeweave.worker.stage import RunningStage, StageConfig, start_stage

pytest.importorskip("onnxruntime")

MODEL = "scale"
WIDTH = 4
FACTORS = {"A": 2.0, "B": 3.0}
GATEWAY_COMMAND = (sys.executable, "-m", "edgeweave", "gateway")
HANG_GUARD_S = 60.0
"""Client-side timeout: only a hung gateway reaches it, never a slow machine."""
FAST_POLL_S = 0.05


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Shards:
    """The two pipelines' one-stage shards and the model metadata they share."""

    paths: Mapping[str, Path]
    metadata: ModelMetadata
    metadata_path: Path


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, dp: types.ModuleType) -> Shards:
    folder = tmp_path_factory.mktemp("scale")
    paths = {
        name: dp.scale_model(folder / f"{name}.onnx", width=WIDTH, factor=factor)
        for name, factor in FACTORS.items()
    }
    metadata = metadata_from_onnx(onnx.load(paths["A"]), MODEL)
    metadata_path = folder / "scale.json"
    metadata_path.write_text(json.dumps(metadata.to_dict()))
    return Shards(paths, metadata, metadata_path)


# --------------------------------------------------------------------------- a client
@dataclass
class Client:
    """What the tests do to a gateway: infer, and show or replace its route."""

    url: str
    token: str
    session: aiohttp.ClientSession
    sent: int = 0

    async def served_by(self) -> str:
        """Send one request; which pipeline ("A" or "B") computed its answer."""
        self.sent += 1
        x = np.random.default_rng(self.sent).uniform(1.0, 2.0, (1, WIDTH)).astype(np.float32)
        body, headers = encode_infer_request({"x": x})
        async with self.session.post(
            f"{self.url}/v2/models/{MODEL}/infer", data=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S),
        ) as response:
            raw = await response.read()
            assert response.status == 200, raw[:500]
            y = decode_infer_response(raw, response.headers.get(HEADER_LENGTH))
        got = np.asarray(y.outputs["y"])
        for name, factor in FACTORS.items():
            if np.allclose(got, x * np.float32(factor), rtol=1e-6):
                return name
        raise AssertionError(f"{got} is neither pipeline's answer to {x}")

    def pipeline_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def put_route(
        self, body: bytes | Mapping[str, Any], auth: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """``PUT /v1/stage0`` with the pipeline token unless ``auth`` says otherwise."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json",
                   **(self.pipeline_auth() if auth is None else auth)}
        return await self._request("PUT", data, headers)

    async def get_route(self, auth: Mapping[str, str] | None = None) -> tuple[int, Any]:
        return await self._request("GET", None, self.pipeline_auth() if auth is None else auth)

    async def route(self) -> Stage0Route:
        status, document = await self.get_route()
        assert status == 200, document
        return Stage0Route.from_document(document, "the gateway's answer")

    async def _request(
        self, method: str, data: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url + STAGE0_PATH, data=data, headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=HANG_GUARD_S),
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text


# --------------------------------------------------------------------------- two pipelines
@dataclass
class TwoPipelines:
    gateway: RunningGateway
    stages: dict[str, RunningStage]
    client: Client

    def route_to(self, name: str, serial: int) -> Stage0Route:
        return Stage0Route(revision=name.lower(), urls=(self.stages[name].url,), serial=serial)

    async def frames_computed(self, dp: types.ModuleType, name: str) -> float:
        samples = await dp.scrape(self.stages[name].url)
        return float(dp.metric(samples, "edgeweave_frames_computed_total"))


@contextlib.asynccontextmanager
async def two_pipelines(
    shards: Shards, token: str, dp: types.ModuleType, *, serial: int = 1,
    route_file: Path | None = None, **config: Any,
) -> AsyncIterator[TwoPipelines]:
    """A gateway routed to A (revision "a", ``serial``), with B up beside it and ready.

    With ``route_file`` the gateway starts from that file and follows it, as the CLI
    does with ``--stage0-file``.
    """
    a_port = dp.free_port()
    initial = Stage0Route(revision="a", urls=(f"http://127.0.0.1:{a_port}",), serial=serial)
    if route_file is not None:
        write_route_file(route_file, initial.to_json())
    gateway = await start_gateway(GatewayConfig(
        metadata=shards.metadata, stage0_urls=initial.urls, stage0_revision=initial.revision,
        stage0_serial=initial.serial, stage0_file=route_file, token=token, **config,
    ))
    stages: dict[str, RunningStage] = {}
    try:
        for name, port in (("A", a_port), ("B", 0)):
            stages[name] = await start_stage(
                StageConfig(shard=str(shards.paths[name]), downstream=(gateway.url,),
                            token=token, name=name),
                port=port,
            )
        async with aiohttp.ClientSession() as session:
            await wait_ready(dp, session, gateway.url, stages["B"].url)
            yield TwoPipelines(gateway, stages, Client(gateway.url, token, session))
    finally:
        await gateway.stop()
        for stage in stages.values():
            await stage.stop()


async def wait_ready(
    dp: types.ModuleType, session: aiohttp.ClientSession, gateway_url: str, spare_url: str
) -> None:
    """The gateway has made a round trip through A, and B has loaded its shard."""

    async def answers_200(url: str) -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as response:
                return response.status == 200
        return False

    await dp.wait_until(lambda: answers_200(f"{gateway_url}/v2/health/ready"),
                        "the gateway to be ready")
    await dp.wait_until(lambda: answers_200(f"{spare_url}/readyz"), "pipeline B to be ready")


def write_route_file(path: Path, text: str) -> None:
    """Replace the file at once, as kubelet swaps a ConfigMap volume's contents."""
    staged = path.with_name(f".{path.name}.new")
    staged.write_text(text)
    os.replace(staged, path)


# =========================================================================== PUT /v1/stage0
def test_a_pushed_route_moves_requests_to_the_other_pipeline_without_a_restart(
    shards: Shards, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with two_pipelines(shards, token, dp) as pipes:
            client = pipes.client
            assert [await client.served_by() for _ in range(3)] == ["A"] * 3
            assert await client.route() == pipes.route_to("A", 1)

            to_b = pipes.route_to("B", 2)
            status, answer = await client.put_route(to_b.to_document())
            assert (status, answer) == (200, to_b.to_document())
            assert await client.route() == to_b

            a_frames = await pipes.frames_computed(dp, "A")
            assert [await client.served_by() for _ in range(5)] == ["B"] * 5
            assert await pipes.frames_computed(dp, "A") == a_frames  # A saw none of them

            await pipes.stages["A"].stop()
            assert [await client.served_by() for _ in range(3)] == ["B"] * 3

    asyncio.run(scenario())


def test_showing_or_replacing_the_route_needs_the_pipeline_token(
    shards: Shards, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with two_pipelines(shards, token, dp) as pipes:
            client = pipes.client
            refused: list[dict[str, str]] = [
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "Bearer "},
                {"Authorization": f"Bearer {token}x"},
                {"Authorization": f"Basic {token}"},
                {"Authorization": token},
            ]
            for auth in refused:
                status, _ = await client.put_route(pipes.route_to("B", 9).to_document(), auth)
                assert status == 401, auth
                assert (await client.get_route(auth))[0] == 401, auth
            assert await client.route() == pipes.route_to("A", 1)
            assert await client.served_by() == "A"

    asyncio.run(scenario())


def test_a_malformed_route_is_a_400_naming_the_problem_and_changes_nothing(
    shards: Shards, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with two_pipelines(shards, token, dp) as pipes:
            client = pipes.client
            b_url = pipes.stages["B"].url
            cases: list[tuple[bytes | dict[str, Any], str]] = [
                (b"{not json", "is not JSON"),
                (b"", "is not JSON"),
                (json.dumps([b_url]).encode(), "must be a JSON object"),
                ({"revision": "b", "serial": 9}, '"urls" must be a non-empty list'),
                ({"revision": "b", "urls": [], "serial": 9}, '"urls" must be a non-empty list'),
                ({"revision": "b", "urls": [b_url, "ftp://x"], "serial": 9},
                 "'ftp://x' is not an http(s) base URL"),
                ({"revision": "b", "urls": [b_url], "serial": -1}, '"serial" must be'),
                ({"revision": "b", "urls": [b_url], "serial": True}, '"serial" must be'),
                ({"revision": 2, "urls": [b_url], "serial": 9}, '"revision" must be a string'),
            ]
            for body, reason in cases:
                status, answer = await client.put_route(body)
                assert status == 400, (body, answer)
                assert answer["error"].startswith("the request body"), answer
                assert reason in answer["error"], answer
            assert await client.route() == pipes.route_to("A", 1)
            assert await client.served_by() == "A"

    asyncio.run(scenario())


def test_an_older_route_is_answered_with_the_newer_one_the_gateway_keeps(
    shards: Shards, token: str, dp: types.ModuleType
) -> None:
    async def scenario() -> None:
        async with two_pipelines(shards, token, dp, serial=5) as pipes:
            client = pipes.client
            held = pipes.route_to("A", 5)
            status, answer = await client.put_route(pipes.route_to("B", 4).to_document())
            assert (status, answer) == (200, held.to_document())
            assert await client.served_by() == "A"

            # A push for B wins; then a late push of the older route to A must not undo it.
            newer = pipes.route_to("B", 6)
            assert await client.put_route(newer.to_document()) == (
                200, newer.to_document())
            status, answer = await client.put_route(held.to_document())
            assert (status, answer) == (200, newer.to_document())
            assert await client.served_by() == "B"

    asyncio.run(scenario())


# =========================================================================== the route file
def test_a_gateway_follows_its_route_file_and_serves_on_through_bad_rewrites(
    shards: Shards, token: str, dp: types.ModuleType, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    route_file = tmp_path / "route.json"
    caplog.set_level(logging.WARNING, logger="edgeweave.gateway")

    def warned(fragment: str) -> bool:
        return any(fragment in record.getMessage() for record in caplog.records)

    async def scenario() -> None:
        async with two_pipelines(
            shards, token, dp, route_file=route_file, stage0_file_poll_s=FAST_POLL_S
        ) as pipes:
            client = pipes.client
            assert await client.served_by() == "A"

            to_b = pipes.route_to("B", 2)
            write_route_file(route_file, to_b.to_json())
            await dp.wait_until(lambda: routed_to(client, to_b), "the gateway to read B's route")
            assert await client.served_by() == "B"

            write_route_file(route_file, "{half a documen")
            await dp.wait_until(lambda: warned("is not JSON"), "a warning about the bad file")
            assert await client.route() == to_b
            assert await client.served_by() == "B"

            route_file.unlink()
            await dp.wait_until(lambda: warned("cannot read --stage0-file"),
                                "a warning about the missing file")
            assert await client.route() == to_b
            assert await client.served_by() == "B"

            back_to_a = pipes.route_to("A", 3)
            write_route_file(route_file, back_to_a.to_json())
            await dp.wait_until(lambda: routed_to(client, back_to_a), "the route back to A")
            assert await client.served_by() == "A"

    asyncio.run(scenario())
    assert warned(str(route_file))


def test_a_pushed_route_outranks_an_older_route_file(
    shards: Shards, token: str, dp: types.ModuleType, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The push after a node loss arrives before kubelet refreshes the file: the stale
    file read meanwhile must not send requests back to the lost stage 0."""
    route_file = tmp_path / "route.json"
    read: list[Stage0Route] = []

    def recording_read(path: Path) -> Stage0Route:
        route = real_read(path)
        read.append(route)
        return route

    real_read = gateway_module.read_route_file
    monkeypatch.setattr(gateway_module, "read_route_file", recording_read)

    async def scenario() -> None:
        async with two_pipelines(
            shards, token, dp, route_file=route_file, stage0_file_poll_s=FAST_POLL_S
        ) as pipes:
            client = pipes.client
            pushed = pipes.route_to("B", 2)
            assert await client.put_route(pushed.to_document()) == (200, pushed.to_document())
            stale = pipes.route_to("A", 1)
            read.clear()
            await dp.wait_until(lambda: stale in read, "a poll to read the stale route file")
            assert await client.route() == pushed
            assert await client.served_by() == "B"

    asyncio.run(scenario())


async def routed_to(client: Client, route: Stage0Route) -> bool:
    return await client.route() == route


# =========================================================================== the command
def gateway_argv(shards: Shards, tmp_path: Path, *stage0: str) -> list[str]:
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    return [
        *GATEWAY_COMMAND, "--model-name", MODEL, "--metadata", str(shards.metadata_path),
        "--listen", "127.0.0.1:0", "--token-file", str(token_file), *stage0,
    ]


@pytest.mark.parametrize(
    "stage0",
    [
        ("--stage0", "http://127.0.0.1:9", "--stage0-file", "route.json"),
        (),
    ],
    ids=["both", "neither"],
)
def test_the_gateway_command_wants_stage0_one_way_and_says_so_in_one_line(
    shards: Shards, tmp_path: Path, stage0: tuple[str, ...]
) -> None:
    (tmp_path / "route.json").write_text(
        json.dumps({"revision": "a", "urls": ["http://127.0.0.1:9"], "serial": 1}))
    result = subprocess.run(
        gateway_argv(shards, tmp_path, *stage0), capture_output=True, text=True, timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--stage0 " in lines[0] and "--stage0-file" in lines[0], lines


def test_the_gateway_command_names_a_route_file_it_cannot_use(
    shards: Shards, tmp_path: Path
) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"urls": []}))
    for name, reason in (("missing.json", "cannot read --stage0-file"),
                         ("bad.json", '"urls" must be a non-empty list')):
        path = tmp_path / name
        result = subprocess.run(
            gateway_argv(shards, tmp_path, "--stage0-file", str(path)),
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0] and str(path) in lines[0], lines


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    log_dir: Path

    def output(self, stream: str) -> str:
        return (self.log_dir / f"gateway.{stream}").read_text(errors="replace")

    def listening_url(self) -> str | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the gateway exited: {self.output('err')}")
        for line in self.output("out").splitlines():
            if " listening on " in line:
                return line.rsplit(" ", 1)[1]
        return None


@pytest.fixture
def gateway_processes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for gateway in started:
            if gateway.process.poll() is None:
                gateway.process.kill()
                gateway.process.wait(10)


def test_the_gateway_command_starts_from_its_route_file_and_follows_it(
    shards: Shards, token: str, token_file: Path, dp: types.ModuleType, tmp_path: Path,
    gateway_processes: list[GatewayProcess],
) -> None:
    route_file = tmp_path / "route.json"
    a_port = dp.free_port()
    start = Stage0Route(revision="a", urls=(f"http://127.0.0.1:{a_port}",), serial=4)
    write_route_file(route_file, start.to_json())
    argv = [
        *GATEWAY_COMMAND, "--model-name", MODEL, "--metadata", str(shards.metadata_path),
        "--listen", "127.0.0.1:0", "--token-file", str(token_file),
        "--stage0-file", str(route_file),
    ]
    with (tmp_path / "gateway.out").open("wb") as out, (tmp_path / "gateway.err").open(
        "wb"
    ) as err:
        gateway = GatewayProcess(subprocess.Popen(argv, stdout=out, stderr=err), tmp_path)
    gateway_processes.append(gateway)

    async def scenario() -> None:
        await dp.wait_until(lambda: gateway.listening_url() is not None,
                            "the gateway to listen", dp.STARTUP_TIMEOUT_S)
        url = gateway.listening_url()
        assert url is not None
        stages: dict[str, RunningStage] = {}
        try:
            for name, port in (("A", a_port), ("B", 0)):
                stages[name] = await start_stage(
                    StageConfig(shard=str(shards.paths[name]), downstream=(url,), token=token,
                                name=name),
                    port=port,
                )
            async with aiohttp.ClientSession() as session:
                await wait_ready(dp, session, url, stages["B"].url)
                client = Client(url, token, session)
                assert await client.route() == start  # revision and serial from the file
                assert await client.served_by() == "A"

                to_b = Stage0Route(revision="b", urls=(stages["B"].url,), serial=5)
                write_route_file(route_file, to_b.to_json())
                await dp.wait_until(lambda: routed_to(client, to_b),
                                    "the gateway process to read B's route")
                assert await client.served_by() == "B"
        finally:
            for stage in stages.values():
                await stage.stop()

    asyncio.run(scenario())
