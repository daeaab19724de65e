"""Measure this machine and turn the figures into the ``edgeweave.io/*`` node labels.

The planner prices a plan from four labels (DESIGN.md §4): device class, GFLOPS,
memory and bandwidth. Guessed labels make plans that look optimal and are not, so
``edgeweave profile-node`` measures each one the way the data plane will use it:

* **GFLOPS** are *effective*: a zoo model runs in onnxruntime with exactly the
  session options of a stage worker (:class:`~edgeweave.worker.stage.ShardRunner`)
  on as many threads as this process may use, and the profiler's FLOP count is
  divided by the median time per inference. The cost model divides the same FLOP
  counts by this figure, so graph fusions and memory-bound layers are priced in.
* **CPUs** are what the scheduler lets this process use: the affinity mask, capped by
  a cgroup CPU quota (v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` or v2 ``cpu.max``,
  the tightest along the cgroup's ancestors).
* **Memory** is ``MemAvailable`` (what can be allocated without swapping, page cache
  included), capped by a cgroup memory limit, less a reserve for the OS and worker.
* **Bandwidth** is streamed both ways to a peer running ``profile-node --serve`` and
  timed at the receiving end (a sender only sees its socket buffer fill); the label is
  the slower direction, since a stage both receives and sends.

A profiler in a pod measures its pod's share: give a profiling DaemonSet no CPU or
memory limits, or the labels describe the limits instead of the node.

All file reads take a ``root`` so that tests can hand in a fake ``/proc`` and
``/sys/fs/cgroup``. onnxruntime, aiohttp and kubernetes are imported inside the
functions that need them.
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
import re
import shlex
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeweave import zoo
from edgeweave.errors import EdgeweaveError
from edgeweave.partition.costmodel import MIB
from edgeweave.partition.nodes import (
    DEFAULT_BANDWIDTH_MBPS,
    FALLBACK_BANDWIDTH_MBPS,
    LABEL_BANDWIDTH_MBPS,
    LABEL_DEVICE_CLASS,
    LABEL_GFLOPS,
    LABEL_MEMORY_MB,
    LABEL_PREFIX,
)

if TYPE_CHECKING:
    from aiohttp import web

DEFAULT_MODEL = "zoo:resnet18"
"""Dense convolutions, like most of the zoo; small enough for a few runs on a Pi 3."""
DEFAULT_SECONDS = 5.0
DEFAULT_RESERVE_MB = 256
DEFAULT_BANDWIDTH_SECONDS = 3.0
DEFAULT_SERVE_PORT = 8099
WARMUP_RUNS = 2
"""The first run allocates arenas and picks kernels; the second settles caches."""
MIN_TIMED_RUNS = 3
"""A median needs a few runs even when one run takes longer than the budget."""
UNLIMITED_CGROUP_BYTES = 2**60
"""cgroup v1 writes "no limit" as a page-rounded 2**63-1; anything this large is none."""
LABEL_VALUE_MAX = 63
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NODE_NAME_ENV = "NODE_NAME"

DOWNLOAD_PATH = "/v1/download"
UPLOAD_PATH = "/v1/upload"
HEALTH_PATH = "/healthz"
TRANSFER_CHUNK_BYTES = 256 * 1024
MAX_TRANSFER_SECONDS = 30.0
"""What one request to a serving peer may stream, so an endpoint cannot be held forever."""

_K8S_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv8l": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
"""``uname -m`` → the ``kubernetes.io/arch`` value a kubelet on this machine reports."""


class NodeProfileError(EdgeweaveError):
    """A measurement that cannot be made here, or options that contradict each other."""


class BandwidthError(NodeProfileError):
    """The peer cannot be reached or does not speak the profile-node protocol."""


class LabelApplyError(NodeProfileError):
    """The Node cannot be labelled: no name, not found, forbidden, API unreachable."""


# =====================================================================  cgroups and CPUs


@dataclass(frozen=True)
class CgroupDirs:
    """This process's cgroup directory per controller, and where each hierarchy is mounted.

    Limits are hierarchical: a parent's limit caps every child. So each directory is
    read together with its ancestors up to the mount point.
    """

    v1: Mapping[str, tuple[Path, Path]] = field(default_factory=dict)
    """controller → (this process's directory, mount point) for cgroup v1."""
    v2: tuple[Path, Path] | None = None
    """(this process's directory, mount point) in the unified (v2) hierarchy."""

    def chain(self, controller: str) -> tuple[str, list[Path]]:
        """``("v1"|"v2", directories from this process's cgroup up to the mount point)``.

        A v1 controller wins when mounted: on hybrid systems the v2 hierarchy exists
        but has no controllers enabled.
        """
        if controller in self.v1:
            return "v1", _ancestors(*self.v1[controller])
        if self.v2 is not None:
            return "v2", _ancestors(*self.v2)
        return "none", []


def _ancestors(directory: Path, mount_point: Path) -> list[Path]:
    chain = [directory]
    while directory != mount_point and mount_point in directory.parents:
        directory = directory.parent
        chain.append(directory)
    return chain


def _unescape_mount_field(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _cgroup_mounts(root: Path) -> tuple[dict[str, tuple[str, str]], tuple[str, str] | None]:
    """v1 controller → (mount root, mount point) and the v2 (mount root, mount point)."""
    v1: dict[str, tuple[str, str]] = {}
    v2: tuple[str, str] | None = None
    text = _read_text(root / "proc/self/mountinfo")
    for line in (text or "").splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, mount_point = _unescape_mount_field(fields[3]), _unescape_mount_field(fields[4])
        fstype, super_options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            v2 = (mount_root, mount_point)
        elif fstype == "cgroup":
            for option in super_options:
                v1.setdefault(option, (mount_root, mount_point))
    return v1, v2


def find_cgroups(root: Path = Path("/")) -> CgroupDirs:
    """Locate this process's cgroups from ``/proc/self/cgroup`` and ``/proc/self/mountinfo``.

    Without cgroup namespaces a container sees the host's paths (``/kubepods/...``)
    under a mount whose root is that same path; with them it sees ``/`` and its own
    cgroup at the mount point. Both resolve to the directory that holds the limits.
    """
    mounts_v1, mount_v2 = _cgroup_mounts(root)
    v1: dict[str, tuple[Path, Path]] = {}
    v2: tuple[Path, Path] | None = None
    for line in (_read_text(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and mount_v2 is not None:
            v2 = _cgroup_dir(root, *mount_v2, path)
            continue
        for controller in controllers.split(","):
            if controller in mounts_v1:
                v1[controller] = _cgroup_dir(root, *mounts_v1[controller], path)
    return CgroupDirs(v1=v1, v2=v2)


def _cgroup_dir(root: Path, mount_root: str, mount_point: str, path: str) -> tuple[Path, Path]:
    mount = root / mount_point.lstrip("/")
    relative = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        relative = path[len(mount_root):]
    directory = mount / relative.lstrip("/")
    if not directory.is_dir():
        # The path belongs to a namespace this process cannot see: the mount point is
        # then the nearest directory that is really ours.
        directory = mount
    return directory, mount


def cgroup_cpu_limit(cgroups: CgroupDirs) -> float | None:
    """The CPU quota in CPUs (``1.5`` = 150 ms per 100 ms), tightest along the ancestors."""
    version, chain = cgroups.chain("cpu")
    limits: list[float] = []
    for directory in chain:
        if version == "v1":
            quota = _read_number(directory / "cpu.cfs_quota_us")
            period = _read_number(directory / "cpu.cfs_period_us")
        else:
            quota, period = _read_cpu_max(directory / "cpu.max")
        if quota is not None and period and quota > 0:
            limits.append(quota / period)
    return min(limits) if limits else None


def _read_cpu_max(path: Path) -> tuple[float | None, float | None]:
    words = (_read_text(path) or "").split()
    if len(words) != 2 or words[0] == "max":
        return None, None
    try:
        return float(words[0]), float(words[1])
    except ValueError:
        return None, None


def cgroup_memory_limit(cgroups: CgroupDirs) -> int | None:
    """The memory limit in bytes, tightest along the ancestors; ``None`` when unlimited."""
    version, chain = cgroups.chain("memory")
    name = "memory.limit_in_bytes" if version == "v1" else "memory.max"
    limits = [
        int(value)
        for directory in chain
        if (value := _read_number(directory / name)) is not None
        and 0 < value < UNLIMITED_CGROUP_BYTES
    ]
    return min(limits) if limits else None


@dataclass(frozen=True)
class CpuShare:
    """The CPUs this process may use, and the onnxruntime threads that fill them."""

    affinity_cpus: int
    """CPUs in the scheduler affinity mask (what cpusets and ``taskset`` allow)."""
    quota_cpus: float | None
    """The cgroup CPU quota in CPUs, if one is set."""

    @property
    def cpus(self) -> float:
        if self.quota_cpus is None:
            return float(self.affinity_cpus)
        return min(float(self.affinity_cpus), self.quota_cpus)

    @property
    def threads(self) -> int:
        # A fractional quota still runs best with a thread for the partial CPU: the
        # quota caps the time, the extra thread only fills it.
        return max(1, math.ceil(self.cpus - 1e-9))


def read_cpu_share(root: Path = Path("/"), affinity: int | None = None) -> CpuShare:
    """This process's CPU share; ``affinity`` overrides ``os.sched_getaffinity`` (tests)."""
    if affinity is None:
        affinity = _affinity_cpus()
    return CpuShare(affinity_cpus=affinity, quota_cpus=cgroup_cpu_limit(find_cgroups(root)))


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


# =====================================================================  memory


@dataclass(frozen=True)
class MemoryFigures:
    available_mb: float
    """``MemAvailable`` from /proc/meminfo."""
    total_mb: float
    cgroup_limit_mb: float | None
    reserve_mb: float

    @property
    def usable_mb(self) -> int:
        ceiling = self.available_mb
        if self.cgroup_limit_mb is not None:
            ceiling = min(ceiling, self.cgroup_limit_mb)
        return math.floor(ceiling - self.reserve_mb)

    @property
    def capped_by_cgroup(self) -> bool:
        return self.cgroup_limit_mb is not None and self.cgroup_limit_mb < self.available_mb


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (its ``kB`` are KiB)."""
    text = _read_text(root / "proc/meminfo")
    if text is None:
        raise NodeProfileError(
            f"cannot read {root / 'proc/meminfo'}: memory can only be measured on Linux; "
            "label edgeweave.io/memory-mb by hand"
        )
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if words and words[0].isdigit():
            scale = 1024 if len(words) > 1 and words[1] == "kB" else 1
            values[key.strip()] = int(words[0]) * scale
    return values


def measure_memory(reserve_mb: float = DEFAULT_RESERVE_MB, root: Path = Path("/")) -> MemoryFigures:
    """Usable memory: MemAvailable capped by a cgroup limit, less ``reserve_mb``."""
    if reserve_mb < 0:
        raise NodeProfileError(f"--reserve-mb must be 0 or more, not {reserve_mb:g}")
    meminfo = read_meminfo(root)
    if "MemAvailable" not in meminfo:
        raise NodeProfileError(
            f"{root / 'proc/meminfo'} has no MemAvailable (Linux older than 3.14?): "
            "label edgeweave.io/memory-mb by hand"
        )
    limit = cgroup_memory_limit(find_cgroups(root))
    figures = MemoryFigures(
        available_mb=meminfo["MemAvailable"] / MIB,
        total_mb=meminfo.get("MemTotal", 0) / MIB,
        cgroup_limit_mb=None if limit is None else limit / MIB,
        reserve_mb=float(reserve_mb),
    )
    if figures.usable_mb <= 0:
        ceiling = figures.usable_mb + reserve_mb
        raise NodeProfileError(
            f"only {ceiling:.0f} MiB is available, not more than --reserve-mb {reserve_mb:g}: "
            "free memory or lower --reserve-mb"
        )
    return figures


# =====================================================================  compute


@dataclass(frozen=True)
class ComputeFigures:
    model: str
    flops: float
    """The profiler's FLOPs per inference (what the cost model divides by GFLOPS)."""
    threads: int
    warmup_runs: int
    runs: int
    median_s: float
    best_s: float
    mean_s: float
    """Total timed seconds over runs: under a CPU quota, throttled periods count here,
    while the median can fall in the bursts between them."""

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9

    @property
    def sustained_gflops(self) -> float:
        """What back-to-back runs sustain (the right figure under a CPU quota)."""
        return self.flops / self.mean_s / 1e9


def measure_gflops(
    model: str = DEFAULT_MODEL, *, threads: int, seconds: float = DEFAULT_SECONDS
) -> ComputeFigures:
    """Effective GFLOPS: the model's FLOPs over its median inference time on ``threads``.

    Runs ``WARMUP_RUNS`` untimed inferences, then timed ones until ``seconds`` have
    passed (at least ``MIN_TIMED_RUNS``). The median, not the mean, so that one run
    descheduled by a neighbour does not drag the label down.
    """
    if threads < 1:
        raise NodeProfileError(f"--threads must be at least 1, not {threads}")
    if not seconds > 0:
        raise NodeProfileError(f"--seconds must be positive, not {seconds:g}")
    model_bytes, flops = _benchmark_model(model)
    try:
        from edgeweave.worker.stage import ShardRunner
    except ImportError:
        raise NodeProfileError(
            "measuring GFLOPS needs onnxruntime: pip install 'edgeweave[worker]'"
        ) from None
    runner = ShardRunner(model_bytes, threads=threads, label=model)
    feed = {rule.name: rule.example() for rule in runner.inputs}
    for _ in range(WARMUP_RUNS):
        runner.run(feed)
    times = _timed_runs(lambda: runner.run(feed), seconds)
    return ComputeFigures(
        model=model,
        flops=flops,
        threads=threads,
        warmup_runs=WARMUP_RUNS,
        runs=len(times),
        median_s=statistics.median(times),
        best_s=min(times),
        mean_s=statistics.fmean(times),
    )


def _timed_runs(run: Callable[[], object], seconds: float) -> list[float]:
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < MIN_TIMED_RUNS or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def _benchmark_model(ref: str) -> tuple[bytes, float]:
    """The serialized model with its weights, and the profiler's FLOPs for it at batch 1."""
    import onnx

    from edgeweave.partition.graph import analyze

    if ref.startswith(zoo.ZOO_SCHEME):
        proto = zoo.build(ref)
    else:
        path = Path(ref)
        if not path.is_file():
            raise NodeProfileError(f"--model {ref}: no such file (give zoo:NAME or an ONNX file)")
        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends untyped
            raise NodeProfileError(f"--model {ref} is not an ONNX model: {exc}") from None
    flops = analyze(proto).flops
    if flops <= 0:
        raise NodeProfileError(f"--model {ref} has no FLOPs the profiler can count")
    return proto.SerializeToString(), flops


# =====================================================================  device class


def kubernetes_arch(machine: str | None = None) -> str:
    """The ``kubernetes.io/arch`` of this machine (``uname -m`` mapped to Go's names)."""
    machine = (machine or platform.machine()).lower()
    return _K8S_ARCH.get(machine, machine or "unknown")


def cpu_model(root: Path = Path("/")) -> str | None:
    """The most specific name of this machine's processor or board.

    A board's ``Model`` line (Raspberry Pi kernels write it in /proc/cpuinfo) or its
    device-tree model names the whole SoC and clocks; on ARM the ``model name`` line
    is only the core ("ARMv7 Processor rev 3"), so it comes last there.
    """
    cpuinfo = _read_text(root / "proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip(), value.strip())
    device_tree = (_read_text(root / "proc/device-tree/model") or "").strip("\x00 \n")
    for candidate in (fields.get("Model"), device_tree, fields.get("model name"),
                      fields.get("Hardware")):
        if candidate:
            return candidate
    return None


def slugify_device(name: str) -> str:
    """A device-class slug: ``Raspberry Pi 4 Model B Rev 1.4`` → ``raspberry-pi-4-model-b``.

    Board revisions, trademarks, clock suffixes and the word "CPU" are dropped: boards
    that differ only in them run a model at the same speed and should share a class.
    """
    text = name.lower()
    text = re.sub(r"\((r|tm|c)\)", " ", text)
    text = text.split("@", 1)[0]
    text = re.sub(r"\brev(ision)?\s*[0-9a-f.]+\b", " ", text)
    text = re.sub(r"\b(cpu|processor)\b", " ", text)
    text = re.sub(r"[^a-z0-9]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-")


def default_device_class(root: Path = Path("/"), machine: str | None = None) -> str:
    """``<cpu-model-slug>-<arch>``: one class per processor and instruction set.

    The architecture is part of the class because a 32-bit OS on a 64-bit board (Pi 3
    and 4 often run one) is markedly slower than a 64-bit one on the same chip.
    """
    arch = kubernetes_arch(machine)
    model = cpu_model(root)
    slug = slugify_device(model) if model else ""
    if not slug:
        return arch
    room = LABEL_VALUE_MAX - len(arch) - 1
    return f"{slug[:room].rstrip('-_.')}-{arch}"


def check_label_value(value: str, what: str) -> str:
    """A valid Kubernetes label value, or an error saying which option to fix."""
    if len(value) > LABEL_VALUE_MAX or not value or not _LABEL_VALUE.match(value):
        raise NodeProfileError(
            f"{what} {value!r} is not a valid label value: at most {LABEL_VALUE_MAX} "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return value


# =====================================================================  bandwidth


@dataclass(frozen=True)
class BandwidthFigures:
    peer: str
    seconds: float
    """Streaming time per direction that was asked for."""
    upload_mbps: float
    """This machine → peer, timed by the peer."""
    download_mbps: float
    """Peer → this machine, timed here."""

    @property
    def mbps(self) -> float:
        return min(self.upload_mbps, self.download_mbps)


def normalize_peer_url(peer: str) -> str:
    """``host:port`` or ``http://host:port[/]`` → ``http://host:port``."""
    url = peer.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")) or url.endswith("//"):
        raise BandwidthError(f"--peer {peer!r} is not an http(s) URL (e.g. http://pi-3:8099)")
    return url


def bandwidth_app() -> web.Application:
    """The endpoint a peer measures against: an upload sink and a download source.

    One transfer at a time: two peers measuring at once would share the link and each
    report half of it, so a second transfer waits for the first to finish. Each
    transfer streams at most ``MAX_TRANSFER_SECONDS``.
    """
    from aiohttp import web

    lock = asyncio.Lock()
    payload = os.urandom(TRANSFER_CHUNK_BYTES)  # incompressible, should a link compress

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def download(request: web.Request) -> web.StreamResponse:
        seconds = _seconds_param(request)
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Cache-Control": "no-store"}
        )
        async with lock:
            await response.prepare(request)
            deadline = time.perf_counter() + seconds
            try:
                while time.perf_counter() < deadline:
                    await response.write(payload)
                await response.write_eof()
            except ConnectionError:
                pass  # the measuring side hung up: nothing left to tell it
        return response

    async def upload(request: web.Request) -> web.Response:
        async with lock:
            counted, elapsed = await _receive_timed(
                request.content.iter_any(), MAX_TRANSFER_SECONDS
            )
        return web.json_response({"bytes": counted, "seconds": elapsed})

    app = web.Application()
    app.router.add_get(HEALTH_PATH, health)
    app.router.add_get(DOWNLOAD_PATH, download)
    app.router.add_post(UPLOAD_PATH, upload)
    return app


def _seconds_param(request: web.Request) -> float:
    from aiohttp import web

    raw = request.query.get("seconds", str(DEFAULT_BANDWIDTH_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"seconds={raw!r} is not a number") from None
    if not 0 < seconds <= MAX_TRANSFER_SECONDS:
        raise web.HTTPBadRequest(text=f"seconds must be in (0, {MAX_TRANSFER_SECONDS:g}]")
    return seconds


async def _receive_timed(chunks: AsyncIterator[bytes], max_seconds: float) -> tuple[int, float]:
    """Bytes received after the first chunk, and the time they took.

    The clock starts when the first chunk lands, so connection setup and the first
    chunk's transit (already in flight before the clock could start) are not counted.
    """
    first: float | None = None
    last = 0.0
    counted = 0
    async for chunk in chunks:
        now = time.perf_counter()
        if first is None:
            first = last = now
            continue
        counted += len(chunk)
        last = now
        if now - first >= max_seconds:
            break
    return counted, (last - first) if first is not None else 0.0


async def measure_bandwidth(
    peer: str, seconds: float = DEFAULT_BANDWIDTH_SECONDS
) -> BandwidthFigures:
    """Stream to and from ``peer`` (a ``profile-node --serve``) for ``seconds`` each way."""
    import aiohttp

    url = normalize_peer_url(peer)
    if not 0 < seconds <= MAX_TRANSFER_SECONDS:
        raise BandwidthError(
            f"--bandwidth-seconds must be in (0, {MAX_TRANSFER_SECONDS:g}], not {seconds:g}"
        )
    # The peer serves one transfer at a time, so a read may wait for another node's
    # measurement to finish before the first byte comes.
    timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=max(60.0, 4 * seconds))
    try:
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            download = await _download_mbps(session, url, seconds)
            upload = await _upload_mbps(session, url, seconds)
    except aiohttp.ClientConnectorError as exc:
        raise BandwidthError(f"cannot reach peer {url}: {exc.os_error.strerror or exc}") from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise BandwidthError(f"transfer with peer {url} failed: {reason}") from None
    return BandwidthFigures(peer=url, seconds=seconds, upload_mbps=upload, download_mbps=download)


async def _download_mbps(session: Any, url: str, seconds: float) -> float:
    async with session.get(url + DOWNLOAD_PATH, params={"seconds": f"{seconds:g}"}) as response:
        _check_peer_status(response.status, url, DOWNLOAD_PATH)
        counted, elapsed = await _receive_timed(
            response.content.iter_any(), MAX_TRANSFER_SECONDS
        )
    return _mbps(counted, elapsed, url, "download")


async def _upload_mbps(session: Any, url: str, seconds: float) -> float:
    async def stream() -> AsyncIterator[bytes]:
        payload = os.urandom(TRANSFER_CHUNK_BYTES)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            yield payload

    async with session.post(
        url + UPLOAD_PATH, data=stream(),
        headers={"Content-Type": "application/octet-stream"},
    ) as response:
        _check_peer_status(response.status, url, UPLOAD_PATH)
        try:
            report = await response.json()
            counted, elapsed = int(report["bytes"]), float(report["seconds"])
        except (ValueError, KeyError, TypeError):
            raise BandwidthError(
                f"peer {url} answered {UPLOAD_PATH} with something other than its "
                "byte count: is it `edgeweave profile-node --serve`?"
            ) from None
    return _mbps(counted, elapsed, url, "upload")


def _check_peer_status(status: int, url: str, path: str) -> None:
    if status != 200:
        raise BandwidthError(
            f"peer {url} answered HTTP {status} on {path}: "
            "is it `edgeweave profile-node --serve`?"
        )


def _mbps(counted: int, elapsed: float, url: str, direction: str) -> float:
    if counted <= 0 or elapsed <= 0:
        raise BandwidthError(
            f"the {direction} with peer {url} moved too little data to time: "
            "raise --bandwidth-seconds"
        )
    return counted * 8 / elapsed / 1e6


async def run_bandwidth_server(
    host: str, port: int, stop: asyncio.Event, on_ready: Callable[[str], None]
) -> None:
    """Serve :func:`bandwidth_app` on ``host:port`` until ``stop`` is set."""
    from aiohttp import web

    runner = web.AppRunner(bandwidth_app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise BandwidthError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        bound_host, bound_port = runner.addresses[0][:2]
        on_ready(f"http://{_url_host(bound_host)}:{bound_port}")
        await stop.wait()
    finally:
        await runner.cleanup()


def serve_bandwidth_forever(host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve the bandwidth endpoint until SIGINT or SIGTERM (a pod being stopped)."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_bandwidth_server(host, port, stop, on_ready)

    asyncio.run(serve())


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# =====================================================================  labels


def format_label_number(value: float) -> str:
    """Three significant figures as a plain decimal (label values cannot hold ``e+03``)."""
    if value >= 100:
        return str(round(value))
    decimals = 2 - math.floor(math.log10(value)) if value > 0 else 2
    text = f"{value:.{max(decimals, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class NodeProfile:
    """Everything measured, and the labels derived from it."""

    device_class: str
    device_class_source: str
    """``--device-class``, or the CPU model it was derived from."""
    arch: str
    cpu_model: str | None
    cpu: CpuShare
    compute: ComputeFigures
    memory: MemoryFigures
    bandwidth: BandwidthFigures | None
    bandwidth_mbps: float | None
    """The bandwidth label: measured (min of both directions) or given."""
    notes: tuple[str, ...] = ()

    def labels(self) -> dict[str, str]:
        labels = {
            LABEL_DEVICE_CLASS: self.device_class,
            LABEL_GFLOPS: format_label_number(self.compute.gflops),
            LABEL_MEMORY_MB: str(self.memory.usable_mb),
        }
        if self.bandwidth_mbps is not None:
            labels[LABEL_BANDWIDTH_MBPS] = format_label_number(self.bandwidth_mbps)
        return labels

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels(),
            "device_class": {
                "value": self.device_class,
                "source": self.device_class_source,
                "cpu_model": self.cpu_model,
                "arch": self.arch,
            },
            "cpu": {
                "affinity_cpus": self.cpu.affinity_cpus,
                "quota_cpus": self.cpu.quota_cpus,
                "cpus": self.cpu.cpus,
            },
            "compute": {**asdict(self.compute), "gflops": self.compute.gflops},
            "memory": {
                **asdict(self.memory),
                "usable_mb": self.memory.usable_mb,
            },
            "bandwidth": (
                None if self.bandwidth is None
                else {**asdict(self.bandwidth), "mbps": self.bandwidth.mbps}
            ),
            "bandwidth_mbps": self.bandwidth_mbps,
            "notes": list(self.notes),
        }


def profile_node(
    *,
    model: str = DEFAULT_MODEL,
    threads: int | None = None,
    seconds: float = DEFAULT_SECONDS,
    reserve_mb: float = DEFAULT_RESERVE_MB,
    peer: str | None = None,
    bandwidth_seconds: float = DEFAULT_BANDWIDTH_SECONDS,
    bandwidth_mbps: float | None = None,
    device_class: str | None = None,
    root: Path = Path("/"),
) -> NodeProfile:
    """Measure this machine: memory first (loading the model would eat into it), then
    bandwidth (a wrong --peer fails before the longest step), then compute."""
    if peer is not None and bandwidth_mbps is not None:
        raise NodeProfileError("give either --peer (to measure) or --bandwidth-mbps, not both")
    if bandwidth_mbps is not None and not (math.isfinite(bandwidth_mbps) and bandwidth_mbps > 0):
        raise NodeProfileError(f"--bandwidth-mbps must be positive, not {bandwidth_mbps:g}")
    arch = kubernetes_arch()
    model_name = cpu_model(root)
    if device_class is not None:
        check_label_value(device_class, "--device-class")
    chosen_class = device_class or default_device_class(root)

    memory = measure_memory(reserve_mb, root)
    bandwidth = (
        asyncio.run(measure_bandwidth(peer, bandwidth_seconds)) if peer is not None else None
    )
    cpu = read_cpu_share(root)
    compute = measure_gflops(model, threads=threads or cpu.threads, seconds=seconds)
    return NodeProfile(
        device_class=chosen_class,
        device_class_source="--device-class" if device_class else f"cpu model {model_name!r}",
        arch=arch,
        cpu_model=model_name,
        cpu=cpu,
        compute=compute,
        memory=memory,
        bandwidth=bandwidth,
        bandwidth_mbps=bandwidth.mbps if bandwidth is not None else bandwidth_mbps,
        notes=tuple(_notes(arch, cpu, compute, memory, peer, bandwidth_mbps)),
    )


def _notes(
    arch: str,
    cpu: CpuShare,
    compute: ComputeFigures,
    memory: MemoryFigures,
    peer: str | None,
    bandwidth_mbps: float | None,
) -> list[str]:
    notes: list[str] = []
    if peer is None and bandwidth_mbps is None:
        assumed = DEFAULT_BANDWIDTH_MBPS.get(arch, FALLBACK_BANDWIDTH_MBPS)
        notes.append(
            f"no {LABEL_BANDWIDTH_MBPS} label: bandwidth needs a peer (run "
            "`edgeweave profile-node --serve` on another node, then --peer URL here) or "
            f"--bandwidth-mbps; without it the planner assumes {assumed:g} Mbit/s for {arch}"
        )
    if cpu.quota_cpus is not None and cpu.quota_cpus < cpu.affinity_cpus:
        notes.append(
            f"a cgroup CPU quota of {cpu.quota_cpus:g} CPUs applies: GFLOPS describe this "
            "container's share, not the whole node"
        )
    if compute.threads > cpu.threads:
        notes.append(
            f"--threads {compute.threads} is more than the {cpu.cpus:g} CPUs this process "
            "may use: threads contend and GFLOPS come out low"
        )
    if memory.capped_by_cgroup:
        notes.append(
            f"memory is capped by this container's cgroup limit "
            f"({memory.cgroup_limit_mb:.0f} MiB), not the node's"
        )
    return notes


# =====================================================================  applying labels


def kubectl_label_command(node_name: str, labels: Mapping[str, str]) -> str:
    """A ``kubectl label`` line to paste; ``--overwrite`` so it also re-labels."""
    pairs = [shlex.quote(f"{key}={value}") for key, value in labels.items()]
    return " ".join(["kubectl", "label", "node", shlex.quote(node_name), "--overwrite", *pairs])


def resolve_node_name(node_name: str | None) -> str:
    """``--node-name``, else ``$NODE_NAME`` (a DaemonSet sets it from ``spec.nodeName``)."""
    name = (node_name or os.environ.get(NODE_NAME_ENV, "")).strip()
    if not name:
        raise LabelApplyError(
            f"--apply needs this node's name: give --node-name or set {NODE_NAME_ENV} "
            "(in a DaemonSet: env valueFrom fieldRef fieldPath spec.nodeName)"
        )
    return name


@dataclass(frozen=True)
class AppliedLabels:
    node: str
    server: str
    previous: Mapping[str, str | None]
    """The values the node had before, ``None`` where the label was absent."""
    labels: Mapping[str, str]


def apply_labels(
    node_name: str, labels: Mapping[str, str], api_client: Any = None
) -> AppliedLabels:
    """Merge ``labels`` (edgeweave.io ones only) into Node ``node_name``'s labels.

    A merge patch of ``metadata.labels`` touches only the keys it names, so the
    kubelet's and other tools' labels stay as they are. The client comes from the
    in-cluster service account, else ``$KUBECONFIG`` / ``~/.kube/config``.
    """
    foreign = sorted(key for key in labels if not key.startswith(LABEL_PREFIX))
    if foreign:
        raise LabelApplyError(f"refusing to set labels outside {LABEL_PREFIX}: {foreign}")
    try:
        from kubernetes import client
    except ImportError:
        raise LabelApplyError(
            "--apply needs the kubernetes client: pip install 'edgeweave[operator]'"
        ) from None
    api_client = api_client or _api_client()
    server = str(api_client.configuration.host)
    core = client.CoreV1Api(api_client)
    node = _call_api(lambda: core.read_node(node_name), node_name, server, "read")
    current = dict(node.metadata.labels or {})
    _call_api(
        lambda: core.patch_node(node_name, {"metadata": {"labels": dict(labels)}}),
        node_name, server, "patch",
    )
    return AppliedLabels(
        node=node_name,
        server=server,
        previous={key: current.get(key) for key in labels},
        labels=dict(labels),
    )


def _api_client() -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        kubeconfig = os.environ.get("KUBECONFIG") or None
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            where = kubeconfig or "~/.kube/config"
            raise LabelApplyError(
                f"no Kubernetes credentials: not in a pod, and {where} is not usable "
                f"({_first_line(exc)})"
            ) from None
    return client.ApiClient(configuration)


def _call_api(call: Callable[[], Any], node: str, server: str, verb: str) -> Any:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return call()
    except ApiException as exc:
        if exc.status == 404:
            raise LabelApplyError(f"node {node!r} not found in the cluster at {server}") from None
        if exc.status in (401, 403):
            raise LabelApplyError(
                f"forbidden to {verb} node {node!r} at {server} (HTTP {exc.status}): the "
                "service account needs get and patch on nodes (a ClusterRole)"
            ) from None
        raise LabelApplyError(
            f"the API at {server} refused to {verb} node {node!r}: HTTP {exc.status} "
            f"{exc.reason}"
        ) from None
    except HTTPError as exc:
        raise LabelApplyError(
            f"cannot reach the Kubernetes API at {server}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# =====================================================================  file helpers


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_number(path: Path) -> float | None:
    text = (_read_text(path) or "").strip()
    try:
        return float(text) if text else None
    except ValueError:
        return None

