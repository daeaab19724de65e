"""An emulated edge cluster on this machine: API, controllers, kubelet, nodes, operator.

:class:`Sandbox` is what ``edgeweave sandbox up`` runs and what the end-to-end tests
drive. It puts together

* the Kubernetes API (:class:`~edgeweave.sandbox.apiserver.ApiServer`, in a thread),
  with the ``InferencePipeline`` CRD installed and one Node per entry of NODES.yaml;
* the emulated nodes (:class:`~edgeweave.local.emulate.EdgeEmulator`: a network
  namespace with a link shaped to the node's ``edgeweave.io/bandwidth-mbps`` and a
  cgroup CPU quota at its ``status.allocatable.cpu``), when root allows, else plain
  processes on loopback addresses (see :mod:`.runner`);
* the controllers and the pod runner (:mod:`.controllers`, :mod:`.runner`), on one
  asyncio loop in a thread of their own;
* the real operator, ``edgeweave operator``, as a supervised child process (restarted
  if it exits, as a Deployment would; :meth:`Sandbox.restart_operator` restarts it on
  purpose), with its shard server on the address the nodes reach the host at.

**Reaching a pipeline.** The operator writes ``status.endpoint`` as the gateway
Service's cluster DNS name. Every Service with a cluster IP is served by the sandbox
at an address of its own that this machine reaches (``127.B.128.x`` without
emulation, an address on the emulator's bridge with it), on the Service's own
ports; :meth:`Sandbox.reachable` turns any cluster URL into that address, and a
Service of type ``LoadBalancer`` gets it as its ``status.loadBalancer.ingress`` — an
operator that reports the load balancer's address in ``status.endpoint`` is then
reachable as written.

**Stopping.** :meth:`Sandbox.stop` (the CLI calls it on SIGTERM/SIGINT) stops the
operator, then every pod (SIGTERM, a grace period, SIGKILL to each process group),
the controllers, the emulated nodes (which kill whatever is left in their cgroups
and remove namespaces, links and cgroups) and the API. Every child process also gets
a parent-death signal, so even a sandbox killed with SIGKILL leaves no process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from edgeweave.errors import EdgeweaveError
from edgeweave.sandbox.apiserver import ApiServer, SandboxError
from edgeweave.sandbox.controllers import (
    DEFAULT_POD_EVICTION_S,
    ClusterCache,
    DeploymentController,
    KubeApi,
    NodeLifecycleController,
    Scheduler,
    ServiceProxy,
    parse_cpu,
)
from edgeweave.sandbox.runner import (
    EmulatedNetwork,
    LoopbackNetwork,
    Network,
    NodeHost,
    NotYet,
    PodRunner,
    spawn,
)

if TYPE_CHECKING:
    from edgeweave.local.emulate import EdgeEmulator

log = logging.getLogger(__name__)

T = TypeVar("T")

BANDWIDTH_LABEL: Final = "edgeweave.io/bandwidth-mbps"
START_TIMEOUT_S: Final = 60.0
OPERATOR_STOP_S: Final = 20.0
OPERATOR_RESTART_DELAY_S: Final = 1.0


class SandboxStartError(SandboxError):
    """The sandbox could not start; says which part and why."""


@dataclass
class SandboxOptions:
    """How to build the sandbox."""

    nodes: Sequence[Mapping[str, Any]]
    """Node objects (as in NODES.yaml)."""
    emulate: bool | None = None
    """True: emulate nodes (fail without root); False: plain processes; None: when possible."""
    run_dir: Path | None = None
    """Logs, pod volumes, the operator's log and kubeconfig; a temporary one if None."""
    cache_dir: Path | None = None
    """The operator's model and shard cache (default: the usual edgeweave cache)."""
    cluster_domain: str = "cluster.local"
    pod_eviction_s: float = DEFAULT_POD_EVICTION_S
    operator: bool = True
    operator_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment of the operator (``EDGEWEAVE_*`` settings)."""
    api_port: int = 0


def read_nodes_file(path: str | Path) -> list[Mapping[str, Any]]:
    """The Node objects of a NODES.yaml file (a List, one Node, or several documents)."""
    from edgeweave.partition.nodes import node_objects_from_yaml

    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as error:
        raise SandboxStartError(f"cannot read the nodes file {source}: {error.strerror}") from None
    return node_objects_from_yaml(text, str(source))


def node_manifest(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A Node as the sandbox registers it: Ready unless the file says otherwise."""
    node = {"apiVersion": "v1", "kind": "Node", "metadata": dict(obj.get("metadata") or {}),
            "spec": dict(obj.get("spec") or {}), "status": dict(obj.get("status") or {})}
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields"):
        node["metadata"].pop(key, None)
    name = str(node["metadata"].get("name") or "")
    if not name:
        raise SandboxStartError("a Node in the nodes file has no metadata.name")
    labels = node["metadata"].setdefault("labels", {})
    labels.setdefault("kubernetes.io/hostname", name)
    labels.setdefault("kubernetes.io/os", "linux")
    status = node["status"]
    conditions = list(status.get("conditions") or [])
    if not any(c.get("type") == "Ready" for c in conditions):
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "the sandbox runs this node's pods"})
    status["conditions"] = conditions
    return node


def node_cpu(obj: Mapping[str, Any]) -> float:
    """The CPU share a node is held to: its ``status.allocatable.cpu`` (all cores if unset)."""
    allocatable = (obj.get("status") or {}).get("allocatable") or {}
    return parse_cpu(allocatable.get("cpu"), float(os.cpu_count() or 1))


def node_bandwidth_bytes(obj: Mapping[str, Any]) -> float | None:
    """The node's link in bytes/s from its ``bandwidth-mbps`` label (DESIGN §1), if any."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    raw = labels.get(BANDWIDTH_LABEL)
    if raw is None:
        return None
    try:
        mbps = float(raw)
    except ValueError:
        name = (obj.get("metadata") or {}).get("name")
        raise SandboxStartError(f"node {name}: label {BANDWIDTH_LABEL}={raw!r} is not a number"
                                ) from None
    return mbps * 1e6 / 8 if mbps > 0 else None


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Sandbox:
    """The whole emulated cluster; :meth:`start`, then :meth:`stop` (or use ``with``)."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.nodes = [node_manifest(obj) for obj in options.nodes]
        names = [n["metadata"]["name"] for n in self.nodes]
        if not names:
            raise SandboxStartError("the sandbox needs at least one Node")
        if len(set(names)) != len(names):
            raise SandboxStartError(f"the nodes file names a node twice: {sorted(names)}")
        self._temporary_dir = options.run_dir is None
        self.run_dir = options.run_dir or Path(tempfile.mkdtemp(prefix="edgeweave-sandbox-"))
        self.kubeconfig = self.run_dir / "kubeconfig"
        self.api = ApiServer(port=options.api_port)
        self.emulator: EdgeEmulator | None = None
        self.network: Network | None = None
        self.emulated = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._kube: KubeApi | None = None
        self.cache: ClusterCache | None = None
        self.proxy: ServiceProxy | None = None
        self.runner: PodRunner | None = None
        self._operator: subprocess.Popen[bytes] | None = None
        self._operator_wanted = False
        self.operator_restarts = 0
        self.shard_port = 0
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Sandbox:
        """Start every part; returns once pods can run and the operator is started."""
        if self._started:
            raise SandboxStartError("this sandbox was started already")
        self._started = True
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.api.start()
            self.api.write_kubeconfig(self.kubeconfig)
            self._install_crd_and_nodes()
            self._start_nodes()
            self._start_cluster(timeout_s)
            if self.options.operator:
                self._call(self._start_operator(), timeout_s)
        except BaseException:
            with contextlib.suppress(SandboxError):
                self.stop()  # what failed to start is the error worth reporting
            raise
        return self

    def _install_crd_and_nodes(self) -> None:
        from edgeweave.api.crd import crd_manifest

        self.api.apply([crd_manifest()])
        for node in self.nodes:
            self.api.create(node)

    def _start_nodes(self) -> None:
        from edgeweave.local.emulate import EdgeEmulator, NodeSpec, emulation_available

        wanted = self.options.emulate
        available, why = emulation_available()
        if wanted and not available:
            raise SandboxStartError(f"cannot emulate nodes: {why}")
        if wanted is None and not available:
            log.info("running pods as plain processes: %s", why)
        if (wanted is None and available) or wanted:
            specs = [NodeSpec(name=n["metadata"]["name"], cpu=node_cpu(n),
                              bandwidth_bytes_per_s=node_bandwidth_bytes(n)) for n in self.nodes]
            self.emulator = EdgeEmulator(specs).start()
            self.network = EmulatedNetwork(self.emulator)
            self.emulated = True
        else:
            self.network = LoopbackNetwork()

    def _hosts(self) -> dict[str, NodeHost]:
        hosts = {}
        for node in self.nodes:
            name = node["metadata"]["name"]
            emulated = self.emulator.node(name) if self.emulator is not None else None
            hosts[name] = NodeHost(name, emulated)
        return hosts

    def _start_cluster(self, timeout_s: float) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as error:
                failure.append(error)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="sandbox-cluster", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise SandboxStartError(f"the sandbox's controllers did not start in {timeout_s:g} s")
        if failure:
            raise SandboxStartError(f"the sandbox's controllers failed: {failure[0]}")

    async def _serve(self, ready: threading.Event) -> None:
        assert self.network is not None
        kube = self._kube = KubeApi(self.api.url)
        cache = self.cache = ClusterCache(kube)
        runner_ref: list[PodRunner] = []
        proxy = self.proxy = ServiceProxy(
            kube, cache, self.network, lambda pod: runner_ref[0].pod_address(pod))
        runner = self.runner = PodRunner(
            kube, cache, self.network, self._hosts(), proxy, run_dir=self.run_dir,
            cluster_domain=self.options.cluster_domain)
        runner_ref.append(runner)
        loops = [
            DeploymentController(kube, cache),
            Scheduler(kube, cache, runner.has_kubelet),
            NodeLifecycleController(kube, cache, self.options.pod_eviction_s),
            proxy,
        ]
        self._tasks = [asyncio.create_task(i.run(), name=f"informer-{i.kind.plural}")
                       for i in cache.informers]
        await asyncio.wait_for(cache.wait_synced(), START_TIMEOUT_S)
        self._tasks += [asyncio.create_task(loop.run(), name=loop.name) for loop in loops]
        self._tasks.append(asyncio.create_task(runner.run(), name="pod-runner"))
        self._tasks.append(asyncio.create_task(self._supervise_operator(), name="operator"))
        ready.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks)
        finally:
            await _cancel_the_rest()

    def stop(self) -> None:
        """Stop everything this sandbox started (idempotent); see the module docstring."""
        if self._stopped:
            return
        self._stopped = True
        problems: list[str] = []
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            try:
                self._call(self._shutdown_cluster(), OPERATOR_STOP_S + 60)
            except Exception as error:
                problems.append(f"stopping pods and controllers: {error}")
            self._loop.call_soon_threadsafe(self._cancel_tasks)
            self._thread.join(30)
        if self.emulator is not None:
            try:
                self.emulator.close()
            except EdgeweaveError as error:
                problems.append(str(error))
        self.api.stop()
        if self._temporary_dir and not problems:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if problems:
            raise SandboxError("; ".join(problems))

    async def _shutdown_cluster(self) -> None:
        self._operator_wanted = False
        await self._stop_operator()
        if self.runner is not None:
            await self.runner.shutdown()
        if self.proxy is not None:
            await self.proxy.close()
        if self._kube is not None:
            await self._kube.close()

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        if self._loop is None:
            coroutine.close()
            raise SandboxError("the sandbox is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    # ------------------------------------------------------------------ the operator

    def operator_environment(self) -> dict[str, str]:
        """What ``edgeweave operator`` is started with: this cluster and its settings."""
        assert self.network is not None
        if not self.shard_port:
            self.shard_port = free_port(self.network.host_address)
        host = self.network.host_address
        cache = self.options.cache_dir
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "EDGEWEAVE_SHARD_HOST": host,
            "EDGEWEAVE_SHARD_PORT": str(self.shard_port),
            "EDGEWEAVE_SHARD_URL": f"http://{host}:{self.shard_port}",
            "EDGEWEAVE_CLUSTER_DOMAIN": self.options.cluster_domain,
            "EDGEWEAVE_GATEWAY_SERVICE_TYPE": "LoadBalancer",
            "PYTHONUNBUFFERED": "1",
        }
        if cache is not None:
            env["EDGEWEAVE_CACHE_DIR"] = str(cache)
        env.update(self.options.operator_env)
        return env

    async def _start_operator(self) -> None:
        self._operator_wanted = True
        self._operator = spawn(
            [sys.executable, "-m", "edgeweave", "operator"], self.operator_environment(),
            str(self.run_dir), self.run_dir / "operator.log", None)
        log.info("operator started (pid %d)", self._operator.pid)

    async def _stop_operator(self) -> None:
        process, self._operator = self._operator, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + OPERATOR_STOP_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait)

    async def _supervise_operator(self) -> None:
        """Restart the operator if it exits by itself, as its Deployment would."""
        while True:
            await asyncio.sleep(0.2)
            process = self._operator
            if not self._operator_wanted or process is None or process.poll() is None:
                continue
            log.warning("the operator exited with %s; restarting it", process.returncode)
            await asyncio.sleep(OPERATOR_RESTART_DELAY_S)
            if self._operator_wanted and self._operator is process:
                self.operator_restarts += 1
                await self._start_operator()

    def restart_operator(self) -> None:
        """Stop the operator (SIGTERM, as a rollout would) and start a new one."""
        async def restart() -> None:
            await self._stop_operator()
            self.operator_restarts += 1
            await self._start_operator()

        self._call(restart(), OPERATOR_STOP_S + 10)

    @property
    def operator_pid(self) -> int | None:
        process = self._operator
        return process.pid if process is not None and process.poll() is None else None

    # ------------------------------------------------------------------ what tests and users ask

    def pids(self) -> list[int]:
        """Every live process the sandbox runs: pods' containers and the operator."""
        runner = self.runner

        async def listing() -> list[int]:
            return list(runner.pids()) if runner is not None else []

        pids = self._call(listing()) if self._loop is not None else []
        if self.operator_pid is not None:
            pids.append(self.operator_pid)
        return pids

    def pod_pids(self) -> list[int]:
        """The live processes of pods' containers (the operator's aside)."""
        operator = self.operator_pid
        return [pid for pid in self.pids() if pid != operator]

    def reachable(self, url: str) -> str:
        """``url`` with its cluster DNS name replaced by an address this machine reaches."""
        runner = self.runner
        if runner is None:
            raise SandboxError("the sandbox is not running")
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""

        async def resolve() -> str:
            return runner.resolver.rewrite(host)

        try:
            address = self._call(resolve())
        except NotYet as why:
            raise SandboxError(f"{url} is not reachable yet: {why.message}") from None
        netloc = address if parts.port is None else f"{address}:{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def services(self) -> dict[str, str]:
        """Every served Service as ``namespace/name`` → ``address:port,...``."""
        proxy = self.proxy
        if proxy is None:
            return {}

        async def listing() -> dict[str, str]:
            return {f"{ns}/{name}": ",".join(f"{p.address}:{port}" for port, _ in p.ports)
                    for (ns, name), p in proxy.published.items()}

        return self._call(listing())

    def delete_node(self, name: str) -> None:
        self.api.delete_node(name)

    def set_node_ready(self, name: str, ready: bool) -> None:
        self.api.set_node_ready(name, ready)

    def describe(self) -> list[str]:
        """Lines for a person: where the API is, how nodes run, where logs go."""
        assert self.network is not None
        lines = [
            f"API server       {self.api.url} (kubeconfig {self.kubeconfig})",
            f"nodes            {', '.join(n['metadata']['name'] for n in self.nodes)}",
            f"pods run as      {self.network.describe()}",
            f"run directory    {self.run_dir} (logs/, operator.log)",
        ]
        if self.options.operator:
            lines.append(f"operator         edgeweave operator, shard server at "
                         f"http://{self.network.host_address}:{self.shard_port}")
        return lines


async def _cancel_the_rest() -> None:
    """Cancel and await every task still on this loop (probes, relays), so that none is
    destroyed pending when the loop closes."""
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)
