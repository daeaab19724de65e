"""The sandbox's own parts, without the operator: controllers, kubelet, Service relay.

A Deployment of ``edgeweave profile-node --serve`` (a small HTTP server with
``/healthz``) stands in for any workload: these tests check what a cluster does
with it — pods scheduled and run as processes with their environment and volumes,
readiness from the probe, a Service that reaches them, a rolling update, a crash
loop, a lost node — as a user would see it through the API and the processes.
"""

from __future__ import annotations

import copy
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import NODES_FILE, NS, process_alive, wait_for

from edgeweave.sandbox.sandbox import Sandbox, SandboxOptions, read_nodes_file

pytest.importorskip("kopf")
pytest.importorskip("onnxruntime")

PORT = 8099
APP = {"app": "demo"}


def deployment(replicas: int = 2, **env: str) -> dict[str, Any]:
    variables = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "demo", "key": "token"}}},
        {"name": "GREETING_FILE", "value": "/etc/demo/greeting"},
        {"name": "PEER", "value": "http://demo.default.svc.cluster.local:8099/healthz"},
        *({"name": k, "value": v} for k, v in env.items()),
    ]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "demo", "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": APP},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": APP},
                "spec": {
                    "containers": [{
                        "name": "serve",
                        "image": "ghcr.io/edgeweave/worker:test",
                        "command": ["edgeweave"],
                        "args": ["profile-node", "--serve", "--listen", f"0.0.0.0:{PORT}"],
                        "env": variables,
                        "ports": [{"name": "http", "containerPort": PORT}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                                           "periodSeconds": 1},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/demo"}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "demo"}}],
                },
            },
        },
    }


OBJECTS = [
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo", "namespace": NS},
     "stringData": {"token": "s3cret"}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "demo", "namespace": NS},
     "data": {"greeting": "hello from the configmap"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo", "namespace": NS},
     "spec": {"selector": APP, "ports": [{"port": PORT, "targetPort": "http"}]}},
]


@pytest.fixture
def sandbox(mode: str, tmp_path: Path) -> Iterator[Sandbox]:
    options = SandboxOptions(nodes=read_nodes_file(NODES_FILE), emulate=mode == "emulated",
                             run_dir=tmp_path / "sandbox", operator=False)
    with Sandbox(options) as running:
        yield running


def pods(sandbox: Sandbox) -> list[dict[str, Any]]:
    return sandbox.api.list("v1", "Pod", NS, "app=demo")


def ready_pods(sandbox: Sandbox, count: int) -> list[dict[str, Any]] | None:
    found = [p for p in pods(sandbox)
             if any(c["type"] == "Ready" and c["status"] == "True"
                    for c in (p.get("status") or {}).get("conditions") or [])]
    return found if len(found) == count and len(pods(sandbox)) == count else None


def environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def container_pid(pod: dict[str, Any]) -> int:
    container_id = pod["status"]["containerStatuses"][0]["containerID"]
    return int(container_id.removeprefix("sandbox://"))


def healthz(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status


def test_a_deployment_runs_as_ready_processes_behind_its_service(sandbox: Sandbox) -> None:
    sandbox.api.apply([*OBJECTS, deployment()])
    running = wait_for("two Ready pods", lambda: ready_pods(sandbox, 2))

    assert len({p["spec"]["nodeName"] for p in running}) == 2, "spread over two nodes"
    assert len({p["status"]["podIP"] for p in running}) == 2, "an address per pod"
    for pod in running:
        env = environment(container_pid(pod))
        assert env["POD_IP"] == pod["status"]["podIP"]
        assert env["NODE"] == pod["spec"]["nodeName"]
        assert env["POD"] == pod["metadata"]["name"]
        assert env["SECRET"] == "s3cret"
        assert Path(env["GREETING_FILE"]).read_text() == "hello from the configmap"
        assert "svc.cluster.local" not in env["PEER"], "cluster names resolve to addresses"
        assert healthz(env["PEER"]) == 200
        assert healthz(f"http://{pod['status']['podIP']}:{PORT}/healthz") == 200

    status = wait_for("the Deployment's status", lambda: (sandbox.api.get(
        "apps/v1", "Deployment", "demo", NS) or {}).get("status", {}).get("availableReplicas")
        == 2 and sandbox.api.get("apps/v1", "Deployment", "demo", NS)["status"])
    assert status["updatedReplicas"] == 2 and status["replicas"] == 2
    service_url = sandbox.reachable(f"http://demo.{NS}.svc.cluster.local:{PORT}/healthz")
    assert healthz(service_url) == 200


def test_a_new_template_rolls_out_and_the_old_pods_go(sandbox: Sandbox) -> None:
    sandbox.api.apply([*OBJECTS, deployment()])
    old = {p["metadata"]["uid"] for p in wait_for("two Ready pods",
                                                  lambda: ready_pods(sandbox, 2))}
    old_pids = [container_pid(p) for p in pods(sandbox)]

    sandbox.api.apply([deployment(COLOUR="blue")])

    def rolled() -> list[dict[str, Any]] | None:
        found = ready_pods(sandbox, 2)
        return found if found and not {p["metadata"]["uid"] for p in found} & old else None

    new = wait_for("the new pods to replace the old", rolled)
    assert all(environment(container_pid(p))["COLOUR"] == "blue" for p in new)
    wait_for("the old processes to exit", lambda: not any(process_alive(p) for p in old_pids))
    status = sandbox.api.get("apps/v1", "Deployment", "demo", NS)["status"]  # type: ignore[index]
    assert status["updatedReplicas"] == 2


def test_a_lost_node_takes_its_processes_and_its_pods_move(sandbox: Sandbox) -> None:
    sandbox.api.apply([*OBJECTS, deployment()])
    running = wait_for("two Ready pods", lambda: ready_pods(sandbox, 2))
    victim = running[0]
    pid = container_pid(victim)
    lost = victim["spec"]["nodeName"]

    sandbox.delete_node(lost)
    wait_for(f"the process on {lost} to die", lambda: not process_alive(pid), timeout=10)

    def moved() -> list[dict[str, Any]] | None:
        found = ready_pods(sandbox, 2)
        return found if found and all(p["spec"]["nodeName"] != lost for p in found) else None

    replaced = wait_for("a replacement pod on a live node", moved)
    assert victim["metadata"]["uid"] not in {p["metadata"]["uid"] for p in replaced}


def test_a_not_ready_node_stops_its_pods_at_once(sandbox: Sandbox) -> None:
    sandbox.api.apply([*OBJECTS, deployment(replicas=1)])
    pod = wait_for("a Ready pod", lambda: ready_pods(sandbox, 1))[0]
    pid = container_pid(pod)
    sandbox.set_node_ready(pod["spec"]["nodeName"], False)
    wait_for("the process to die", lambda: not process_alive(pid), timeout=10)

    def marked() -> bool:
        current = sandbox.api.get("v1", "Pod", pod["metadata"]["name"], NS)
        if current is None:
            return True  # already evicted
        return any(c["type"] == "Ready" and c["status"] == "False"
                   for c in current["status"].get("conditions") or [])

    wait_for("the pod to be marked not Ready or evicted", marked, timeout=10)


def _pod(name: str, command: list[str], args: list[str], restart: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS},
            "spec": {"nodeName": "edge-a", "restartPolicy": restart,
                     "containers": [{"name": "main", "image": "x", "command": command,
                                     "args": args}]}}


def _container_status(sandbox: Sandbox, name: str) -> dict[str, Any]:
    pod = sandbox.api.get("v1", "Pod", name, NS) or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return statuses[0]


def test_a_crashing_container_is_restarted_with_a_backoff(sandbox: Sandbox) -> None:
    # `edgeweave worker` without its required options exits with a usage error.
    sandbox.api.create(_pod("crash", ["edgeweave"], ["worker"], "Always"))
    status = wait_for("two restarts", lambda: _container_status(sandbox, "crash").get(
        "restartCount", 0) >= 2 and _container_status(sandbox, "crash"), timeout=30)
    assert status["lastState"]["terminated"]["exitCode"] != 0

    sandbox.api.create(_pod("once", ["edgeweave"], ["worker"], "Never"))
    wait_for("phase Failed", lambda: ((sandbox.api.get("v1", "Pod", "once", NS) or {})
                                      .get("status") or {}).get("phase") == "Failed")
    assert _container_status(sandbox, "once")["restartCount"] == 0


def test_a_container_that_is_not_edgeweave_is_refused_with_the_reason(sandbox: Sandbox) -> None:
    sandbox.api.create(_pod("nginx", ["nginx"], ["-g", "daemon off;"], "Always"))
    waiting = wait_for("the refusal", lambda: _container_status(sandbox, "nginx").get(
        "state", {}).get("waiting", {}).get("reason") == "CreateContainerError"
        and _container_status(sandbox, "nginx")["state"]["waiting"])
    assert "only edgeweave commands" in waiting["message"]
    assert sandbox.pod_pids() == []


def test_pods_wait_for_the_names_they_need(sandbox: Sandbox) -> None:
    manifest = copy.deepcopy(deployment(replicas=1))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "LATER",
                             "value": "http://later.default.svc.cluster.local:80/"})
    sandbox.api.apply([*OBJECTS, manifest])
    waiting = wait_for("the pod to wait for the Service", lambda: next(
        (s for p in pods(sandbox) for s in (p.get("status") or {}).get("containerStatuses") or []
         if "later.default.svc" in s.get("state", {}).get("waiting", {}).get("message", "")),
        None))
    assert waiting["state"]["waiting"]["reason"] == "ContainerCreating"
    sandbox.api.create({"apiVersion": "v1", "kind": "Service",
                        "metadata": {"name": "later", "namespace": NS},
                        "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]}})
    pod = wait_for("the pod to start once the name resolves", lambda: ready_pods(sandbox, 1))[0]
    assert os.path.exists(f"/proc/{container_pid(pod)}")
