"""``edgeweave profile-node --apply`` against the emulated Kubernetes API: it labels its
own Node, touches nothing but the ``edgeweave.io/*`` labels, and says in one line why
it cannot when it cannot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
from typer.testing import CliRunner

import edgeweave.cli.profile_node  # noqa: F401  (registers the command)
from edgeweave.cli import app
from edgeweave.partition.nodes import (
    LABEL_BANDWIDTH_MBPS,
    LABEL_DEVICE_CLASS,
    LABEL_GFLOPS,
    LABEL_MEMORY_MB,
)
from edgeweave.sandbox.apiserver import ApiServer

runner = CliRunner()
QUICK = ("--model", "zoo:mobilenet_v2", "--seconds", "0.01")
APPLY = ("profile-node", *QUICK, "--apply")
OTHER_LABELS = {"kubernetes.io/arch": "arm64", "kubernetes.io/hostname": "pi-1", "team": "edge"}


@pytest.fixture()
def cluster(
    api_server: ApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> ApiServer:
    """The emulated API holding Node ``pi-1``, reached as a user's KUBECONFIG reaches it."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.delenv("NODE_NAME", raising=False)
    api_server.create({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "pi-1",
            "labels": {**OTHER_LABELS, LABEL_GFLOPS: "1", LABEL_BANDWIDTH_MBPS: "42"},
        },
    })
    return api_server


def node_labels(api: ApiServer, name: str = "pi-1") -> dict[str, str]:
    node = api.get("v1", "Node", name)
    assert node is not None
    return dict(node["metadata"]["labels"])


def apply_json(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["profile-node", *QUICK, "--apply", "-o", "json", *args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def test_apply_labels_the_node_and_leaves_other_labels_alone(cluster: ApiServer) -> None:
    data = apply_json("--node-name", "pi-1", "--device-class", "rpi4")

    labels = node_labels(cluster)
    measured = data["labels"]
    assert {key: labels[key] for key in measured} == measured
    assert labels[LABEL_DEVICE_CLASS] == "rpi4"
    assert labels[LABEL_GFLOPS] != "1" and float(labels[LABEL_GFLOPS]) > 0
    assert int(labels[LABEL_MEMORY_MB]) > 0
    # not measured (no --peer): the bandwidth label the node had stays as it was
    assert labels[LABEL_BANDWIDTH_MBPS] == "42"
    assert {key: labels[key] for key in OTHER_LABELS} == OTHER_LABELS
    assert data["applied"]["node"] == "pi-1"
    assert data["applied"]["previous"][LABEL_GFLOPS] == "1"
    assert data["applied"]["previous"][LABEL_DEVICE_CLASS] is None


def test_node_name_comes_from_the_downward_api_env(
    cluster: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODE_NAME", "pi-1")
    apply_json("--bandwidth-mbps", "94.5")
    assert node_labels(cluster)[LABEL_BANDWIDTH_MBPS] == "94.5"


def test_table_output_says_what_changed(cluster: ApiServer) -> None:
    result = runner.invoke(app, ["profile-node", *QUICK, "--apply", "--node-name", "pi-1"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "labelled node pi-1" in result.stdout
    assert f"{LABEL_GFLOPS}: 1 → {node_labels(cluster)[LABEL_GFLOPS]}" in result.stdout


def test_unknown_node_is_named(cluster: ApiServer, cli_error_line: Callable[..., str]) -> None:
    line = cli_error_line(*APPLY, "--node-name", "ghost")
    assert "node 'ghost' not found" in line and cluster.url in line


def test_forbidden_patch_says_what_rbac_is_missing(
    cluster: ApiServer, cli_error_line: Callable[..., str]
) -> None:
    cluster.call(lambda api: api["patch", kmock.resource("v1/nodes")] << 403)
    line = cli_error_line(*APPLY, "--node-name", "pi-1")
    assert "forbidden to patch node 'pi-1'" in line and "patch on nodes" in line
    assert node_labels(cluster)[LABEL_GFLOPS] == "1"


def test_unreachable_api_and_missing_credentials(
    cluster: ApiServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, cli_error_line: Callable[..., str],
) -> None:
    gone = ApiServer()
    with gone:
        dead = gone.write_kubeconfig(tmp_path / "dead-kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(dead))
    line = cli_error_line(*APPLY, "--node-name", "pi-1")
    assert "cannot reach the Kubernetes API at http://127.0.0.1:" in line

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    line = cli_error_line(*APPLY, "--node-name", "pi-1")
    assert "no Kubernetes credentials" in line and "missing" in line


def test_daemonset_mode_labels_then_serves_until_stopped(
    cluster: ApiServer, kubeconfig: Path
) -> None:
    """What the node-profiler DaemonSet runs: label the pod's own node, stay up as a peer."""
    script = "import edgeweave.cli.profile_node; from edgeweave.cli import main; main()"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "NODE_NAME": "pi-1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    server = subprocess.Popen(
        [sys.executable, "-c", script, "profile-node", *QUICK, "--apply", "--serve",
         "--listen", "127.0.0.1:0", "--device-class", "rpi4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert server.stderr is not None
        announced = ""
        while "serving the bandwidth endpoint" not in announced:
            announced = server.stderr.readline()
            assert announced, "profile-node exited before serving"
        assert node_labels(cluster)[LABEL_DEVICE_CLASS] == "rpi4"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
