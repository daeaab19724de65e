"""The real operator (kopf, in a thread) against the emulated Kubernetes API.

No kubelet or controller runs in the emulator, so a small stand-in (:class:`Kubelet`)
does their part: it marks a pod Ready while its node is Ready, and reports a
Deployment rolled out. Every wait polls the API for a condition with a deadline;
nothing sleeps for a fixed time. The figures the issue asks for (apply → Planned,
node loss → new plan's pods) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeweave.operator import operate
from edgeweave.operator import settings as s
from edgeweave.operator.resources import pod_ready
from edgeweave.sandbox.apiserver import ApiServer
from edgeweave.sandbox.waiting import wait_until as wait_for

pytest.importorskip("kopf")

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "inferencepipelines.edgeweave.io.yaml"
API = "edgeweave.io/v1alpha1"
KIND = "InferencePipeline"
NS = "default"


# --------------------------------------------------------------------------- helpers




def node(name: str, *, gflops: float = 10, memory_mb: float = 40, **labels: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "edgeweave.io/device-class": "pi",
            "edgeweave.io/gflops": str(gflops),
            "edgeweave.io/memory-mb": str(memory_mb),
            "edgeweave.io/bandwidth-mbps": "1000",
            **labels,
        }},
        "status": {
            "allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }


def pipeline(name: str, **spec: Any) -> dict:
    return {
        "apiVersion": API,
        "kind": KIND,
        "metadata": {"name": name, "namespace": NS},
        "spec": {"model": {"uri": "zoo:mobilenet_v2"}, **spec},
    }


@dataclass
class Cluster:
    api: ApiServer
    root: Path

    def pipeline(self, name: str) -> dict | None:
        return self.api.get(API, KIND, name, NS)

    def condition(self, name: str, kind: str) -> dict | None:
        obj = self.pipeline(name) or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), None)

    def plan(self, name: str) -> dict | None:
        return ((self.pipeline(name) or {}).get("status") or {}).get("plan")

    def owned(self, api_version: str, kind: str, name: str) -> list[dict]:
        return self.api.list(api_version, kind, NS, f"{s.LABEL_PIPELINE}={name}")

    def stage_pods(self, name: str, plan_hash: str | None = None) -> list[dict]:
        selector = f"{s.LABEL_PIPELINE}={name},{s.LABEL_COMPONENT}={s.COMPONENT_STAGE}"
        if plan_hash:
            selector += f",{s.LABEL_PLAN_HASH}={plan_hash}"
        return self.api.list("v1", "Pod", NS, selector)

    def events(self, name: str, reason: str) -> list[dict]:
        return [
            event for event in self.api.list("v1", "Event", NS)
            if event.get("involvedObject", {}).get("name") == name and event.get("reason") == reason
        ]

    def wait_planned(self, name: str, timeout: float = 90.0) -> dict:
        def planned() -> dict | None:
            condition = self.condition(name, "Planned")
            return condition if condition and condition["status"] == "True" else None

        wait_for(f"{name} Planned", planned, timeout)
        return self.plan(name) or {}

    def wait_reason(self, name: str, kind: str, reason: str, timeout: float = 90.0) -> dict:
        def matching() -> dict | None:
            condition = self.condition(name, kind)
            return condition if condition and condition["reason"] == reason else condition and None

        return wait_for(f"{name} {kind}={reason}", matching, timeout)

    def wait_ready(self, name: str, timeout: float = 90.0) -> None:
        wait_for(f"{name} Ready", lambda: (self.condition(name, "Ready") or {}).get("status")
                 == "True", timeout)


class Kubelet:
    """Plays kubelet and Deployment controller: pods are Ready while their node is."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self._tick()
            except Exception:  # the API may be shutting down at the end of a test
                continue

    def _tick(self) -> None:
        ready_nodes = {
            n["metadata"]["name"] for n in self.api.list("v1", "Node")
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (n.get("status") or {}).get("conditions") or [])
        }
        for pod in self.api.list("v1", "Pod"):
            should = pod["spec"].get("nodeName") in ready_nodes
            if should != pod_ready(pod):
                state = "True" if should else "False"
                self.api.patch_status("v1", "Pod", pod["metadata"]["name"], {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": state},
                                   {"type": "ContainersReady", "status": state}],
                }, pod["metadata"]["namespace"])
        for deployment in self.api.list("apps/v1", "Deployment"):
            generation = deployment["metadata"].get("generation", 1)
            replicas = deployment["spec"].get("replicas", 1)
            status = deployment.get("status") or {}
            if status.get("observedGeneration") != generation or status.get(
                    "availableReplicas") != replicas:
                self.api.patch_status("apps/v1", "Deployment", deployment["metadata"]["name"], {
                    "observedGeneration": generation, "replicas": replicas,
                    "updatedReplicas": replicas, "readyReplicas": replicas,
                    "availableReplicas": replicas,
                }, deployment["metadata"]["namespace"])


class RunningOperator:
    """``edgeweave operator`` in a thread, stopped through kopf's stop flag."""

    def __init__(self, cache_dir: Path) -> None:
        self.config = s.OperatorConfig(cache_dir=cache_dir, shard_listen_host="127.0.0.1",
                                       shard_port=0, shard_base_url="http://127.0.0.1:8081",
                                       resync_interval_s=5.0)
        self.stop_flag = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(operate(config=self.config, stop_flag=self.stop_flag))
        except BaseException as error:  # reported by stop()
            self.failure = error

    def start(self) -> RunningOperator:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.failure is None, f"the operator failed: {self.failure!r}"


@pytest.fixture
def cluster(
    api_server: ApiServer, kubeconfig: Path, pipeline_crd: dict, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Cluster]:
    """The emulated API (conftest) with the CRD installed and a kubelet stand-in."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    kubelet = Kubelet(api_server)
    kubelet.thread.start()
    try:
        yield Cluster(api_server, tmp_path)
    finally:
        kubelet.stop.set()
        kubelet.thread.join(10)


@pytest.fixture
def operator(cluster: Cluster) -> Iterator[RunningOperator]:
    running = RunningOperator(cluster.root / "cache").start()
    yield running
    running.stop()


def plan_nodes(plan: dict) -> list[str]:
    return [n for stage in plan["stages"] for n in stage["nodes"]]


# --------------------------------------------------------------------------- scenarios


def test_apply_plans_and_pins_one_owned_pod_per_replica(
    cluster: Cluster, operator: RunningOperator
) -> None:
    for i in range(3):
        cluster.api.create(node(f"pi-{i}"))
    started = time.monotonic()
    created = cluster.api.create(pipeline("vision"))
    plan = cluster.wait_planned("vision")
    print(f"\nFIGURE apply -> Planned: {time.monotonic() - started:.2f} s")
    uid = created["metadata"]["uid"]

    assert len(plan["stages"]) >= 2, "40 MiB nodes cannot hold mobilenet_v2 in one stage"
    pods = wait_for("stage pods", lambda: cluster.stage_pods("vision", plan["hash"]))
    expected = sorted((str(i), n) for i, stage in enumerate(plan["stages"])
                      for n in stage["nodes"])
    assert sorted((p["metadata"]["labels"][s.LABEL_STAGE], p["spec"]["nodeName"])
                  for p in pods) == expected
    for pod in pods:
        owners = pod["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [(KIND, uid, True)]
        stage = pod["metadata"]["labels"][s.LABEL_STAGE]
        assert pod["metadata"]["name"].startswith(f"vision-s{stage}-")

    # ConfigMaps: the plan and the gateway's stage-0 route.
    for api_version, kind, count in (("v1", "Secret", 1), ("v1", "ConfigMap", 2),
                                     ("apps/v1", "Deployment", 1),
                                     ("v1", "Service", len(plan["stages"]) + 1)):
        objects = cluster.owned(api_version, kind, "vision")
        assert len(objects) == count, kind
        assert all(o["metadata"]["ownerReferences"][0]["uid"] == uid for o in objects)

    cluster.wait_ready("vision")
    status = cluster.pipeline("vision")["status"]  # type: ignore[index]
    assert status["phase"] == "Ready"
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == "http://vision-gateway.default.svc.cluster.local:8080"
    metadata = cluster.pipeline("vision")["metadata"]  # type: ignore[index]
    assert s.FINALIZER in metadata["finalizers"]
    assert f"{s.PERSISTENCE_PREFIX}/{s.DIFFBASE_KEY}" in metadata["annotations"]
    # Nothing wrote to spec: the API server bumps generation on every spec change.
    assert cluster.pipeline("vision")["metadata"]["generation"] == 1  # type: ignore[index]
    assert cluster.events("vision", "Planned")


def test_losing_a_host_replans_onto_the_survivors(
    cluster: Cluster, operator: RunningOperator
) -> None:
    for i in range(4):
        cluster.api.create(node(f"pi-{i}"))
    cluster.api.create(pipeline("vision", replan={"cooldownSeconds": 600}))
    first = cluster.wait_planned("vision")
    cluster.wait_ready("vision")
    lost = plan_nodes(first)[0]

    started = time.monotonic()
    cluster.api.set_node_ready(lost, False)

    def new_plan() -> dict | None:
        plan = cluster.plan("vision")
        return plan if plan and plan["hash"] != first["hash"] else None

    second = wait_for("a new plan", new_plan)
    wanted = set(plan_nodes(second))

    def new_pods() -> list[dict] | None:
        found = cluster.stage_pods("vision", second["hash"])
        return found if {p["spec"]["nodeName"] for p in found} == wanted else None

    pods = wait_for("the new plan's pods", new_pods)
    print(f"\nFIGURE node loss -> new plan's pods: {time.monotonic() - started:.2f} s")
    assert lost not in wanted
    assert all(p["spec"]["nodeName"] != lost for p in pods)
    replanned = wait_for("a Replanned event", lambda: cluster.events("vision", "Replanned"))
    assert "NodeLost" in replanned[-1]["message"] and lost in replanned[-1]["message"]

    cluster.wait_ready("vision")
    wait_for("the old plan's pods to go",
             lambda: not cluster.stage_pods("vision", first["hash"]))
    degraded = cluster.condition("vision", "Degraded")
    assert degraded is not None and degraded["status"] == "False"


def test_a_faster_node_joining_moves_the_pipeline_when_the_gain_is_enough(
    cluster: Cluster, operator: RunningOperator
) -> None:
    for i in range(3):
        cluster.api.create(node(f"pi-{i}"))
    cluster.api.create(pipeline("eager", replan={"minImprovement": 0.1, "cooldownSeconds": 1}))
    cluster.api.create(pipeline("steady", replan={"minImprovement": 1.0, "cooldownSeconds": 1}))
    eager = cluster.wait_planned("eager")
    steady = cluster.wait_planned("steady")
    assert "fast-0" not in plan_nodes(eager)

    # Predicted gain of the 4-node plan: about 64 %, between the two thresholds.
    cluster.api.create(node("fast-0", gflops=20))

    def eager_moved() -> dict | None:
        plan = cluster.plan("eager")
        return plan if plan and "fast-0" in plan_nodes(plan) else None

    better = wait_for("eager to adopt the fast node", eager_moved)
    assert better["throughputPerSecond"] >= 1.1 * eager["throughputPerSecond"]
    wait_for("pods on the fast node", lambda: any(
        p["spec"]["nodeName"] == "fast-0" for p in cluster.stage_pods("eager", better["hash"])))

    skipped = wait_for("steady to pass the new plan over",
                       lambda: cluster.events("steady", "ReplanSkipped"))
    assert "GainTooSmall" in skipped[-1]["message"]
    assert "minImprovement is 100%" in skipped[-1]["message"]
    assert cluster.plan("steady")["hash"] == steady["hash"]  # type: ignore[index]


BAD_SPECS = [
    pytest.param({"objective": "throughput", "targetPeriodSeconds": 0.5}, "InvalidSpec",
                 "targetPeriodSeconds", id="invalid-spec"),
    pytest.param({"model": {"uri": "zoo:nosuchnet"}}, "ModelNotFound", "nosuchnet",
                 id="unknown-zoo-model"),
    pytest.param({"model": {"uri": "http://127.0.0.1:9/model.onnx"}}, "ModelUnreachable",
                 "127.0.0.1:9/model.onnx", id="unreachable-uri"),
    pytest.param({"model": {"uri": "zoo:mobilenet_v2", "sha256": "0" * 64}},
                 "ChecksumMismatch", "spec.model.sha256", id="checksum-mismatch"),
    pytest.param({"nodeSelector": {"pool": "tiny"}}, "Infeasible", "tiny-0", id="infeasible"),
    pytest.param({"nodeSelector": {"pool": "nowhere"}}, "NoMatchingNodes",
                 "nodeSelector {'pool': 'nowhere'}", id="no-matching-nodes"),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One cluster and operator for all the bad specs, beside a good pipeline."""
    root = tmp_path_factory.mktemp("shared")
    with pytest.MonkeyPatch.context() as patch, ApiServer() as api:
        patch.setenv("KUBECONFIG", str(api.write_kubeconfig(root / "kubeconfig")))
        api.apply_file(CRD)
        for i in range(3):
            api.create(node(f"pi-{i}", pool="edge"))
        api.create(node("tiny-0", memory_mb=4, pool="tiny"))
        kubelet = Kubelet(api)
        kubelet.thread.start()
        running = RunningOperator(root / "cache").start()
        cluster = Cluster(api, root)
        api.create(pipeline("good", nodeSelector={"pool": "edge"}))
        try:
            yield cluster
        finally:
            running.stop()
            kubelet.stop.set()


@pytest.mark.parametrize(("spec", "reason", "named"), BAD_SPECS)
def test_each_bad_spec_gets_its_condition_and_the_rest_keep_running(
    shared: Cluster, spec: dict, reason: str, named: str, request: pytest.FixtureRequest
) -> None:
    name = f"bad-{request.node.callspec.id}"
    shared.api.create(pipeline(name, **spec))
    planned = shared.wait_reason(name, "Planned", reason)
    assert planned["status"] == "False"
    assert named in planned["message"]
    status = shared.pipeline(name)["status"]  # type: ignore[index]
    assert status["phase"] in ("Failed", "Pending")
    assert not shared.stage_pods(name)
    assert shared.wait_planned("good")
    warnings = wait_for(f"a {reason} event", lambda: shared.events(name, reason))
    assert warnings[-1]["type"] == "Warning"


def test_fixing_a_bad_spec_recovers(shared: Cluster) -> None:
    shared.api.create(pipeline("fixme", model={"uri": "zoo:nosuchnet"},
                               nodeSelector={"pool": "edge"}))
    shared.wait_reason("fixme", "Planned", "ModelNotFound")
    shared.api.call(lambda emulator: emulator.patch(
        emulator.resolve(API, KIND), NS, "fixme", "application/merge-patch+json",
        {"spec": {"model": {"uri": "zoo:mobilenet_v2"}}}, None))
    plan = shared.wait_planned("fixme")
    assert plan["stages"]
    planned = shared.condition("fixme", "Planned")
    assert planned["observedGeneration"] == 2  # type: ignore[index]
    wait_for("fixme's pods", lambda: shared.stage_pods("fixme", plan["hash"]))


def test_a_bad_change_to_a_running_pipeline_leaves_it_running(
    cluster: Cluster, operator: RunningOperator
) -> None:
    for i in range(3):
        cluster.api.create(node(f"pi-{i}"))
    cluster.api.create(pipeline("vision"))
    plan = cluster.wait_planned("vision")
    cluster.wait_ready("vision")
    pods = sorted(p["metadata"]["uid"] for p in cluster.stage_pods("vision"))

    cluster.api.call(lambda emulator: emulator.patch(
        emulator.resolve(API, KIND), NS, "vision", "application/merge-patch+json",
        {"spec": {"model": {"sha256": "0" * 64}}}, None))
    planned = cluster.wait_reason("vision", "Planned", "ChecksumMismatch")
    assert planned["observedGeneration"] == 2
    degraded = cluster.condition("vision", "Degraded")
    assert degraded is not None and degraded["reason"] == "PreviousPlanServing"
    assert plan["hash"] in degraded["message"]
    assert cluster.plan("vision")["hash"] == plan["hash"]  # type: ignore[index]
    assert sorted(p["metadata"]["uid"] for p in cluster.stage_pods("vision")) == pods
    assert (cluster.condition("vision", "Ready") or {}).get("status") == "True"


def test_an_operator_restart_creates_no_duplicates(cluster: Cluster) -> None:
    for i in range(3):
        cluster.api.create(node(f"pi-{i}"))
    first = RunningOperator(cluster.root / "cache-1").start()
    try:
        cluster.api.create(pipeline("vision"))
        plan = cluster.wait_planned("vision")
        cluster.wait_ready("vision")
    finally:
        first.stop()
    kinds = [("v1", "Pod"), ("v1", "Service"), ("v1", "Secret"), ("v1", "ConfigMap"),
             ("apps/v1", "Deployment")]
    before = {kind: sorted((o["metadata"]["name"], o["metadata"]["uid"])
                           for o in cluster.owned(version, kind, "vision"))
              for version, kind in kinds}

    second = RunningOperator(cluster.root / "cache-2").start()  # an empty cache, as a new pod
    try:
        resumed = wait_for("the Resumed event", lambda: cluster.events("vision", "Resumed"))
        assert "created" not in resumed[-1]["message"]
        assert "replaced" not in resumed[-1]["message"]
        after = {kind: sorted((o["metadata"]["name"], o["metadata"]["uid"])
                              for o in cluster.owned(version, kind, "vision"))
                 for version, kind in kinds}
        assert after == before
        assert cluster.plan("vision")["hash"] == plan["hash"]  # type: ignore[index]
    finally:
        second.stop()


def test_deleting_the_pipeline_removes_everything_it_owns(
    cluster: Cluster, operator: RunningOperator
) -> None:
    for i in range(3):
        cluster.api.create(node(f"pi-{i}"))
    cluster.api.create(pipeline("vision"))
    cluster.wait_planned("vision")
    wait_for("stage pods", lambda: cluster.stage_pods("vision"))
    cluster.api.delete(API, KIND, "vision", NS)
    wait_for("the pipeline to go", lambda: cluster.pipeline("vision") is None)
    for version, kind in (("v1", "Pod"), ("v1", "Service"), ("v1", "Secret"),
                          ("v1", "ConfigMap"), ("apps/v1", "Deployment")):
        wait_for(f"{kind}s to go", lambda v=version, k=kind: not cluster.owned(v, k, "vision"))


def test_the_cli_runs_the_operator_until_interrupted(cluster: Cluster, tmp_path: Path) -> None:
    """``edgeweave operator`` as a user starts it: its own process, KUBECONFIG, a signal."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        liveness_port = probe.getsockname()[1]
    env = {**os.environ, "EDGEWEAVE_CACHE_DIR": str(tmp_path / "cache"),
           "EDGEWEAVE_SHARD_PORT": "0", "EDGEWEAVE_SHARD_HOST": "127.0.0.1"}
    script = "import edgeweave.cli.operator; from edgeweave.cli import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", script, "operator",
         "--liveness", f"http://127.0.0.1:{liveness_port}/healthz"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for i in range(3):
            cluster.api.create(node(f"pi-{i}"))
        cluster.api.create(pipeline("vision"))
        cluster.wait_planned("vision")

        def alive() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz",
                                            timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for("the liveness probe", alive)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
