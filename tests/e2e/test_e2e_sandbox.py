"""End to end (DESIGN §5, tier 4): kubectl apply, inference, node churn, operator restart.

The whole product on one machine: the emulated API, the controllers and pod runner of
:mod:`edgeweave.sandbox`, the real operator as its own process, stage workers and the
gateway as processes on emulated nodes. The figures the issue asks for (time to the
first answer served by the new plan after a node loss) are printed; run with ``-s``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from e2e_helpers import (
    NODES_FILE,
    NS,
    PIPELINE,
    PIPELINE_FILE,
    Cluster,
    Load,
    descendants,
    kubectl_apply,
    kubectl_delete_pipeline,
    process_alive,
    wait_for,
)

from edgeweave.sandbox.waiting import WaitTimeout
from edgeweave.worker.protocol import decode_infer_response, encode_infer_request

pytest.importorskip("kopf")
pytest.importorskip("onnxruntime")

OWNED_KINDS = [("v1", "Pod"), ("v1", "Service"), ("v1", "Secret"), ("v1", "ConfigMap"),
               ("apps/v1", "Deployment")]


def http_json(url: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, headers=headers or {},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def infer(endpoint: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    body, headers = encode_infer_request(inputs)
    status, payload, reply_headers = http_json(
        f"{endpoint}/v2/models/{PIPELINE}/infer", body, headers)
    assert status == 200, payload[:300]
    length = next((v for k, v in reply_headers.items()
                   if k.lower() == "inference-header-content-length"), None)
    return decode_infer_response(payload, length).outputs


def reference_outputs(model_cache: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unsplit model's answer, from the very file the operator planned."""
    import onnxruntime

    from edgeweave.modelstore import ModelStore

    model = ModelStore(model_cache).resolve("zoo:mobilenet_v2")
    session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def plan_nodes(status: dict[str, Any]) -> list[str]:
    return [node for stage in status["plan"]["stages"] for node in stage["nodes"]]


def snapshot(cluster: Cluster) -> dict[str, list[tuple[str, str]]]:
    return {kind: sorted((o["metadata"]["name"], o["metadata"]["uid"])
                         for o in cluster.owned(version, kind))
            for version, kind in OWNED_KINDS}


# --------------------------------------------------------------------------- scenarios


def test_kubectl_apply_serves_the_unsplit_models_answers(
    cluster: Cluster, model_cache: Path
) -> None:
    started = time.monotonic()
    kubectl_apply(cluster.kubeconfig, PIPELINE_FILE)
    status = cluster.wait_ready()
    print(f"\nFIGURE apply -> Ready: {time.monotonic() - started:.2f} s")
    assert len(status["plan"]["stages"]) >= 2, "40 MiB nodes cannot hold mobilenet_v2 whole"

    endpoint = status["endpoint"]  # as written: it must be reachable from this machine
    code, body, _ = http_json(f"{endpoint}/v2/models/{PIPELINE}")
    assert code == 200, body[:300]
    metadata = json.loads(body)
    spec = metadata["inputs"][0]
    shape = [1 if dim == -1 else dim for dim in spec["shape"]]
    inputs = {spec["name"]: np.random.default_rng(7).standard_normal(shape).astype(np.float32)}

    answer = infer(endpoint, inputs)
    expected = reference_outputs(model_cache, inputs)
    assert sorted(answer) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(answer[name], value, rtol=1e-3, atol=1e-4)
        assert int(np.argmax(answer[name])) == int(np.argmax(value))

    stage_pods = cluster.pods("edgeweave.io/component=stage")
    assert sorted(p["spec"]["nodeName"] for p in stage_pods) == sorted(plan_nodes(status))
    for pod in stage_pods:
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"]
    assert len(cluster.sandbox.pod_pids()) == len(stage_pods) + 1  # and the gateway


def test_losing_a_node_under_load_replans_without_a_failed_request(cluster: Cluster) -> None:
    kubectl_apply(cluster.kubeconfig, PIPELINE_FILE)
    first = cluster.wait_ready()
    gateway_node = cluster.gateway_node()
    single = [stage["nodes"][0] for stage in first["plan"]["stages"]
              if len(stage["nodes"]) == 1 and stage["nodes"][0] != gateway_node]
    assert single, f"no single-replica stage away from the gateway in {first['plan']}"
    victim = single[0]

    gateways = {p["metadata"]["uid"] for p in cluster.pods("edgeweave.io/component=gateway")}
    load = Load(first["endpoint"], PIPELINE).start()
    load.wait_answers(20)
    answered, lost_at = load.count, time.monotonic()
    cluster.sandbox.delete_node(victim)

    second = cluster.wait_ready(other_than=first["plan"]["hash"], timeout=90)
    load.wait_answers(20)
    recovery = load.first_answer_sent_after(lost_at, answered)
    result = load.stop()
    print(f"\nFIGURE node loss -> first answer served by the new plan: {recovery:.2f} s "
          f"({result.requests} requests, {result.errors} failed)")

    assert result.errors == 0, result.first_error
    assert victim not in plan_nodes(second)
    # The gateway that held the requests is the one that serves the new plan: it was
    # told where stage 0 went, not replaced.
    assert {p["metadata"]["uid"] for p in cluster.pods("edgeweave.io/component=gateway")
            } == gateways
    assert cluster.events("GatewaySwitched")
    replanned = cluster.events("Replanned")
    assert replanned and "NodeLost" in replanned[-1]["message"]
    wait_for(f"the pods of {victim} to be deleted",
             lambda: not [p for p in cluster.pods() if p["spec"].get("nodeName") == victim])


def test_restarting_the_operator_under_load_disturbs_nothing(plain_cluster: Cluster) -> None:
    cluster = plain_cluster
    kubectl_apply(cluster.kubeconfig, PIPELINE_FILE)
    status = cluster.wait_ready()
    before = snapshot(cluster)
    load = Load(status["endpoint"], PIPELINE).start()
    load.wait_answers(20)

    old_pid = cluster.sandbox.operator_pid
    cluster.sandbox.restart_operator()
    assert cluster.sandbox.operator_pid not in (None, old_pid)
    wait_for("the Resumed event", lambda: cluster.events("Resumed"), timeout=60)
    load.wait_answers(20)
    result = load.stop()

    assert result.errors == 0, result.first_error
    assert snapshot(cluster) == before, "the restarted operator created or replaced objects"
    assert cluster.status()["plan"]["hash"] == status["plan"]["hash"]
    assert cluster.condition("Ready").get("status") == "True"


def test_deleting_the_pipeline_stops_every_process_and_removes_every_object(
    plain_cluster: Cluster,
) -> None:
    cluster = plain_cluster
    kubectl_apply(cluster.kubeconfig, PIPELINE_FILE)
    status = cluster.wait_ready()
    pids = cluster.sandbox.pod_pids()
    assert pids and all(process_alive(pid) for pid in pids)
    assert any(PIPELINE in name for name in cluster.sandbox.services())

    kubectl_delete_pipeline(cluster.kubeconfig, PIPELINE)
    wait_for("the pipeline to go", lambda: cluster.pipeline() is None)
    for version, kind in OWNED_KINDS:
        try:
            wait_for(f"{kind}s to go", lambda v=version, k=kind: not cluster.owned(v, k))
        except WaitTimeout:
            left = [(o["metadata"]["name"], o["metadata"].get("deletionTimestamp"),
                     o["metadata"].get("finalizers"), o.get("status"))
                    for o in cluster.owned(version, kind)]
            raise AssertionError(f"{kind}s left after the pipeline was deleted: {left}"
                                 ) from None
    wait_for("every pod process to exit", lambda: not any(process_alive(p) for p in pids))
    assert cluster.sandbox.pod_pids() == []
    wait_for("the Services to be unpublished",
             lambda: not any(PIPELINE in name for name in cluster.sandbox.services()))
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{status['endpoint']}/v2/health/live", timeout=5)


# --------------------------------------------------------------------------- the command


def _api_get(kubeconfig: Path, path: str) -> dict[str, Any] | None:
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    try:
        with urllib.request.urlopen(server + path, timeout=10) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _netns() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def test_sandbox_up_runs_in_the_foreground_and_leaves_nothing_after_sigterm(
    mode: str, tmp_path: Path, model_cache: Path
) -> None:
    kubeconfig = tmp_path / "kube" / "config"
    namespaces_before = _netns() if mode == "emulated" else set()
    script = "import edgeweave.cli.sandbox; from edgeweave.cli import main; main()"
    flag = "--emulate" if mode == "emulated" else "--no-emulate"
    with (tmp_path / "sandbox.out").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", script, "sandbox", "up", "--nodes", str(NODES_FILE),
             "--kubeconfig", str(kubeconfig), flag, "--cache-dir", str(model_cache)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        )
    try:
        wait_for("the kubeconfig", kubeconfig.exists, timeout=60)
        kubectl_apply(kubeconfig, PIPELINE_FILE)
        path = f"/apis/edgeweave.io/v1alpha1/namespaces/{NS}/inferencepipelines/{PIPELINE}"

        def ready() -> bool:
            conditions = ((_api_get(kubeconfig, path) or {}).get("status") or {}).get(
                "conditions") or []
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        wait_for("the pipeline to be Ready", ready, timeout=120)
        tree = descendants(process.pid)
        assert len(tree) >= 5, "the operator, two stages' three pods and the gateway run"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    output = (tmp_path / "sandbox.out").read_text()
    assert code == 0, output[-3000:]
    assert "sandbox stopped" in output
    wait_for("every process of the sandbox to exit",
             lambda: not [pid for pid in tree if process_alive(pid)], timeout=30)
    if mode == "emulated":
        assert _netns() - namespaces_before == set()
