"""``edgeweave profile-node``: CPU share and memory from fake /proc and cgroup trees,
effective GFLOPS from real onnxruntime runs, bandwidth over loopback, and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from typer.testing import CliRunner

import edgeweave.cli.profile_node  # noqa: F401  (registers the command)
from edgeweave.cli import app
from edgeweave.nodeprofile import (
    NodeProfileError,
    check_label_value,
    default_device_class,
    find_cgroups,
    format_label_number,
    kubectl_label_command,
    measure_bandwidth,
    measure_gflops,
    measure_memory,
    read_cpu_share,
    run_bandwidth_server,
    slugify_device,
)
from edgeweave.partition.nodes import (
    LABEL_BANDWIDTH_MBPS,
    LABEL_DEVICE_CLASS,
    LABEL_GFLOPS,
    LABEL_MEMORY_MB,
    node_from_object,
)
from edgeweave.partition.source import load_model_profile

runner = CliRunner()
GIB = 2**30
QUICK = ("--model", "zoo:mobilenet_v2", "--seconds", "0.01")
PROFILE = ("profile-node", *QUICK)
"""The smallest budget: two warm-up runs and three timed ones of MobileNetV2."""


# --------------------------------------------------------------------- fake machines
class FakeMachine:
    """A directory laid out like ``/``: the /proc and /sys/fs/cgroup files we read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, path: str, text: str) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def mounts(self, *lines: str) -> None:
        self.write("/proc/self/mountinfo", "".join(line + "\n" for line in lines))

    def cgroup(self, *lines: str) -> None:
        self.write("/proc/self/cgroup", "".join(line + "\n" for line in lines))

    def meminfo(self, available_kib: int, total_kib: int = 8 * 1024 * 1024) -> None:
        self.write(
            "/proc/meminfo",
            f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\n"
            f"MemAvailable:   {available_kib} kB\nBuffers:        10 kB\n",
        )


V1_CPU_MOUNT = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct"
V1_MEMORY_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory"
V2_MOUNT = "41 31 0:38 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate"


@pytest.fixture()
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path)


def test_v1_quota_is_the_tightest_along_the_cgroups_ancestors(machine: FakeMachine) -> None:
    machine.mounts(V1_CPU_MOUNT)
    machine.cgroup("3:cpu,cpuacct:/kubepods/pod1/ctr")
    base = "/sys/fs/cgroup/cpu,cpuacct"
    machine.write(f"{base}/kubepods/pod1/ctr/cpu.cfs_quota_us", "150000\n")
    machine.write(f"{base}/kubepods/pod1/ctr/cpu.cfs_period_us", "100000\n")
    machine.write(f"{base}/kubepods/pod1/cpu.cfs_quota_us", "100000\n")  # the pod: 1 CPU
    machine.write(f"{base}/kubepods/pod1/cpu.cfs_period_us", "100000\n")
    machine.write(f"{base}/kubepods/cpu.cfs_quota_us", "-1\n")
    machine.write(f"{base}/kubepods/cpu.cfs_period_us", "100000\n")

    share = read_cpu_share(machine.root, affinity=4)
    assert share.quota_cpus == pytest.approx(1.0)
    assert (share.cpus, share.threads) == (1.0, 1)


def test_v1_container_without_cgroup_namespace_reads_its_mount_point(
    machine: FakeMachine,
) -> None:
    # Docker without cgroupns mounts the container's own cgroup with root /docker/abc.
    machine.mounts(V1_CPU_MOUNT.replace(" / /sys", " /docker/abc /sys"))
    machine.cgroup("3:cpu,cpuacct:/docker/abc")
    machine.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "250000")
    machine.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000")

    assert read_cpu_share(machine.root, affinity=4).quota_cpus == pytest.approx(2.5)
    assert read_cpu_share(machine.root, affinity=4).threads == 3  # a thread for the half CPU
    narrow = read_cpu_share(machine.root, affinity=2)  # a cpuset of 2 is tighter
    assert (narrow.cpus, narrow.threads) == (2.0, 2)


def test_v2_cpu_max_and_memory_max(machine: FakeMachine) -> None:
    machine.mounts(V2_MOUNT)
    machine.cgroup("0::/kubepods.slice/pod.slice")
    machine.write("/sys/fs/cgroup/kubepods.slice/pod.slice/cpu.max", "50000 100000\n")
    machine.write("/sys/fs/cgroup/kubepods.slice/pod.slice/memory.max", "max\n")
    machine.write("/sys/fs/cgroup/kubepods.slice/memory.max", f"{GIB}\n")
    machine.meminfo(available_kib=6 * 1024 * 1024)

    share = read_cpu_share(machine.root, affinity=8)
    assert (share.quota_cpus, share.threads) == (0.5, 1)
    memory = measure_memory(256, machine.root)
    assert memory.cgroup_limit_mb == 1024
    assert memory.usable_mb == 1024 - 256
    assert memory.capped_by_cgroup


def test_no_quota_means_every_cpu_in_the_affinity_mask(machine: FakeMachine) -> None:
    machine.mounts(V2_MOUNT)
    machine.cgroup("0::/")
    machine.write("/sys/fs/cgroup/cpu.max", "max 100000\n")
    share = read_cpu_share(machine.root, affinity=4)
    assert (share.quota_cpus, share.cpus, share.threads) == (None, 4.0, 4)


def test_hybrid_hierarchy_takes_limits_from_v1(machine: FakeMachine) -> None:
    """systemd's hybrid mode mounts an empty v2 tree beside the v1 controllers."""
    machine.mounts(V1_CPU_MOUNT, V1_MEMORY_MOUNT,
                   V2_MOUNT.replace("/sys/fs/cgroup ", "/sys/fs/cgroup/unified "))
    machine.cgroup("4:memory:/job", "3:cpu,cpuacct:/", "0::/")
    machine.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "300000")
    machine.write("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000")
    machine.write("/sys/fs/cgroup/memory/job/memory.limit_in_bytes", str(2 * GIB))
    machine.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")
    machine.meminfo(available_kib=7 * 1024 * 1024)

    cgroups = find_cgroups(machine.root)
    assert cgroups.chain("cpu")[0] == "v1"
    assert read_cpu_share(machine.root, affinity=4).quota_cpus == pytest.approx(3.0)
    assert measure_memory(0, machine.root).usable_mb == 2048


def test_unlimited_cgroup_leaves_mem_available_less_the_reserve(machine: FakeMachine) -> None:
    machine.mounts(V1_MEMORY_MOUNT)
    machine.cgroup("4:memory:/")
    machine.write("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")
    machine.meminfo(available_kib=3 * 1024 * 1024 + 512)
    memory = measure_memory(300, machine.root)
    assert memory.cgroup_limit_mb is None
    assert memory.usable_mb == 3072 - 300


def test_a_machine_without_cgroups_has_no_limits(machine: FakeMachine) -> None:
    machine.meminfo(available_kib=1024 * 1024)
    assert read_cpu_share(machine.root, affinity=3).quota_cpus is None
    assert measure_memory(0, machine.root).usable_mb == 1024


def test_reserve_larger_than_available_memory_is_an_error(machine: FakeMachine) -> None:
    machine.meminfo(available_kib=200 * 1024)
    with pytest.raises(NodeProfileError, match="only 200 MiB is available"):
        measure_memory(256, machine.root)


# --------------------------------------------------------------------- device class
@pytest.mark.parametrize(
    ("cpuinfo", "machine_name", "expected"),
    [
        ("processor\t: 0\nBogoMIPS\t: 108.00\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
         "aarch64", "raspberry-pi-4-model-b-arm64"),
        ("processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\n"
         "Model\t\t: Raspberry Pi 3 Model B Plus Rev 1.3\n",
         "armv7l", "raspberry-pi-3-model-b-plus-arm"),
        ("processor\t: 0\nmodel name\t: Intel(R) Core(TM) i5-8250U CPU @ 1.60GHz\n",
         "x86_64", "intel-core-i5-8250u-amd64"),
        ("processor\t: 0\n", "riscv64", "riscv64"),
    ],
)
def test_default_device_class_names_the_board_and_arch(
    machine: FakeMachine, cpuinfo: str, machine_name: str, expected: str
) -> None:
    machine.write("/proc/cpuinfo", cpuinfo)
    assert default_device_class(machine.root, machine_name) == expected


def test_device_tree_model_names_boards_whose_cpuinfo_does_not(machine: FakeMachine) -> None:
    machine.write("/proc/cpuinfo", "processor\t: 0\nBogoMIPS\t: 48.00\n")
    machine.write("/proc/device-tree/model", "Radxa ROCK 5 Model B\x00")
    assert default_device_class(machine.root, "aarch64") == "radxa-rock-5-model-b-arm64"


def test_a_long_model_name_still_makes_a_valid_label_value(machine: FakeMachine) -> None:
    machine.write("/proc/cpuinfo", "model name\t: " + "Very Long Vendor Name " * 6 + "\n")
    value = default_device_class(machine.root, "x86_64")
    assert len(value) <= 63 and value.endswith("-amd64")
    assert check_label_value(value, "class") == value
    assert slugify_device("AMD Ryzen 7 5800U with Radeon Graphics") == (
        "amd-ryzen-7-5800u-with-radeon-graphics"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [(1234.56, "1235"), (98.76, "98.8"), (100.0, "100"), (10.0, "10"), (3.456, "3.46"),
     (0.012345, "0.0123")],
)
def test_label_numbers_are_plain_decimals(value: float, text: str) -> None:
    assert format_label_number(value) == text
    assert node_from_object(
        {"metadata": {"name": "n", "labels": {LABEL_GFLOPS: text, LABEL_MEMORY_MB: "1"}}}
    ).gflops == pytest.approx(float(text))


# --------------------------------------------------------------------- compute
def test_gflops_are_the_profilers_flops_over_the_median_run() -> None:
    figures = measure_gflops("zoo:mobilenet_v2", threads=1, seconds=0.01)
    assert figures.flops == load_model_profile("zoo:mobilenet_v2").analysis.flops
    assert figures.runs >= 3 and figures.threads == 1
    assert figures.best_s <= figures.median_s
    assert figures.gflops == pytest.approx(figures.flops / figures.median_s / 1e9)
    assert figures.gflops > 0


def test_a_model_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a model")
    with pytest.raises(NodeProfileError, match=r"junk\.onnx is not an ONNX model"):
        measure_gflops(str(junk), threads=1, seconds=0.01)


# --------------------------------------------------------------------- bandwidth
class Peer:
    """A ``profile-node --serve`` endpoint on loopback, in a thread with its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete,
                                        args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        await run_bandwidth_server("127.0.0.1", 0, self._stop, self._on_ready)

    def _on_ready(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def __enter__(self) -> Peer:
        self._thread.start()
        assert self._ready.wait(30), "the bandwidth peer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.loop.close()


@pytest.fixture()
def peer() -> Iterator[Peer]:
    with Peer() as serving:
        yield serving


def test_loopback_peer_measures_both_directions(peer: Peer) -> None:
    figures = asyncio.run(measure_bandwidth(peer.url, seconds=0.3))
    assert figures.upload_mbps > 0 and figures.download_mbps > 0
    assert figures.mbps == min(figures.upload_mbps, figures.download_mbps)
    assert figures.peer == peer.url


def test_peer_refuses_unbounded_transfers(peer: Peer) -> None:
    async def ask(seconds: str) -> int:
        async with aiohttp.ClientSession() as session, session.get(
            f"{peer.url}/v1/download", params={"seconds": seconds}
        ) as response:
            return response.status

    assert asyncio.run(ask("3600")) == 400
    assert asyncio.run(ask("soon")) == 400


# --------------------------------------------------------------------- the command
def run_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["profile-node", *QUICK, "-o", "json", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def test_json_has_the_measured_labels() -> None:
    data = run_json("--device-class", "rpi4", "--threads", "1")
    labels = data["labels"]
    assert set(labels) == {LABEL_DEVICE_CLASS, LABEL_GFLOPS, LABEL_MEMORY_MB}
    assert labels[LABEL_DEVICE_CLASS] == "rpi4"
    assert float(labels[LABEL_GFLOPS]) > 0
    assert int(labels[LABEL_MEMORY_MB]) == data["memory"]["usable_mb"] > 0
    assert data["compute"]["threads"] == 1
    assert data["cpu"]["cpus"] >= 1
    assert data["bandwidth"] is None and data["applied"] is None
    assert any(LABEL_BANDWIDTH_MBPS in note for note in data["notes"])
    # the labels read back as a node the planner can use
    node = node_from_object({"metadata": {"name": "me", "labels": labels}})
    assert node.device_class == "rpi4" and node.memory_bytes > 0


def test_given_bandwidth_becomes_the_label() -> None:
    data = run_json("--bandwidth-mbps", "94.5")
    assert data["labels"][LABEL_BANDWIDTH_MBPS] == "94.5"
    assert data["bandwidth"] is None
    assert not any(LABEL_BANDWIDTH_MBPS in note for note in data["notes"])


def test_peer_option_measures_the_bandwidth_label(peer: Peer) -> None:
    data = run_json("--peer", peer.url, "--bandwidth-seconds", "0.3")
    measured = data["bandwidth"]
    assert measured["upload_mbps"] > 0 and measured["download_mbps"] > 0
    assert float(data["labels"][LABEL_BANDWIDTH_MBPS]) == pytest.approx(
        min(measured["upload_mbps"], measured["download_mbps"]), rel=0.01
    )


def test_labels_option_prints_a_kubectl_command() -> None:
    result = runner.invoke(
        app, ["profile-node", *QUICK, "--labels", "--node-name", "pi-7",
              "--bandwidth-mbps", "100", "--device-class", "rpi4"]
    )
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("kubectl label node pi-7 --overwrite ")
    assert f"{LABEL_DEVICE_CLASS}=rpi4" in lines[0]
    assert f"{LABEL_BANDWIDTH_MBPS}=100" in lines[0]
    assert f"{LABEL_GFLOPS}=" in lines[0] and f"{LABEL_MEMORY_MB}=" in lines[0]


def test_kubectl_command_quotes_what_a_shell_would_split() -> None:
    assert kubectl_label_command("odd name", {LABEL_DEVICE_CLASS: "x"}) == (
        f"kubectl label node 'odd name' --overwrite {LABEL_DEVICE_CLASS}=x"
    )


def test_errors_are_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, cli_error_line: Callable[..., str]
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert "--node-name" in cli_error_line(*PROFILE, "--apply")
    assert "not both" in cli_error_line(
        *PROFILE, "--peer", "http://127.0.0.1:9", "--bandwidth-mbps", "10"
    )
    assert "cannot reach peer http://127.0.0.1:9" in cli_error_line(
        *PROFILE, "--peer", "127.0.0.1:9", "--bandwidth-seconds", "0.2"
    )
    assert "'Pi 4!'" in cli_error_line(*PROFILE, "--device-class", "Pi 4!")
    assert "no model 'nope'" in cli_error_line("profile-node", "--model", "zoo:nope")
    assert "--listen" in cli_error_line("profile-node", "--serve", "--listen", "nowhere")


def test_a_peer_that_is_not_a_profiler_is_named(
    cli_error_line: Callable[..., str], peer: Peer
) -> None:
    line = cli_error_line(*PROFILE, "--peer", peer.url + "/elsewhere",
                          "--bandwidth-seconds", "0.2")
    assert "HTTP 404" in line and "profile-node --serve" in line


def test_serve_runs_until_sigterm_as_a_pod_is_stopped() -> None:
    """``--serve`` is what a peer node (or the DaemonSet) runs: a stop ends it cleanly."""
    script = ("import edgeweave.cli.profile_node; from edgeweave.cli import main; main()")
    server = subprocess.Popen(
        [sys.executable, "-c", script, "profile-node", "--serve", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stderr is not None
        announced = server.stderr.readline()
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", announced)
        assert found, announced
        figures = asyncio.run(measure_bandwidth(found.group(1), seconds=0.2))
        assert figures.mbps > 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
