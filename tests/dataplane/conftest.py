"""Data-plane test helpers: tokens, small models, result sinks and real worker processes.

Tests are plain functions that run one ``asyncio.run(...)`` scenario each (no asyncio
plugin needed). Worker processes are started as users start them, with
``python -m edgeweave worker ...``, each on port 0; the port is read from the line the
worker prints. Every process a test starts is killed when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import onnx
import pytest
from aiohttp import web
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from edgeweave.worker.frames import Frame
from edgeweave.worker.link import FIELDS_HEADER, STREAM_PATH, Ack, StreamReceiver

T = TypeVar("T")
WORKER_COMMAND = (sys.executable, "-m", "edgeweave", "worker")
STARTUP_TIMEOUT_S = 60.0
"""Generous: two cores are shared by every engineer's tests. Only a hang hits it."""
WAIT_TIMEOUT_S = 120.0


# --------------------------------------------------------------------- basics
# Captured at import: every tier's conftest is a module named "conftest", so by the time a
# test runs, sys.modules["conftest"] may be another tier's.
_THIS_MODULE = sys.modules[__name__]


@pytest.fixture(scope="session")
def dp() -> types.ModuleType:
    """This module, so that tests reach its helpers (``dp.Sink``, ``dp.scrape``, ...)."""
    return _THIS_MODULE


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(predicate: object, what: str, timeout: float = WAIT_TIMEOUT_S) -> None:
    """Poll ``predicate()`` (sync or async) until true; fail naming ``what`` on a hang."""
    give_up = time.monotonic() + timeout
    while True:
        result = predicate()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


class BackgroundLoop:
    """An event loop in a thread, for servers that outlive one ``asyncio.run`` (hypothesis
    runs every example as a plain function call)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = WAIT_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# --------------------------------------------------------------------- models
def scale_model(path: Path, *, width: int = 4, factor: float = 2.0, name: str = "x") -> Path:
    """``y = x * factor`` over float32 ``[N, width]``: a shard whose batch size may vary."""
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [factor])
    graph = helper.make_graph(
        [helper.make_node("Mul", [name, "w"], ["y"], name="scale")], "scale", [x], [y], [w]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@dataclass
class ShardChain:
    """A model split into shard files, with inputs and the unsplit model's outputs."""

    paths: list[Path]
    sha256: list[str]
    inputs: list[dict[str, np.ndarray]]
    whole_outputs: list[dict[str, np.ndarray]]
    chain_outputs: list[dict[str, np.ndarray]]
    """The same shards run in this process with the worker's session options."""
    output_names: list[str]


def _whole_model_outputs(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in model.graph.output]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


@pytest.fixture(scope="session")
def resnet18_chain(tmp_path_factory: pytest.TempPathFactory) -> ShardChain:
    """zoo resnet18 cut into 3 shards at the planner's piece boundaries, 4 inputs."""
    from edgeweave import zoo
    from edgeweave.partition.source import load_model_profile
    from edgeweave.partition.split import split_by_layers
    from edgeweave.worker.stage import ShardRunner

    model = zoo.build("resnet18")
    profile = load_model_profile("zoo:resnet18").profile
    n = len(profile.layers)
    ranges = [(0, n // 3 - 1), (n // 3, 2 * n // 3 - 1), (2 * n // 3, n - 1)]
    shards = split_by_layers(model, profile, ranges)
    folder = tmp_path_factory.mktemp("resnet18-shards")
    paths = [shard.save(folder / f"stage{shard.index}.onnx") for shard in shards]
    runners = [ShardRunner(path.read_bytes()) for path in paths]
    rng = np.random.default_rng(18)
    input_name = model.graph.input[0].name
    inputs = [
        {input_name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(4)
    ]
    chain_outputs = []
    for feeds in inputs:
        tensors = dict(feeds)
        for runner in runners:
            tensors = runner.run({rule.name: tensors[rule.name] for rule in runner.inputs})
        chain_outputs.append(tensors)
    return ShardChain(
        paths=paths,
        sha256=[shard.sha256 for shard in shards],
        inputs=inputs,
        whole_outputs=[_whole_model_outputs(model, feeds) for feeds in inputs],
        chain_outputs=chain_outputs,
        output_names=[output.name for output in model.graph.output],
    )


# --------------------------------------------------------------------- sink
class Sink:
    """Stands in for the gateway's result endpoint (or any receiver): records every frame
    in arrival order (``frames``) and keeps the first one per id (``results``).

    ``pause()`` makes it stop reading its streams (``deliver`` blocks), as a stalled
    gateway would; ``resume()`` lets everything through. ``hold=True`` takes frames in
    but holds their acks until ``release()``. ``role`` is what it announces (``"sink"``:
    the gateway's); ``announce=False`` answers like a receiver from before the optional
    frame-header fields (it announces none).
    """

    def __init__(self, token: str, *, hold: bool = False, role: str | None = None,
                 announce: bool = True) -> None:
        self.token = token
        self.hold = hold
        self.announce = announce
        self.frames: list[Frame] = []
        self.held: list[Ack] = []
        self.results: dict[str, Frame] = {}
        self.duplicates = 0
        self.delivered = 0
        self._open = asyncio.Event()
        self._open.set()
        self.receiver = StreamReceiver(token, self._deliver, role=role)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> Sink:
        app = web.Application()
        app.router.add_post(STREAM_PATH, self.receiver.handle)
        if not self.announce:
            app.on_response_prepare.append(_announce_no_fields)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self.receiver.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def ids(self) -> list[str]:
        return [frame.id for frame in self.frames]

    def release(self, count: int | None = None) -> None:
        """Ack the first ``count`` held frames (all when ``None``)."""
        chosen = self.held[: count if count is not None else len(self.held)]
        del self.held[: len(chosen)]
        for ack in chosen:
            ack.ok()

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def _deliver(self, frame: Frame, ack: Ack) -> None:
        await self._open.wait()
        self.delivered += 1
        self.frames.append(frame)
        if frame.id in self.results:
            self.duplicates += 1
        else:
            self.results[frame.id] = frame
        if self.hold:
            self.held.append(ack)
        else:
            ack.ok()

    async def wait_for(self, count: int) -> None:
        await wait_until(lambda: len(self.results) >= count, f"{count} results at the sink")


async def _announce_no_fields(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall(FIELDS_HEADER, None)


# --------------------------------------------------------------------- processes
@dataclass
class WorkerProcess:
    """One ``edgeweave worker`` process; its output goes to files in the test's tmp dir."""

    args: list[str]
    log_dir: Path
    name: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.err"

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env}
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [*WORKER_COMMAND, *self.args], stdout=out, stderr=err, env=env
            )
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_listening(self) -> str:
        async def listening() -> bool:
            for line in self.stdout_path.read_text(errors="replace").splitlines():
                if " listening on " in line:
                    self.url = line.rsplit(" ", 1)[1]
                    return True
            self._check_alive()
            return False

        await wait_until(listening, f"worker {self.name} to listen", STARTUP_TIMEOUT_S)
        return self.url

    async def wait_ready(self) -> WorkerProcess:
        await self.wait_listening()

        async def ready() -> bool:
            self._check_alive()
            return (await http_status(f"{self.url}/readyz")) == 200

        await wait_until(ready, f"worker {self.name} to be ready", STARTUP_TIMEOUT_S)
        return self

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"worker {self.name} exited with {self.process.returncode}: {self.stderr()}"
            )

    def exit_code(self, timeout: float = STARTUP_TIMEOUT_S) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no goodbye to peers, as when a node loses power."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def terminate(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


class Workers:
    """Starts worker processes for one test and kills the survivors afterwards."""

    def __init__(self, log_dir: Path, token_file: Path) -> None:
        self.log_dir = log_dir
        self.token_file = token_file
        self.started: list[WorkerProcess] = []

    def spawn(
        self,
        shard: Path | str,
        downstream: Sequence[str],
        *,
        name: str,
        listen: str = "127.0.0.1:0",
        extra: Sequence[str] = (),
        token_file: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> WorkerProcess:
        args = ["--shard", str(shard), "--listen", listen, "--name", name, "--threads", "1"]
        for url in downstream:
            args += ["--downstream", url]
        if env is None or "EDGEWEAVE_TOKEN" not in env:
            args += ["--token-file", str(token_file or self.token_file)]
        worker = WorkerProcess([*args, *extra], self.log_dir, name, dict(env or {}))
        self.started.append(worker.start())
        return worker

    def kill_all(self) -> None:
        for worker in self.started:
            worker.kill()


@pytest.fixture
def workers(tmp_path: Path, token_file: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path, token_file)
    try:
        yield pool
    finally:
        pool.kill_all()


# --------------------------------------------------------------------- http
async def http_status(url: str, *, method: str = "GET", token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with aiohttp.ClientSession() as session, session.request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            return response.status
    except (aiohttp.ClientError, OSError, TimeoutError):
        return 0


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as ``{(sample name, sorted labels): value}``."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], sample: str, /,
    **labels: str,
) -> float:
    """One sample's value (0 when absent); labels may include ``name``."""
    return samples.get((sample, tuple(sorted(labels.items()))), 0.0)
