"""Emulated edge nodes: namespaces reach each other, links are shaped, CPU is capped,
failures can be injected, and nothing is left behind.

Needs root, iproute2 and a cgroup v1 cpu hierarchy; skipped with the reason otherwise.
The bandwidth and CPU checks are functional checks of the kernel's shaping (generous
bounds around the requested figures), not timing assertions on edgeweave's code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeweave.errors import EdgeweaveError
from edgeweave.local.emulate import (
    STATE_DIR,
    EdgeEmulator,
    EmulatedNode,
    EmulationError,
    NodeSpec,
    cleanup_stale,
    cpu_cgroup_root,
    cpu_share,
    emulation_available,
    run_command,
    start_python,
    transfer_rate,
)

AVAILABLE, REASON = emulation_available()
needs_emulation = pytest.mark.skipif(not AVAILABLE, reason=REASON)

RATE_BYTES_PER_S = 10e6  # 80 Mbit/s
TRANSFER_BYTES = 8 * 2**20

ECHO_SERVER = r"""
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"echo:" + conn.recv(100))
"""

ASK = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as conn:
    conn.sendall(sys.argv[3].encode())
    print(conn.recv(100).decode(), flush=True)
"""


@pytest.fixture(scope="module")
def emulator() -> Iterator[EdgeEmulator]:
    specs = [
        NodeSpec("pi-a", cpu=0.5, bandwidth_bytes_per_s=RATE_BYTES_PER_S),
        NodeSpec("pi-b", cpu=1.0, bandwidth_bytes_per_s=RATE_BYTES_PER_S),
    ]
    with EdgeEmulator(specs) as emu:
        yield emu


def first_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return process.stdout.readline().strip()


def emulator_resources(emu_id: str) -> list[str]:
    """Every namespace, link, cgroup and state file still named after ``emu_id``."""
    netns = run_command(["ip", "netns", "list"]).split()
    links = [link["ifname"] for link in json.loads(run_command(["ip", "-j", "link", "show"]))]
    cgroup_parent = (cpu_cgroup_root() or Path("/nonexistent")) / "edgeweave"
    cgroups = [p.name for p in cgroup_parent.iterdir()] if cgroup_parent.is_dir() else []
    state = [p.name for p in STATE_DIR.iterdir()] if STATE_DIR.is_dir() else []
    return [name for name in [*netns, *links, *cgroups, *state] if name.startswith(emu_id)]


@needs_emulation
def test_nodes_get_distinct_addresses_on_the_emulator_subnet(emulator: EdgeEmulator) -> None:
    assert emulator.subnet is not None
    addresses = [emulator.host_address, *(node.address for node in emulator.nodes)]
    assert len(set(addresses)) == 3
    assert all(ipaddress.ip_address(address) in emulator.subnet for address in addresses)


@needs_emulation
def test_a_node_reaches_another_node_and_the_host(emulator: EdgeEmulator) -> None:
    node_a, node_b = emulator.node("pi-a"), emulator.node("pi-b")
    server_b = start_python(node_b, ECHO_SERVER, node_b.address)
    server_host = start_python(None, ECHO_SERVER, emulator.host_address)
    try:
        port_b, port_host = first_line(server_b), first_line(server_host)
        to_b = start_python(node_a, ASK, node_b.address, port_b, "from-a")
        to_host = start_python(node_a, ASK, emulator.host_address, port_host, "from-a")
        assert to_b.communicate(timeout=10)[0].strip() == "echo:from-a"
        assert to_host.communicate(timeout=10)[0].strip() == "echo:from-a"
        # ...and the host reaches a service inside a node.
        with socket.create_connection((node_b.address, int(port_b)), timeout=5) as conn:
            conn.sendall(b"from-host")
            assert conn.recv(100) == b"echo:from-host"
    finally:
        server_host.kill()
        server_host.wait()
        node_b.kill_all()


@needs_emulation
def test_a_node_is_isolated_from_the_hosts_loopback(emulator: EdgeEmulator) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        probe = start_python(emulator.node("pi-a"), ASK, "127.0.0.1", port, "x")
        probe.communicate(timeout=10)
        assert probe.returncode != 0  # connection refused: 127.0.0.1 is the node's own
    finally:
        listener.close()


@needs_emulation
def test_traffic_into_a_node_is_held_to_its_bandwidth(emulator: EdgeEmulator) -> None:
    rate = transfer_rate(emulator, None, emulator.node("pi-b"), TRANSFER_BYTES)
    assert 0.75 * RATE_BYTES_PER_S <= rate <= 1.25 * RATE_BYTES_PER_S, rate


@needs_emulation
def test_traffic_out_of_a_node_is_held_to_its_bandwidth(emulator: EdgeEmulator) -> None:
    rate = transfer_rate(emulator, emulator.node("pi-a"), None, TRANSFER_BYTES)
    assert 0.75 * RATE_BYTES_PER_S <= rate <= 1.25 * RATE_BYTES_PER_S, rate


@needs_emulation
def test_a_half_core_node_gets_about_half_a_core(emulator: EdgeEmulator) -> None:
    node = emulator.node("pi-a")
    throttled_before = _cpu_stat(node)["nr_throttled"]
    share = cpu_share(node, 3.0)
    assert 0.3 <= share <= 0.7, share
    assert _cpu_stat(node)["nr_throttled"] > throttled_before  # the quota actually bit


def _cpu_stat(node: EmulatedNode) -> dict[str, int]:
    lines = (node.cgroup / "cpu.stat").read_text().splitlines()
    return {key: int(value) for key, value in (line.split() for line in lines)}


@needs_emulation
def test_kill_all_kills_every_process_of_the_node_and_only_it(emulator: EdgeEmulator) -> None:
    node_a, node_b = emulator.node("pi-a"), emulator.node("pi-b")
    # A child that forks a grandchild, and one that ignores SIGTERM.
    forking = node_a.popen(["sh", "-c", "sleep 300 & sleep 300"])
    stubborn = start_python(
        node_a,
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ready', flush=True); time.sleep(300)",
    )
    assert first_line(stubborn) == "ready"
    bystander = node_b.popen(["sleep", "300"])
    try:
        _wait_for(lambda: len(node_a.pids()) >= 3)
        assert node_a.kill_all(grace_s=0.5) >= 3
        assert node_a.pids() == []
        assert forking.poll() is not None
        assert stubborn.poll() == -signal.SIGKILL
        assert bystander.poll() is None and node_b.pids() == [bystander.pid]
    finally:
        node_b.kill_all()
    assert bystander.poll() == -signal.SIGTERM


def _wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@needs_emulation
def test_close_removes_everything_and_is_idempotent() -> None:
    emu = EdgeEmulator([NodeSpec("n1", cpu=1.0, bandwidth_bytes_per_s=1e6), NodeSpec("n2", 0.2)])
    emu.start()
    assert emu.id is not None
    sleeper = emu.node("n1").popen(["sleep", "300"])
    assert len(emulator_resources(emu.id)) >= 7  # 2 netns, bridge, 2 veths, 2 cgroups, state
    emu.close()
    assert emulator_resources(emu.id) == []
    assert sleeper.poll() is not None
    emu.close()
    with pytest.raises(EmulationError, match="closed"):
        emu.node("n1").popen(["true"])


@needs_emulation
def test_two_emulators_at_once_do_not_collide(emulator: EdgeEmulator) -> None:
    with EdgeEmulator([NodeSpec("pi-a", cpu=0.5)]) as second:
        assert second.id != emulator.id
        assert second.subnet is not None and emulator.subnet is not None
        assert not second.subnet.overlaps(emulator.subnet)
        for emu in (emulator, second):
            server = start_python(None, ECHO_SERVER, emu.host_address)
            try:
                port = first_line(server)
                asked = start_python(emu.node("pi-a"), ASK, emu.host_address, port, "hi")
                assert asked.communicate(timeout=10)[0].strip() == "echo:hi"
            finally:
                server.kill()
                server.wait()
    assert emulator.id is not None and len(emulator_resources(emulator.id)) >= 7


@needs_emulation
def test_an_exhausted_subnet_pool_is_a_clear_error(emulator: EdgeEmulator) -> None:
    crowded = EdgeEmulator([NodeSpec("x", cpu=0.5)], subnet_pool=str(emulator.subnet))
    with pytest.raises(EmulationError, match=f"no free /24 left in subnet pool {emulator.subnet}"):
        crowded.start()


@needs_emulation
def test_leftovers_of_a_crashed_run_are_cleaned_up() -> None:
    crashed = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from edgeweave.local import EdgeEmulator, NodeSpec\n"
            "emu = EdgeEmulator([NodeSpec('lost', cpu=0.3, bandwidth_bytes_per_s=1e6)]).start()\n"
            "emu.node('lost').popen(['sleep', '300'])\n"
            "print(emu.id, flush=True)\n"
            "time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    emu_id = first_line(crashed)
    assert emu_id and emulator_resources(emu_id)
    assert emu_id not in cleanup_stale()  # its owner is alive: not stale
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    assert emu_id in cleanup_stale()
    assert emulator_resources(emu_id) == []


@needs_emulation
def test_a_failed_command_reports_the_command_and_its_stderr() -> None:
    with pytest.raises(EmulationError, match=r"`ip link del ew-no-such-link` failed.*ew-no-such"):
        run_command(["ip", "link", "del", "ew-no-such-link"])


def test_bad_node_specs_are_user_errors() -> None:
    with pytest.raises(EdgeweaveError, match="'pi-1': cpu must be at least"):
        NodeSpec("pi-1", cpu=0)
    with pytest.raises(EdgeweaveError, match="'pi-1': bandwidth"):
        NodeSpec("pi-1", cpu=1, bandwidth_bytes_per_s=0)
    with pytest.raises(EdgeweaveError, match="two emulated nodes are named 'pi-1'"):
        EdgeEmulator([NodeSpec("pi-1", cpu=1), NodeSpec("pi-1", cpu=1)])
    with pytest.raises(EdgeweaveError, match="subnet pool"):
        EdgeEmulator([NodeSpec("pi-1", cpu=1)], subnet_pool="10.213.0.0/28")


def test_without_root_emulation_is_unavailable_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert emulation_available() == (
        False,
        "edge-node emulation needs root (running as uid 1000)",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="the root check answers first")
def test_without_iproute2_emulation_is_unavailable_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    available, reason = emulation_available()
    assert not available
    assert reason == "edge-node emulation needs `ip` on PATH (install iproute2)"
