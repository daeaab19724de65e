"""``edgeweave run``: a whole pipeline as local processes on this one machine.

:class:`LocalPipeline` does what the operator does in a cluster, with processes in
place of pods: it reads the same ``InferencePipeline`` manifest and Node objects,
resolves and profiles the model (:mod:`edgeweave.modelstore`), plans, splits, and
starts one ``edgeweave worker`` process per planned replica and one ``edgeweave
gateway``. It then watches them until asked to stop.

Why it is built this way:

- **Children are started last stage first.** Each worker binds port 0 and prints the
  URL it got, so there are no port races, and every worker's downstream URLs are
  known when it starts: the last stage streams to the gateway (whose port is the
  user's), stage ``k`` to the replicas of stage ``k+1``, and the gateway sends to
  stage 0's replicas. Links reconnect with backoff, so nobody needs its peer up yet.
- **No orphans.** Every child runs in a session (process group) of its own, so a
  Ctrl-C in the terminal reaches only this process, which then stops the children in
  order: SIGTERM to each group, a grace period, SIGKILL to whatever is left. Each
  child also asks for ``PR_SET_PDEATHSIG`` (SIGKILL; see parent.py), so a runner killed with
  SIGKILL takes its pipeline down with it. Startup failures stop what was started.
- **Nothing restarts silently.** A replica that dies while its stage has another
  one is reported and the pipeline serves on, degraded; a stage without any replica
  left, or a dead gateway, ends the run with an error naming the process and its log.
- **Threads follow the node.** Each worker gets as many onnxruntime threads as its
  node's ``status.allocatable.cpu`` (rounded, at least one, and at most this
  machine's cores: more threads than cores only adds contention).
- **--emulate** holds each used node to its CPU share (cgroup quota) and its link to
  its bandwidth (a network namespace with a shaped veth), via
  :class:`~edgeweave.local.emulate.EdgeEmulator`. Workers listen on their node's
  address; the gateway stays on the host and listens on all interfaces so that both
  the nodes (at the emulator's host address) and local clients (127.0.0.1) reach it.

Run directory layout (kept when given with ``--run-dir``, else a temporary directory
removed after a clean stop and kept after a failure)::

    token            the pipeline's bearer token (mode 0600)
    metadata.json    the model's Open Inference Protocol metadata (gateway input)
    plan.json        the plan (DESIGN §6 JSON) and the shards it was cut into
    shards/          stage-<i>.onnx, links into the model store's content-addressed cache
    logs/<name>.log  each process's stdout and stderr
    run.json         endpoint, model and every process (pid, url, node, log)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edgeweave.errors import EdgeweaveError
from edgeweave.local.parent import PARENT_PID_ENV
from edgeweave.partition.calibrate import LayerCosts

if TYPE_CHECKING:
    from edgeweave.api.v1alpha1 import InferencePipeline
    from edgeweave.local.emulate import EdgeEmulator
    from edgeweave.modelstore import ModelStore, StoredModel, StoredShard
    from edgeweave.partition.costmodel import Node, Plan
    from edgeweave.partition.nodes import Inventory
    from edgeweave.partition.source import ProfiledModel

DEFAULT_STARTUP_TIMEOUT_S: Final = 300.0
"""Generous: a large model's shards load slowly on a busy 2-core machine."""
STOP_GRACE_S: Final = 10.0
POLL_INTERVAL_S: Final = 0.2
HTTP_PROBE_TIMEOUT_S: Final = 2.0
LOG_TAIL_LINES: Final = 12
LISTENING_MARKER: Final = " listening on "
GATEWAY_PATH_READY: Final = "/v2/health/ready"
STAGE_PATH_READY: Final = "/readyz"
CACHE_ENV: Final = "EDGEWEAVE_CACHE_DIR"


class RunError(EdgeweaveError):
    """``edgeweave run`` cannot start or keep the pipeline running; says what to fix."""


class PortInUseError(RunError):
    """The gateway's port is taken."""


class ProcessFailure(RunError):
    """A failure of one of the pipeline's processes; ``log_tail`` holds its last log lines,
    which ``edgeweave run`` prints under the error."""

    def __init__(self, message: str, log_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.log_tail = list(log_tail)


class StartupError(ProcessFailure):
    """A process failed to start or to become ready."""


class PipelineDown(ProcessFailure):
    """The running pipeline lost its gateway or every replica of a stage."""


class StopRequested(RunError):
    """A stop (Ctrl-C, SIGTERM) arrived while the pipeline was starting."""

    def __init__(self) -> None:
        super().__init__("stopped before the pipeline was ready")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RunManifests:
    """What the ``-f`` files hold: exactly one pipeline, and the nodes to plan on."""

    pipeline: InferencePipeline
    inventory: Inventory
    files: tuple[Path, ...]

    @property
    def name(self) -> str:
        return self.pipeline.metadata.name


def read_manifests(files: Sequence[Path]) -> RunManifests:
    """One ``InferencePipeline`` and the Node objects from ``files`` (any mix, any order).

    The pipeline's ``nodeSelector`` picks the nodes, as in a cluster; NotReady and
    cordoned nodes are left out.
    """
    from edgeweave.api import load_pipeline_file
    from edgeweave.partition.nodes import (
        NodeInventoryError,
        inventory_from_objects,
        node_objects_from_yaml,
    )

    if not files:
        raise RunError("give the pipeline and its nodes with -f PIPELINE.yaml -f NODES.yaml")
    pipelines: list[tuple[Path, InferencePipeline]] = []
    node_objects: list[Any] = []
    for path in files:
        found = load_pipeline_file(path)
        pipelines += [(path, pipeline) for pipeline in found]
        try:
            node_objects += node_objects_from_yaml(path.read_text(encoding="utf-8"), str(path))
        except NodeInventoryError as error:
            if not found:
                raise RunError(
                    f"{path} holds neither an InferencePipeline nor Node objects ({error})"
                ) from None
    names = ", ".join(str(path) for path in files)
    if not pipelines:
        raise RunError(f"no InferencePipeline in {names}: add the pipeline manifest with -f")
    if len(pipelines) > 1:
        listed = ", ".join(f"{p.metadata.name} ({path})" for path, p in pipelines)
        raise RunError(f"edgeweave run serves one pipeline, but the files hold {len(pipelines)}: "
                       f"{listed}")
    if not node_objects:
        raise RunError(f"no Node objects in {names}: add a nodes file with -f "
                       "(e.g. examples/nodes-local-2x1cpu.yaml)")
    pipeline = pipelines[0][1]
    inventory = inventory_from_objects(
        node_objects, node_selector=pipeline.spec.node_selector, source=names
    )
    return RunManifests(pipeline, inventory, tuple(files))


def default_cache_dir() -> Path:
    """Where models and shards are kept between runs (the operator's rule, too)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeweave"


def threads_for(cpu: float) -> int:
    """onnxruntime threads for a node's allocatable CPU: rounded, 1..this machine's cores."""
    cores = os.cpu_count() or 1
    return max(1, min(round(cpu), cores)) if math.isfinite(cpu) else 1


def check_port_free(host: str, port: int) -> None:
    """Refuse early, and in words, a port another program already listens on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As aiohttp binds (SO_REUSEADDR): a port in TIME_WAIT is free, a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as error:
            raise PortInUseError(
                f"port {port} on {host} is not available ({error.strerror}): another program "
                "listens there; pick another with --port"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a run whose endpoint nobody needs to know)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- processes


class ChildState(StrEnum):
    starting = "starting"
    loading = "loading"
    ready = "ready"
    exited = "exited"
    stopped = "stopped"


class Role(StrEnum):
    gateway = "gateway"
    stage = "stage"


@dataclass(eq=False)
class Child:
    """One process of the pipeline: a stage replica or the gateway."""

    name: str
    role: Role
    log_path: Path
    stage: int | None = None
    node: str | None = None
    threads: int | None = None
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    state: ChildState = ChildState.starting
    detail: str = ""
    """Why it is not ready yet, or how it ended."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def label(self) -> str:
        if self.role is Role.gateway:
            return "the gateway"
        return f"stage {self.stage} replica on node {self.node}"

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role.value,
            "stage": self.stage,
            "node": self.node,
            "threads": self.threads,
            "pid": self.pid,
            "url": self.url,
            "state": self.state.value,
            "log": str(self.log_path),
        }


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _kill_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


# --------------------------------------------------------------------------- the pipeline


ChangeCallback = Callable[["LocalPipeline"], None]
EventCallback = Callable[[str], None]


@dataclass
class RunOptions:
    """How to run: the gateway's address, emulation, where files go."""

    port: int | None = None
    """The gateway's port; ``None``: the manifest's ``spec.gateway.port``."""
    host: str = "127.0.0.1"
    emulate: bool = False
    run_dir: Path | None = None
    cache_dir: Path | None = None
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    python: str = sys.executable
    log_level: str = "info"
    layer_costs: LayerCosts = LayerCosts.measured
    """Price layers by their measured time on this machine, where the stages will run."""


@dataclass
class Prepared:
    """The planned pipeline on disk, ready to start."""

    stored: StoredModel
    profiled: ProfiledModel
    plan: Plan
    shards: list[StoredShard]
    metadata: dict[str, Any]
    nodes: dict[str, Node]


class LocalPipeline:
    """Plan, split and run one pipeline as local processes; a context manager.

    ``with LocalPipeline(manifests, options) as pipeline: pipeline.prepare();
    pipeline.start(); pipeline.watch(stop_event)`` — leaving the block stops every
    process (and the emulator), whatever happened inside.
    """

    def __init__(
        self,
        manifests: RunManifests,
        options: RunOptions | None = None,
        *,
        on_change: ChangeCallback | None = None,
        on_event: EventCallback | None = None,
    ) -> None:
        self.manifests = manifests
        self.options = options or RunOptions()
        self.port = self.options.port or manifests.pipeline.spec.gateway.port
        self.model_name = manifests.name
        self.children: list[Child] = []
        self.prepared: Prepared | None = None
        self.emulated = False
        self.notes: list[str] = []
        """Things the user should know (fallbacks taken), shown by the CLI."""
        self._on_change = on_change or (lambda _pipeline: None)
        self._on_event = on_event or (lambda _message: None)
        self._emulator: EdgeEmulator | None = None
        self._own_run_dir = self.options.run_dir is None
        self._failed = False
        self._stopped = False
        self.run_dir = self._make_run_dir()
        self._store: ModelStore | None = None

    # ------------------------------------------------------------------ properties

    @property
    def endpoint(self) -> str:
        return f"http://{_url_host(self.options.host)}:{self.port}"

    @property
    def infer_url(self) -> str:
        return f"{self.endpoint}/v2/models/{self.model_name}/infer"

    @property
    def token_path(self) -> Path:
        return self.run_dir / "token"

    @property
    def metadata_path(self) -> Path:
        return self.run_dir / "metadata.json"

    @property
    def gateway(self) -> Child | None:
        return next((c for c in self.children if c.role is Role.gateway), None)

    def stage_children(self, stage: int) -> list[Child]:
        return [c for c in self.children if c.role is Role.stage and c.stage == stage]

    # ------------------------------------------------------------------ context

    def __enter__(self) -> LocalPipeline:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        # Logs of processes that ran explain a failure; a failure before any ran has none.
        if exc is not None and self.children and not isinstance(exc, StopRequested):
            self._failed = True
        self.stop()

    # ------------------------------------------------------------------ prepare

    def prepare(self, step: Callable[[str], None] | None = None) -> Prepared:
        """Resolve, profile, plan and split the model; write the run directory's files."""
        from edgeweave.modelstore import ModelStore, model_metadata, plan_pipeline

        announce = step or (lambda _text: None)
        spec = self.manifests.pipeline.spec
        check_port_free(self._gateway_bind_host(), self.port)
        self._store = ModelStore(self.options.cache_dir or default_cache_dir())
        announce(f"resolving {spec.model.uri}")
        stored = self._store.resolve(spec.model.uri, spec.model.sha256)
        announce(f"profiling {stored.name}")
        profiled = self._store.profile(stored, batch=spec.model.batch, inputs=spec.model.inputs,
                                       layer_costs=self.options.layer_costs)
        announce(f"planning on {len(self.manifests.inventory.nodes)} nodes")
        plan = plan_pipeline(profiled, self.manifests.inventory.nodes, spec)
        announce(f"splitting into {len(plan.stages)} shards")
        shards = self._store.shards(stored, profiled, plan)
        metadata = model_metadata(profiled, self.model_name)
        nodes = {node.name: node for node in self.manifests.inventory.nodes}
        self.prepared = Prepared(stored, profiled, plan, shards, metadata, nodes)
        self._write_run_files(self.prepared)
        if spec.auth.api_key_secret_ref is not None:
            self._note(
                "spec.auth.apiKeySecretRef names a Kubernetes Secret, which a local run does "
                f"not have: the gateway on {self.options.host} accepts every client"
            )
        return self.prepared

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self._on_event(message)

    def _make_run_dir(self) -> Path:
        if self.options.run_dir is not None:
            path = self.options.run_dir
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise RunError(f"cannot create --run-dir {path}: {error.strerror}") from None
        else:
            path = Path(tempfile.mkdtemp(prefix=f"edgeweave-run-{self.model_name}-"))
        (path / "logs").mkdir(exist_ok=True)
        return path

    def _write_run_files(self, prepared: Prepared) -> None:
        descriptor = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        self.metadata_path.write_text(json.dumps(prepared.metadata, indent=2) + "\n")
        plan_document = {
            **prepared.plan.to_dict(),
            "model_uri": prepared.stored.uri,
            "model_sha256": prepared.stored.sha256,
            "shards": [shard.to_dict() for shard in prepared.shards],
        }
        (self.run_dir / "plan.json").write_text(json.dumps(plan_document, indent=2) + "\n")
        shard_dir = self.run_dir / "shards"
        shard_dir.mkdir(exist_ok=True)
        for shard in prepared.shards:
            link = shard_dir / f"stage-{shard.index}.onnx"
            link.unlink(missing_ok=True)
            try:
                link.symlink_to(shard.path)
            except OSError:
                shutil.copyfile(shard.path, link)

    def shard_file(self, index: int) -> Path:
        return self.run_dir / "shards" / f"stage-{index}.onnx"

    # ------------------------------------------------------------------ start

    def start(self, stop: threading.Event | None = None) -> None:
        """Start every process and wait until the pipeline answers; stop all on failure."""
        if self.prepared is None:
            raise RunError("prepare() the pipeline before start()")
        stop = stop or threading.Event()
        try:
            if self.options.emulate:
                self._start_emulator()
            self._spawn_all(stop)
            self._wait_ready(stop)
        except BaseException as error:
            if not isinstance(error, StopRequested):
                self._failed = True
            self.stop()
            raise
        self._write_run_json()

    def _start_emulator(self) -> None:
        from edgeweave.local.emulate import EdgeEmulator, NodeSpec, emulation_available

        available, reason = emulation_available()
        if not available:
            self._note(f"--emulate: {reason}; running plain local processes instead")
            return
        assert self.prepared is not None
        used = [name for stage in self.prepared.plan.stages for name in stage.nodes]
        specs = [
            NodeSpec(
                name=name,
                cpu=self.prepared.nodes[name].cpu,
                bandwidth_bytes_per_s=self.prepared.nodes[name].bandwidth_bytes_per_s,
            )
            for name in used
        ]
        self._emulator = EdgeEmulator(specs).start()
        self.emulated = True

    def _gateway_bind_host(self) -> str:
        # Emulated nodes reach the host at the emulator's address, clients at 127.0.0.1.
        return "0.0.0.0" if self.options.emulate and self._emulation_possible() else (
            self.options.host
        )

    def _emulation_possible(self) -> bool:
        from edgeweave.local.emulate import emulation_available

        return emulation_available()[0]

    def _gateway_url_for_stages(self) -> str:
        if self._emulator is not None:
            return f"http://{self._emulator.host_address}:{self.port}"
        return self.endpoint

    def _spawn_all(self, stop: threading.Event) -> None:
        assert self.prepared is not None
        plan = self.prepared.plan
        downstream = [self._gateway_url_for_stages()]
        for index in reversed(range(len(plan.stages))):
            nodes = plan.stages[index].nodes
            started = [self._spawn_stage(index, node, downstream) for node in nodes]
            self._on_change(self)
            for child in started:
                self._wait_listening(child, stop)
            downstream = [child.url for child in started]
        gateway = self._spawn_gateway(downstream)
        self._on_change(self)
        gateway.url = self.endpoint

    def _spawn_stage(self, index: int, node_name: str, downstream: Sequence[str]) -> Child:
        assert self.prepared is not None
        node = self.prepared.nodes[node_name]
        shard = self.prepared.shards[index]
        name = f"stage{index}-{node_name}"
        threads = threads_for(node.cpu)
        listen_host = "127.0.0.1"
        if self._emulator is not None:
            listen_host = self._emulator.node(node_name).address
        argv = [
            *self._edgeweave(), "worker",
            "--shard", str(self.shard_file(index)),
            "--shard-sha256", shard.sha256,
            "--listen", f"{listen_host}:0",
            "--token-file", str(self.token_path),
            "--threads", str(threads),
            "--name", name,
            "--log-level", self.options.log_level,
        ]
        for url in downstream:
            argv += ["--downstream", url]
        child = Child(name, Role.stage, self._log_path(name), stage=index, node=node_name,
                      threads=threads)
        self._launch(child, argv, node_name)
        return child

    def _spawn_gateway(self, stage0_urls: Sequence[str]) -> Child:
        argv = [
            *self._edgeweave(), "gateway",
            "--metadata", str(self.metadata_path),
            "--model-name", self.model_name,
            "--listen", f"{self._gateway_bind_host()}:{self.port}",
            "--token-file", str(self.token_path),
            "--log-level", self.options.log_level,
        ]
        for url in stage0_urls:
            argv += ["--stage0", url]
        child = Child("gateway", Role.gateway, self._log_path("gateway"))
        self._launch(child, argv, None)
        return child

    def _edgeweave(self) -> list[str]:
        return [self.options.python, "-m", "edgeweave"]

    def _log_path(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _launch(self, child: Child, argv: Sequence[str], node_name: str | None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
        with child.log_path.open("wb") as log:
            kwargs: dict[str, Any] = {
                "stdin": subprocess.DEVNULL,
                "stdout": log,
                "stderr": subprocess.STDOUT,
                "env": env,
                "start_new_session": True,
            }
            try:
                if self._emulator is not None and node_name is not None:
                    process = self._emulator.node(node_name).popen(argv, **kwargs)
                else:
                    process = subprocess.Popen(list(argv), **kwargs)
            except OSError as error:
                raise StartupError(f"cannot start {child.label}: {error}") from None
        child.process = process
        self.children.append(child)

    def _wait_listening(self, child: Child, stop: threading.Event) -> None:
        """Until the worker prints its URL (it binds port 0), or fails."""
        give_up = time.monotonic() + self.options.startup_timeout_s
        while not child.url:
            self._check_startup(child, stop, give_up, "to listen")
            for line in child.log_tail(lines=50):
                if LISTENING_MARKER in line:
                    child.url = line.rsplit(" ", 1)[1].strip()
                    child.state = ChildState.loading
                    break
            else:
                stop.wait(POLL_INTERVAL_S / 2)
        self._on_change(self)

    def _wait_ready(self, stop: threading.Event) -> None:
        """Every stage worker's /readyz, then the gateway's /v2/health/ready (a round trip)."""
        give_up = time.monotonic() + self.options.startup_timeout_s
        for child in self.children:
            child.state = ChildState.loading
        waiting = list(self.children)
        while waiting:
            for child in list(waiting):
                self._check_startup(child, stop, give_up, "to become ready")
                path = GATEWAY_PATH_READY if child.role is Role.gateway else STAGE_PATH_READY
                ok, detail = http_ready(f"{child.url}{path}")
                child.detail = detail
                if ok:
                    child.state = ChildState.ready
                    waiting.remove(child)
                    self._on_change(self)
            if waiting:
                self._on_change(self)
                stop.wait(POLL_INTERVAL_S)

    def _check_startup(
        self, child: Child, stop: threading.Event, give_up: float, waiting_for: str
    ) -> None:
        if stop.is_set():
            raise StopRequested()
        for other in self.children:
            code = other.exit_code()
            if code is not None:
                other.state = ChildState.exited
                self._on_change(self)
                raise StartupError(
                    f"{other.label} {describe_exit(code)} while starting"
                    f"{_last_words(other, code)} (log: {other.log_path})",
                    other.log_tail(),
                )
        if time.monotonic() > give_up:
            why = f": {child.detail}" if child.detail else ""
            raise StartupError(
                f"{child.label} did not get ready within {self.options.startup_timeout_s:g} s"
                f"{why} (log: {child.log_path})",
                child.log_tail(),
            )

    def _write_run_json(self) -> None:
        (self.run_dir / "run.json").write_text(json.dumps(self.describe(), indent=2) + "\n")

    def describe(self) -> dict[str, Any]:
        """The running pipeline for scripts: endpoint, plan and every process."""
        plan = self.prepared.plan.to_dict() if self.prepared is not None else None
        return {
            "model": self.model_name,
            "endpoint": self.endpoint,
            "infer_url": self.infer_url,
            "emulated": self.emulated,
            "emulator": self._emulator_description(),
            "run_dir": str(self.run_dir),
            "runner_pid": os.getpid(),
            "plan": plan,
            "processes": [child.to_dict() for child in self.children],
        }

    def _emulator_description(self) -> dict[str, Any] | None:
        emulator = self._emulator
        if emulator is None:
            return None
        return {
            "id": emulator.id,
            "subnet": str(emulator.subnet),
            "host_address": emulator.host_address,
            "nodes": {node.name: node.address for node in emulator.nodes},
        }

    # ------------------------------------------------------------------ serve

    def watch(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set; raise :class:`PipelineDown` when it cannot go on.

        A dead replica whose stage has another live one is reported through
        ``on_event`` and the pipeline serves on; nothing is restarted.
        """
        reported: set[Child] = set()
        while not stop.wait(POLL_INTERVAL_S):
            for child in self.children:
                code = child.exit_code()
                if code is None or child in reported:
                    continue
                reported.add(child)
                child.state = ChildState.exited
                child.detail = describe_exit(code)
                self._on_change(self)
                self._handle_crash(child, code)

    def _handle_crash(self, child: Child, code: int) -> None:
        message = f"{child.label} (pid {child.pid}) {describe_exit(code)}" + _last_words(
            child, code
        )
        if child.role is Role.gateway:
            raise PipelineDown(f"{message}; the pipeline is stopped (log: {child.log_path})",
                               child.log_tail())
        live = [c for c in self.stage_children(child.stage or 0) if c.exit_code() is None]
        if not live:
            raise PipelineDown(
                f"{message}, and stage {child.stage} has no replica left; the pipeline is "
                f"stopped (log: {child.log_path})",
                child.log_tail(),
            )
        total = len(self.stage_children(child.stage or 0))
        self._on_event(
            f"{message} (log: {child.log_path}); not restarted: stage {child.stage} serves "
            f"on {len(live)} of {total} replicas"
        )

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop every process (SIGTERM, grace, SIGKILL to each group) and the emulator.

        Idempotent. The temporary run directory goes too, unless something failed.
        """
        if self._stopped:
            return
        self._stopped = True
        stop_children(self.children)
        if self._emulator is not None:
            emulator, self._emulator = self._emulator, None
            try:
                emulator.close()
            except EdgeweaveError as error:
                self._on_event(f"cleaning up the emulated nodes: {error}")
        self._on_change(self)
        if self._own_run_dir and not self._failed:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def keep_run_dir(self) -> None:
        """Keep the run directory after stop (its logs explain a failure)."""
        self._failed = True


def stop_children(children: Sequence[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child's process group, wait up to ``grace_s``, then SIGKILL the rest.

    Groups are signalled even when their leader is gone, so that anything a child
    forked dies with it.
    """
    started = [c for c in children if c.process is not None]
    for child in started:
        if child.exit_code() is None:
            _kill_group(child.process.pid, signal.SIGTERM)  # type: ignore[union-attr]
    give_up = time.monotonic() + grace_s
    for child in started:
        process = child.process
        assert process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, give_up - time.monotonic()))
    for child in started:
        process = child.process
        assert process is not None
        _kill_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
        if child.state is not ChildState.exited:
            child.state = ChildState.stopped


# --------------------------------------------------------------------------- helpers


def http_ready(url: str) -> tuple[bool, str]:
    """GET ``url``: ready on 200, else the server's reason (or why it was unreachable)."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as response:
            return response.status == 200, ""
    except urllib.error.HTTPError as error:
        return False, _reason(error.read())
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        return False, f"not reachable yet ({reason})"


def _reason(body: bytes) -> str:
    text = body.decode(errors="replace").strip()
    with contextlib.suppress(ValueError):
        document = json.loads(text)
        if isinstance(document, dict):
            for key in ("error", "reason", "detail"):
                if isinstance(document.get(key), str):
                    return document[key][:200]
    return text[:200]


def _last_words(child: Child, code: int) -> str:
    """The last log line of a process that failed by itself: usually its error message.

    A process killed by a signal wrote nothing about it, so nothing is quoted then.
    """
    tail = child.log_tail(lines=1) if code > 0 else []
    if not tail:
        return ""
    words = tail[-1].strip()
    return f": {words.removeprefix('error: ')[:300]}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def stop_on_signals(
    stop: threading.Event, also: Callable[[], None] | None = None
) -> Iterator[threading.Event]:
    """SIGINT, SIGTERM and SIGHUP set ``stop`` (and call ``also``) while inside the block.

    A second Ctrl-C while stopping is ignored rather than leaving children behind; the
    stop itself is bounded by the kill grace period.
    """
    def handle(_signum: int, _frame: Any) -> None:
        stop.set()
        if also is not None:
            also()

    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {signum: signal.signal(signum, handle) for signum in signals}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
