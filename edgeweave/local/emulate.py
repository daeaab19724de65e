"""Turn this one machine into several emulated edge nodes (root, Linux).

``edgeweave run --emulate`` and the e2e sandbox use this to hold each planned node to
its own CPU share and network bandwidth, so that a pipeline measured on one machine
behaves like the cluster the planner priced (DESIGN §1: a node's compute and its
full-duplex NIC overlap, each bounded by the node's figures).

Topology of one :class:`EdgeEmulator` with id ``ewXXXXXX`` and subnet ``S`` (a free
/24 from ``subnet_pool``, 10.213.0.0/16 by default)::

    root namespace (the host)                     node i (network namespace ewXXXXXX-i)
    bridge ewXXXXXX-br, address S.1 ──┬── veth ewXXXXXX-hi ═══ eth0, address S.(i+2)
                                      └── ...                  default route via S.1

* The host is ``S.1``: a server on the host must listen on that address (or on
  0.0.0.0) for nodes to reach it; ``127.0.0.1`` inside a node is the node's own
  loopback. Nodes reach one another over the bridge (layer 2, so the host needs no
  IP forwarding), and the host reaches every node at ``S.(i+2)``. (On a host that
  loads ``br_netfilter`` and drops forwarded packets in iptables, as Docker hosts
  do, node-to-node traffic needs an ACCEPT rule for the bridge; host<->node does not.)
* Each veth end has a ``tbf`` egress qdisc at the node's bandwidth: the host-side end
  shapes traffic *into* the node, the namespace end traffic *out of* it, so each
  direction gets the full rate, like a full-duplex NIC. Node-to-node traffic passes
  both nodes' shapers and so runs at the slower of the two. The rate is the line
  rate, as on a real NIC: tbf counts whole Ethernet frames, so bulk TCP goodput is
  about 95.6% of it (1448 payload bytes per 1514-byte frame at MTU 1500).
* Each node has a cgroup v1 CPU group ``<cpu mount>/edgeweave/ewXXXXXX-i`` with
  ``cfs_quota_us = cpu * cfs_period_us``. Processes join it *before* their program
  starts (a ``sh`` wrapper writes its own pid, then ``exec``s), so no instruction of
  theirs runs unthrottled, and every child they fork inherits the group —
  :meth:`EmulatedNode.kill_all` can therefore find and kill everything a node runs.

Kernel names carry the emulator's random id rather than node names: interface names
are limited to 15 bytes, node names are not, and concurrent emulators (parallel test
runs) must never collide. A small state file per emulator under
``/run/edgeweave/emulate`` records its owner process, so :func:`cleanup_stale` can
tell the leftovers of a crashed run from the resources of a live one.

The API is synchronous: every call is a handful of short ``ip``/``tc`` commands.
From asyncio, run :meth:`EdgeEmulator.start`, :meth:`EdgeEmulator.close` and
:meth:`EmulatedNode.kill_all` via ``asyncio.to_thread``, and start processes with
``asyncio.create_subprocess_exec(*node.command(argv))``.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from edgeweave.errors import EdgeweaveError

logger = logging.getLogger(__name__)

DEFAULT_SUBNET_POOL = "10.213.0.0/16"
DEFAULT_NAME_PREFIX = "ew"
STATE_DIR = Path("/run/edgeweave/emulate")
CGROUP_GROUP = "edgeweave"
CFS_PERIOD_US = 100_000
# The kernel refuses quotas below 1 ms per period.
MIN_CFS_QUOTA_US = 1_000
# Two full 64 KiB GSO packets: a smaller bucket makes tbf split every GSO packet.
TBF_MIN_BURST_BYTES = 128 * 1024
# A bucket of 4 ms of traffic (the rate/HZ rule at HZ=250) keeps Gbit/s rates reachable.
TBF_BURST_SECONDS = 0.004
# Queue depth in time: deep enough that TCP through a slower peer's shaper rarely
# drops, shallow enough not to add bufferbloat the cost model doesn't know about.
TBF_LATENCY = "50ms"
KILL_GRACE_S = 2.0
KILL_HARD_TIMEOUT_S = 5.0
COMMAND_TIMEOUT_S = 30.0
# Linux IFNAMSIZ - 1; the longest name we make is "<id>-h<index>".
MAX_INTERFACE_NAME = 15
ID_HEX_DIGITS = 6
MAX_NODES = 253  # hosts .2 .. .254 of a /24


class EmulationError(EdgeweaveError):
    """Edge-node emulation could not be set up, used or torn down."""


@dataclass(frozen=True)
class NodeSpec:
    """What to emulate for one node: its CPU share and its NIC bandwidth."""

    name: str
    cpu: float
    """CPU cores this node may use (0.5 = half of one core; may exceed 1)."""
    bandwidth_bytes_per_s: float | None = None
    """Rate each direction of the node's link is held to; ``None`` leaves it unshaped."""

    def __post_init__(self) -> None:
        if not self.name:
            raise EmulationError("an emulated node needs a name")
        if not math.isfinite(self.cpu) or self.cpu * CFS_PERIOD_US < MIN_CFS_QUOTA_US:
            raise EmulationError(
                f"node {self.name!r}: cpu must be at least "
                f"{MIN_CFS_QUOTA_US / CFS_PERIOD_US} cores, got {self.cpu}"
            )
        bandwidth = self.bandwidth_bytes_per_s
        if bandwidth is not None and not (math.isfinite(bandwidth) and bandwidth >= 1):
            raise EmulationError(
                f"node {self.name!r}: bandwidth must be at least 1 byte/s, got {bandwidth}"
            )


# ---------------------------------------------------------------------------- commands


def run_command(argv: Sequence[str]) -> str:
    """Run one system command; failure becomes an :class:`EmulationError` naming it."""
    shown = shlex.join(argv)
    try:
        done = subprocess.run(
            list(argv), check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
    except FileNotFoundError as exc:
        raise EmulationError(f"`{shown}` failed: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(f"`{shown}` did not finish in {COMMAND_TIMEOUT_S:.0f} s") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip() or "no output"
        raise EmulationError(f"`{shown}` failed (exit {exc.returncode}): {detail}") from exc
    return done.stdout


def tbf_arguments(rate_bytes_per_s: float) -> list[str]:
    """The ``tc qdisc add ... root`` arguments that hold a link to ``rate_bytes_per_s``."""
    rate_bits = max(8, round(rate_bytes_per_s * 8))
    burst = max(TBF_MIN_BURST_BYTES, math.ceil(rate_bytes_per_s * TBF_BURST_SECONDS))
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(burst), "latency", TBF_LATENCY]


def _json_command(argv: Sequence[str]) -> list[dict[str, Any]]:
    out = run_command(argv).strip()
    return json.loads(out) if out else []


def _netns_names() -> list[str]:
    return [entry["name"] for entry in _json_command(["ip", "-j", "netns", "list"])]


def _link_names() -> list[str]:
    return [entry["ifname"] for entry in _json_command(["ip", "-j", "link", "show"])]


# ------------------------------------------------------------------------------ cgroups


def cpu_cgroup_root() -> Path | None:
    """Mount point of the cgroup v1 hierarchy that holds the ``cpu`` controller."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
    except OSError:
        return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "cpu" in fields[3].split(","):
            return Path(fields[1])
    return None


def _cgroup_parent() -> Path | None:
    root = cpu_cgroup_root()
    return None if root is None else root / CGROUP_GROUP


def _cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise EmulationError(f"cannot read the processes of cgroup {cgroup}: {exc}") from exc


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait_until_empty(cgroup: Path, timeout_s: float, reap: list[subprocess.Popen[Any]]) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        for child in reap:
            child.poll()
        if not _cgroup_pids(cgroup):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _kill_cgroup(
    cgroup: Path, grace_s: float, reap: list[subprocess.Popen[Any]] | None = None
) -> int:
    """SIGTERM every process in ``cgroup``, SIGKILL what is left after ``grace_s``."""
    reap = reap if reap is not None else []
    victims = _cgroup_pids(cgroup)
    if not victims:
        return 0
    _signal_all(victims, signal.SIGTERM)
    if _wait_until_empty(cgroup, grace_s, reap):
        return len(victims)
    # Repeat SIGKILL: a process may fork between our reading the list and the signal.
    deadline = time.monotonic() + KILL_HARD_TIMEOUT_S
    while time.monotonic() < deadline:
        _signal_all(_cgroup_pids(cgroup), signal.SIGKILL)
        if _wait_until_empty(cgroup, 0.1, reap):
            return len(victims)
    raise EmulationError(
        f"processes {_cgroup_pids(cgroup)} in cgroup {cgroup} survived SIGKILL "
        f"for {KILL_HARD_TIMEOUT_S:.0f} s"
    )


def _remove_cgroup(cgroup: Path) -> None:
    # A process killed a moment ago may still be leaving the group: retry EBUSY briefly.
    deadline = time.monotonic() + KILL_HARD_TIMEOUT_S
    while True:
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise EmulationError(f"cannot remove cgroup {cgroup}: {exc}") from exc
            time.sleep(0.05)


# ----------------------------------------------------------------- ownership and state


def _process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): tells a live owner from pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after "(comm)"; starttime is field 22 of proc(5), i.e. the 20th of these.
    return int(stat.rsplit(")", 1)[1].split()[19])


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    """Serialise id and subnet choice and teardown across processes (flock)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _state_path(emu_id: str) -> Path:
    return STATE_DIR / f"{emu_id}.json"


def _read_state(emu_id: str) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(emu_id).read_text())
    except (OSError, ValueError):
        return None


def _owner_alive(state: dict[str, Any] | None) -> bool:
    if state is None:
        return False
    pid, start = state.get("owner_pid"), state.get("owner_start")
    return isinstance(pid, int) and start is not None and _process_start_ticks(pid) == start


def _write_state(emu_id: str, subnet: str, node_names: Sequence[str]) -> None:
    pid = os.getpid()
    state = {
        "id": emu_id,
        "owner_pid": pid,
        "owner_start": _process_start_ticks(pid),
        "subnet": subnet,
        "nodes": list(node_names),
    }
    temporary = _state_path(emu_id).with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(_state_path(emu_id))


def _id_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^({re.escape(prefix)}[0-9a-f]{{{ID_HEX_DIGITS}}})(?:-|\.json$)")


def _ids_in(names: Sequence[str], prefix: str) -> set[str]:
    pattern = _id_pattern(prefix)
    return {match.group(1) for name in names if (match := pattern.match(name))}


def _known_ids(prefix: str) -> set[str]:
    """Every emulator id that owns a state file, a namespace, a link or a cgroup."""
    names = [*_netns_names(), *_link_names()]
    if STATE_DIR.is_dir():
        names += [path.name for path in STATE_DIR.iterdir()]
    parent = _cgroup_parent()
    if parent is not None and parent.is_dir():
        names += [path.name for path in parent.iterdir() if path.is_dir()]
    return _ids_in(names, prefix)


def _teardown(emu_id: str) -> list[str]:
    """Remove everything named after ``emu_id``; return what could not be removed."""
    problems: list[str] = []
    parent = _cgroup_parent()
    cgroups = sorted(parent.glob(f"{emu_id}-*")) if parent is not None else []
    for cgroup in cgroups:
        try:
            _kill_cgroup(cgroup, KILL_GRACE_S)
        except EmulationError as exc:
            problems.append(str(exc))
    # Deleting a host-side veth also deletes its namespace end at once, whereas a
    # namespace's own devices go away asynchronously after `ip netns del`.
    links = [name for name in _link_names() if name.startswith(f"{emu_id}-")]
    for link in sorted(links, key=lambda name: name.endswith("-br")):
        _delete_if_present(["ip", "link", "del", link], _link_names, link, problems)
    for netns in [name for name in _netns_names() if name.startswith(f"{emu_id}-")]:
        _delete_if_present(["ip", "netns", "del", netns], _netns_names, netns, problems)
    for cgroup in cgroups:
        try:
            _remove_cgroup(cgroup)
        except EmulationError as exc:
            problems.append(str(exc))
    _state_path(emu_id).unlink(missing_ok=True)
    _state_path(emu_id).with_suffix(".tmp").unlink(missing_ok=True)
    if parent is not None:
        with contextlib.suppress(OSError):  # still in use by another emulator
            parent.rmdir()
    return problems


def _delete_if_present(
    argv: Sequence[str], listing: Callable[[], list[str]], name: str, problems: list[str]
) -> None:
    try:
        run_command(argv)
    except EmulationError as exc:
        if name in listing():
            problems.append(str(exc))


def cleanup_stale(prefix: str = DEFAULT_NAME_PREFIX) -> list[str]:
    """Remove what crashed emulators left behind; return the ids removed.

    An emulator is stale when the process that created it is gone (pid and start
    time no longer match), or when its resources have no state file at all (its
    state directory lived on a tmpfs that was cleared). Live emulators, including
    other concurrent test runs, are never touched.
    """
    removed: list[str] = []
    failures: list[str] = []
    with _state_lock():
        for emu_id in sorted(_known_ids(prefix)):
            if _owner_alive(_read_state(emu_id)):
                continue
            problems = _teardown(emu_id)
            if problems:
                failures.append(f"stale emulator {emu_id}: {'; '.join(problems)}")
            else:
                removed.append(emu_id)
    if failures:
        raise EmulationError(f"cleaning up {' | '.join(failures)}")
    return removed


# --------------------------------------------------------------------- availability


def emulation_available() -> tuple[bool, str]:
    """Whether :class:`EdgeEmulator` can work here, and if not, why (one line)."""
    if not hasattr(os, "geteuid") or not Path("/proc/self/ns/net").exists():
        return False, "edge-node emulation needs Linux with network namespaces"
    if os.geteuid() != 0:
        return False, f"edge-node emulation needs root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc", "sh"):
        if shutil.which(tool) is None:
            package = "iproute2" if tool in ("ip", "tc") else "a POSIX shell"
            return False, f"edge-node emulation needs `{tool}` on PATH (install {package})"
    root = cpu_cgroup_root()
    if root is None:
        return False, (
            "edge-node emulation needs the cgroup v1 `cpu` controller mounted "
            "(this system has none; cgroup v2-only systems are not supported)"
        )
    if not os.access(root, os.W_OK):
        return False, f"edge-node emulation needs a writable cgroup v1 cpu hierarchy at {root}"
    return True, f"network namespaces, tc tbf and cgroup v1 cpu quotas at {root}"


# ---------------------------------------------------------------------------- nodes


@dataclass(eq=False)
class EmulatedNode:
    """One running emulated node: where it lives and how to run processes in it."""

    name: str
    index: int
    cpu: float
    bandwidth_bytes_per_s: float | None
    address: str
    """This node's IPv4 address; other nodes and the host reach it here."""
    netns: str
    cgroup: Path
    host_interface: str
    """The host-side veth end (its egress shapes traffic into the node)."""
    _children: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this node's namespace and CPU cgroup.

        The wrapper shell moves itself into the cgroup, then ``exec``s ``ip netns
        exec``, which ``exec``s ``argv``: one pid throughout, so signals sent to the
        returned process reach the program itself. If the cgroup is gone the
        program does not start at all rather than run unthrottled. ``ip netns exec``
        gives the program a private ``/sys`` showing the node's own interfaces.
        """
        if not argv:
            raise EmulationError(f"node {self.name!r}: no command to run")
        if not self.cgroup.is_dir():
            raise EmulationError(f"node {self.name!r} is not running (its emulator was closed)")
        procs = str(self.cgroup / "cgroup.procs")
        wrapper = 'echo $$ > "$0" && exec "$@"'
        return ["sh", "-c", wrapper, procs, "ip", "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on this node; ``kwargs`` go to :class:`subprocess.Popen`."""
        self._children = [child for child in self._children if child.poll() is None]
        child = subprocess.Popen(self.command(argv), **kwargs)
        self._children.append(child)
        return child

    def pids(self) -> list[int]:
        """Every live process on this node, including ones its processes forked."""
        return _cgroup_pids(self.cgroup)

    def kill_all(self, grace_s: float = KILL_GRACE_S) -> int:
        """Emulate this node failing: SIGTERM, then SIGKILL, everything it runs.

        Returns how many processes were running. Blocks until none are left.
        """
        killed = _kill_cgroup(self.cgroup, grace_s, self._children)
        self._reap_children()
        return killed

    def _reap_children(self) -> None:
        for child in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        self._children = [child for child in self._children if child.returncode is None]


# ------------------------------------------------------------------------- emulator


class EdgeEmulator:
    """Several emulated edge nodes on this machine; a context manager.

    ``with EdgeEmulator([NodeSpec("pi-1", cpu=1.0, bandwidth_bytes_per_s=12.5e6)]) as emu:
    emu.node("pi-1").popen([...])``. Starting first removes stale leftovers of
    crashed runs (:func:`cleanup_stale`); closing kills every process the nodes run
    and removes every namespace, link, qdisc and cgroup it made, and is idempotent.
    """

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        *,
        subnet_pool: str = DEFAULT_SUBNET_POOL,
        name_prefix: str = DEFAULT_NAME_PREFIX,
    ) -> None:
        self._specs = list(nodes)
        self._pool = _parse_pool(subnet_pool)
        self._prefix = _check_prefix(name_prefix, len(self._specs))
        _check_node_names(self._specs)
        self.id: str | None = None
        self.subnet: ipaddress.IPv4Network | None = None
        self.nodes: list[EmulatedNode] = []
        self._started = False
        self._closed = False

    # -- lifecycle

    def start(self) -> Self:
        """Create the bridge, then each node's namespace, shaped link and cgroup."""
        if self._started:
            raise EmulationError("this EdgeEmulator was already started; make a new one")
        available, reason = emulation_available()
        if not available:
            raise EmulationError(reason)
        self._started = True
        try:
            cleanup_stale(self._prefix)
        except EmulationError as exc:
            # A leftover we cannot remove (an unkillable process, say) must not stop
            # every later run: our names and subnet avoid it anyway.
            logger.warning("%s", exc)
        try:
            with _state_lock():
                self._claim_id_and_subnet()
                self._create_bridge()
                for index, spec in enumerate(self._specs):
                    self.nodes.append(self._create_node(index, spec))
        except BaseException:
            with contextlib.suppress(EmulationError):
                self.close()
            raise
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Kill every node's processes and remove everything :meth:`start` made."""
        if self._closed or not self._started:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems: list[str] = []
        for node in self.nodes:
            try:
                node.kill_all()
            except EmulationError as exc:
                problems.append(str(exc))
        if self.id is not None:
            with _state_lock():
                problems += _teardown(self.id)
        if problems:
            raise EmulationError(f"closing emulator {self.id}: {'; '.join(problems)}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- lookups

    @property
    def host_address(self) -> str:
        """The host's address on the emulated network: listen here to serve the nodes."""
        return str(self._subnet_required()[1])

    @property
    def bridge(self) -> str:
        return f"{self._id_required()}-br"

    def node(self, name: str) -> EmulatedNode:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes) or "none"
        raise EmulationError(f"no emulated node named {name!r} (nodes: {known})")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        nodes = len(self._specs)
        return f"EdgeEmulator(id={self.id}, subnet={self.subnet}, nodes={nodes}, {state})"

    # -- construction steps (called with the state lock held)

    def _claim_id_and_subnet(self) -> None:
        known = _known_ids(self._prefix)
        emu_id = f"{self._prefix}{secrets.token_hex(ID_HEX_DIGITS // 2)}"
        while emu_id in known:
            emu_id = f"{self._prefix}{secrets.token_hex(ID_HEX_DIGITS // 2)}"
        self.subnet = _free_subnet(self._pool)
        # Written before any resource exists, so a crash at any later point leaves
        # resources that cleanup_stale can attribute to a dead owner.
        _write_state(emu_id, str(self.subnet), [spec.name for spec in self._specs])
        self.id = emu_id

    def _create_bridge(self) -> None:
        bridge, subnet = self.bridge, self._subnet_required()
        run_command(["ip", "link", "add", bridge, "type", "bridge"])
        run_command(["ip", "addr", "add", f"{subnet[1]}/{subnet.prefixlen}", "dev", bridge])
        run_command(["ip", "link", "set", bridge, "up"])

    def _create_node(self, index: int, spec: NodeSpec) -> EmulatedNode:
        emu_id, subnet = self._id_required(), self._subnet_required()
        parent = _cgroup_parent()
        assert parent is not None  # emulation_available() checked the mount
        node = EmulatedNode(
            name=spec.name,
            index=index,
            cpu=spec.cpu,
            bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s,
            address=str(subnet[index + 2]),
            netns=f"{emu_id}-{index}",
            cgroup=parent / f"{emu_id}-{index}",
            host_interface=f"{emu_id}-h{index}",
        )
        self._create_namespace_and_link(node, subnet)
        if node.bandwidth_bytes_per_s is not None:
            self._shape_link(node, node.bandwidth_bytes_per_s)
        _create_cpu_cgroup(node.cgroup, node.cpu)
        return node

    def _create_namespace_and_link(self, node: EmulatedNode, subnet: ipaddress.IPv4Network) -> None:
        ns, host_if = node.netns, node.host_interface
        run_command(["ip", "netns", "add", ns])
        run_command(["ip", "-n", ns, "link", "set", "lo", "up"])
        run_command(
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns]
        )
        run_command(["ip", "link", "set", host_if, "master", self.bridge])
        run_command(["ip", "link", "set", host_if, "up"])
        run_command(
            ["ip", "-n", ns, "addr", "add", f"{node.address}/{subnet.prefixlen}", "dev", "eth0"]
        )
        run_command(["ip", "-n", ns, "link", "set", "eth0", "up"])
        run_command(["ip", "-n", ns, "route", "add", "default", "via", self.host_address])

    def _shape_link(self, node: EmulatedNode, rate: float) -> None:
        tbf = tbf_arguments(rate)
        run_command(["tc", "qdisc", "add", "dev", node.host_interface, "root", *tbf])
        run_command(["tc", "-n", node.netns, "qdisc", "add", "dev", "eth0", "root", *tbf])

    def _id_required(self) -> str:
        if self.id is None:
            raise EmulationError("the emulator is not started")
        return self.id

    def _subnet_required(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise EmulationError("the emulator is not started")
        return self.subnet


# -------------------------------------------------------------------- small helpers


def _create_cpu_cgroup(cgroup: Path, cpu: float) -> None:
    try:
        cgroup.parent.mkdir(exist_ok=True)
        cgroup.mkdir()
        (cgroup / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        quota = max(MIN_CFS_QUOTA_US, round(cpu * CFS_PERIOD_US))
        (cgroup / "cpu.cfs_quota_us").write_text(str(quota))
    except OSError as exc:
        raise EmulationError(f"cannot set up cgroup {cgroup}: {exc}") from exc


def _parse_pool(pool: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.ip_network(pool)
    except ValueError as exc:
        raise EmulationError(f"subnet pool {pool!r} is not a network: {exc}") from exc
    if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 24:
        raise EmulationError(f"subnet pool {pool!r} must be an IPv4 network of /24 or larger")
    return network


def _check_prefix(prefix: str, node_count: int) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
        raise EmulationError(f"name prefix {prefix!r} must be lowercase letters and digits")
    if node_count > MAX_NODES:
        raise EmulationError(f"at most {MAX_NODES} emulated nodes fit one /24, got {node_count}")
    longest = len(f"{prefix}{'0' * ID_HEX_DIGITS}-h{max(node_count - 1, 0)}")
    if longest > MAX_INTERFACE_NAME:
        raise EmulationError(
            f"name prefix {prefix!r} is too long: interface names would reach {longest} "
            f"characters (Linux allows {MAX_INTERFACE_NAME})"
        )
    return prefix


def _check_node_names(specs: Sequence[NodeSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise EmulationError(f"two emulated nodes are named {spec.name!r}")
        seen.add(spec.name)


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this host has an address in or a route to, in any table."""
    in_use: list[ipaddress.IPv4Network] = []
    for entry in _json_command(["ip", "-j", "-4", "addr", "show"]):
        for info in entry.get("addr_info", []):
            in_use.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", False))
    for route in _json_command(["ip", "-j", "-4", "route", "show", "table", "all"]):
        destination = route.get("dst", "default")
        if destination == "default":
            continue
        with contextlib.suppress(ValueError):
            in_use.append(ipaddress.IPv4Network(destination, strict=False))
    for state_file in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, KeyError):
            in_use.append(ipaddress.IPv4Network(json.loads(state_file.read_text())["subnet"]))
    return in_use


def _free_subnet(pool: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    in_use = _networks_in_use()
    for candidate in pool.subnets(new_prefix=24):
        if not any(candidate.overlaps(network) for network in in_use):
            return candidate
    raise EmulationError(
        f"no free /24 left in subnet pool {pool} (every one overlaps an address or route "
        "on this host); pass another subnet_pool"
    )


# ---------------------------------------------------------- measuring what a node gets
#
# How closely a node is held to its NodeSpec, measured from inside it: the kernel's
# shaping, not edgeweave's code, decides these figures. benchmarks/emulate.py tabulates
# them over a range of rates and shares; tests/dataplane/test_emulate.py checks them.

# A TCP sink: prints its port, then "<bytes after the first read> <seconds>" at EOF.
# Timing starts at the first byte so that connection setup does not count.
_SINK = r"""
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.recv(1 << 16)
start, total = time.monotonic(), 0
while chunk := conn.recv(1 << 20):
    total += len(chunk)
print(total, time.monotonic() - start, flush=True)
"""

# Sends argv[3] zero bytes to argv[1]:argv[2], a 1 MiB block at a time, so that a long
# measurement does not need its whole transfer in memory.
_SEND = r"""
import socket, sys
remaining, block = int(sys.argv[3]), bytes(1 << 20)
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
    while remaining > 0:
        conn.sendall(block[: min(remaining, len(block))])
        remaining -= len(block)
"""

# Spins for argv[1] seconds, then prints "<CPU seconds it got> <wall seconds>".
_SPIN = r"""
import os, sys, time
duration = float(sys.argv[1])
wall0, cpu0 = time.monotonic(), os.times()
while time.monotonic() - wall0 < duration:
    pass
cpu1 = os.times()
print(cpu1.user + cpu1.system - cpu0.user - cpu0.system, time.monotonic() - wall0, flush=True)
"""

# Generous: a measurement that takes this much longer than planned has hung.
MEASUREMENT_SLACK_S = 120.0


def start_python(place: EmulatedNode | None, code: str, *args: object) -> subprocess.Popen[str]:
    """``python -c code args...`` on ``place`` (``None``: the host), stdout piped as text."""
    argv = [sys.executable, "-c", code, *map(str, args)]
    if place is None:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    return place.popen(argv, stdout=subprocess.PIPE, text=True)


def transfer_rate(
    emulator: EdgeEmulator,
    source: EmulatedNode | None,
    target: EmulatedNode | None,
    nbytes: int,
    *,
    timeout_s: float = 600.0,
) -> float:
    """Bytes/s of goodput a bulk TCP transfer of ``nbytes`` from ``source`` to ``target``
    (``None``: the host) achieves, counted at the receiver from its first byte.

    Into or out of a node this is its shaped rate (about 95.6% of the line rate, see
    the module docstring); node to node, the slower of the two.
    """
    address = emulator.host_address if target is None else target.address
    started: list[subprocess.Popen[str]] = []
    try:
        sink = start_python(target, _SINK, address)
        started.append(sink)
        port = _read_port(sink, _place(target))
        sender = start_python(source, _SEND, address, port, nbytes)
        started.append(sender)
        # The sender first: if it fails, the sink would wait for its connection forever.
        if sender.wait(timeout=timeout_s) != 0:
            raise EmulationError(
                f"bulk transfer {_place(source)} -> {_place(target)}: the sender failed "
                f"(exit {sender.returncode})"
            )
        out, _ = sink.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(
            f"bulk transfer {_place(source)} -> {_place(target)} of {nbytes} bytes did not "
            f"finish in {timeout_s:.0f} s"
        ) from exc
    finally:
        _stop(started)
    received, seconds = _numbers(out, f"the sink on {_place(target)}")
    return received / seconds


def processes_to_saturate(cpu: float) -> int:
    """Spinning processes enough for ``cpu`` cores: one per core the quota allows, so
    that the quota, not the process count, is what limits them."""
    return max(1, math.ceil(cpu))


def cpu_share(node: EmulatedNode, seconds: float, processes: int | None = None) -> float:
    """CPU cores ``node`` actually gets: the CPU seconds ``processes`` spinning for
    ``seconds`` on it are given, per wall second (default: enough to saturate its quota).

    A quota is a ceiling, not a reservation: the machine's other load lowers this.
    """
    count = processes_to_saturate(node.cpu) if processes is None else processes
    spinners = [start_python(node, _SPIN, seconds) for _ in range(count)]
    try:
        outputs = [spinner.communicate(timeout=seconds + MEASUREMENT_SLACK_S)[0]
                   for spinner in spinners]
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(
            f"node {node.name!r}: spinning for {seconds} s did not finish in "
            f"{seconds + MEASUREMENT_SLACK_S:.0f} s"
        ) from exc
    finally:
        _stop(spinners)
    figures = [_numbers(out, f"a spinning process on node {node.name!r}") for out in outputs]
    return sum(used for used, _ in figures) / max(wall for _, wall in figures)


def _place(node: EmulatedNode | None) -> str:
    return "the host" if node is None else f"node {node.name!r}"


def _read_port(process: subprocess.Popen[str], where: str) -> int:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.isdigit():
        raise EmulationError(f"the TCP sink on {where} did not start (it printed {line!r})")
    return int(line)


def _numbers(output: str, who: str) -> tuple[float, float]:
    """The two figures a measuring process prints last."""
    words = output.split()
    try:
        first, second = (float(word) for word in words[-2:])
    except ValueError as exc:
        raise EmulationError(f"{who} printed {output.strip()!r}, not two figures") from exc
    if second <= 0:
        raise EmulationError(f"{who} measured over {second} s")
    return first, second


def _stop(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Kill what a failed measurement left running; reap everything."""
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()
