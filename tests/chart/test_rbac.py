"""Least-privilege RBAC: the chart grants exactly the API calls the operator makes.

Two checks hold the ClusterRole to the code. The table below says which call each
grant is for; the rendered ClusterRole must be that table. Then the real operator
(kopf, in a thread) runs a pipeline's whole life against the emulated API server: it
is planned and deployed, a drifted label is put back, a spec change rolls it out to a
new revision, and it is deleted. Every request it sent must be granted, and every
grant must have been used: a verb the code stops using fails here until the chart
drops it too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chart_render import NAMESPACE, REPO, objects, of_kind, one, pod_spec_of

from edgeweave.operator import operate
from edgeweave.operator import settings as s
from edgeweave.operator.resources import pod_ready
from edgeweave.sandbox.apiserver import ApiServer, parse_resource_path
from edgeweave.sandbox.waiting import wait_until as wait_for

Grant = tuple[str, str, str]  # (API group, resource[/subresource], verb)

# Every grant of the operator's ClusterRole, and the code that needs it.
OPERATOR_GRANTS: dict[Grant, str] = {
    ("edgeweave.io", "inferencepipelines", "list"):
        "kopf: the initial listing of the create/update/resume/delete handlers and the "
        "per-pipeline daemon (handlers.py: @kopf.on.*, @kopf.daemon on PIPELINE)",
    ("edgeweave.io", "inferencepipelines", "watch"): "kopf: the same handlers' watch",
    ("edgeweave.io", "inferencepipelines", "get"):
        "Runtime.reconcile reads the pipeline fresh (kube.get(r.PIPELINES, ...))",
    ("edgeweave.io", "inferencepipelines", "patch"):
        "kopf: the finalizer (settings.FINALIZER) and its progress/diff-base annotations "
        "(settings.configure_kopf)",
    ("edgeweave.io", "inferencepipelines/status", "patch"):
        "Runtime._write_status: kube.patch(r.PIPELINES, ..., subresource='status')",
    ("", "nodes", "list"): "kopf.index 'nodes' (the node inventory) and on.event 'node-churn'",
    ("", "nodes", "watch"): "the same, watching",
    ("", "pods", "list"):
        "kopf on.event 'stage-pods'; kube.list(PODS) in _deploy, _retire, cleanup, and "
        "_push_route (the gateway pods to tell where stage 0 moved)",
    ("", "pods", "watch"): "kopf on.event 'stage-pods' (stage pod readiness wakes the rollout)",
    ("", "pods", "get"): "resources.apply reads the pod before creating or patching it",
    ("", "pods", "create"): "resources.apply creates stage pods (resources.stage_pod)",
    ("", "pods", "patch"): "resources.apply puts back a stage pod's drifted labels/annotations",
    ("", "pods", "delete"):
        "resources.apply replaces a pod whose template changed; _retire; cleanup",
    ("", "services", "list"): "_retire and cleanup list a pipeline's Services",
    ("", "services", "get"): "resources.apply (stage and gateway Services); _endpoint reads "
        "the gateway Service's load-balancer address",
    ("", "services", "create"): "resources.apply: stage_service, gateway_service",
    ("", "services", "patch"): "resources.apply: a changed gateway port or drifted labels",
    ("", "services", "delete"): "_retire (old revision's stage Services) and cleanup",
    ("", "configmaps", "list"): "cleanup lists the pipeline's ConfigMaps",
    ("", "configmaps", "get"):
        "_plan_generation reads the plan ConfigMap; _write_route the stage-0 route's "
        "serial; resources.apply",
    ("", "configmaps", "create"): "resources.apply: plan_configmap, stage0_configmap",
    ("", "configmaps", "patch"):
        "resources.apply: the plan and stage-0 route ConfigMaps of a new plan",
    ("", "configmaps", "delete"): "cleanup",
    ("", "secrets", "list"): "cleanup lists the pipeline's Secrets",
    ("", "secrets", "get"): "_ensure_token reads the pipeline token; resources.apply",
    ("", "secrets", "create"): "resources.apply: token_secret",
    ("", "secrets", "patch"): "resources.apply keeps the token Secret's labels and owner",
    ("", "secrets", "delete"): "_ensure_token replaces an unreadable token; cleanup",
    ("apps", "deployments", "list"):
        "kopf on.event 'gateways'; cleanup lists the gateway Deployment",
    ("apps", "deployments", "watch"): "kopf on.event 'gateways' (the gateway rollout)",
    ("apps", "deployments", "get"): "_advance_gateway, _observe_running; resources.apply",
    ("apps", "deployments", "create"): "resources.apply: gateway_deployment",
    ("apps", "deployments", "patch"): "resources.apply: the gateway's confirmed stage-0 revision",
    ("apps", "deployments", "delete"): "cleanup",
    ("", "events", "create"):
        "kopf.info / kopf.warn (Planned, Replanned, GatewaySwitched, ...) and kopf's own "
        "posting of handler logs",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"):
        "kopf's resource observer: scanning is not disabled (settings.configure_kopf), so "
        "kopf notices the InferencePipeline CRD being installed or replaced",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "the same, watching",
}

# Only with operator.watchNamespaces (`edgeweave operator --namespace ...`): kopf's
# namespace observer lists and watches Namespaces to match the patterns.
NAMESPACED_GRANTS: dict[Grant, str] = {
    ("", "namespaces", "list"): "kopf's namespace observer (operate(namespaces=...))",
    ("", "namespaces", "watch"): "the same, watching for namespaces coming and going",
}

# `edgeweave profile-node --apply`: nodeprofile.apply_labels reads its Node, then
# merge-patches the edgeweave.io labels (core.read_node, core.patch_node).
PROFILER_GRANTS = {("", "nodes", "get"), ("", "nodes", "patch")}


def grants_of(role: dict[str, Any]) -> set[Grant]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _cluster_role(values: dict[str, Any], component: str) -> dict[str, Any]:
    roles = [role for role in of_kind(objects(values), "ClusterRole")
             if role["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(roles) == 1
    return roles[0]


# --------------------------------------------------------------------------- static


def test_the_operators_cluster_role_is_the_table() -> None:
    assert grants_of(_cluster_role({}, "operator")) == set(OPERATOR_GRANTS)


def test_serving_some_namespaces_adds_only_namespace_watching() -> None:
    role = _cluster_role({"operator": {"watchNamespaces": ["team-*"]}}, "operator")
    assert grants_of(role) == set(OPERATOR_GRANTS) | set(NAMESPACED_GRANTS)


def test_the_profiler_may_only_read_and_label_nodes() -> None:
    role = _cluster_role({"nodeProfiler": {"enabled": True}}, "node-profiler")
    assert grants_of(role) == PROFILER_GRANTS


@pytest.mark.parametrize("values", [
    {},
    {"nodeProfiler": {"enabled": True}, "operator": {"watchNamespaces": ["a", "b-*"]},
     "networkPolicy": {"enabled": True}, "serviceMonitor": {"enabled": True}},
])
def test_no_wildcards_and_no_write_access_to_rbac(values: dict[str, Any]) -> None:
    rendered = objects(values)
    roles = [o for o in rendered if o["kind"] in {"Role", "ClusterRole"}]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field] and all("*" not in item for item in rule[field])
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group, resource, _ in grants_of(role):
            assert group != "rbac.authorization.k8s.io", "no path to escalate privileges"
            assert resource not in {"pods/exec", "pods/attach", "nodes/proxy", "serviceaccounts"}


@pytest.mark.parametrize("values", [{}, {"nodeProfiler": {"enabled": True},
                                         "fullnameOverride": "edge"}])
def test_each_role_is_bound_to_the_account_its_pods_run_as(values: dict[str, Any]) -> None:
    rendered = objects(values)
    accounts = {sa["metadata"]["name"] for sa in of_kind(rendered, "ServiceAccount")}
    bindings = {b["roleRef"]["name"]: b for b in of_kind(rendered, "ClusterRoleBinding")}
    for workload in [*of_kind(rendered, "Deployment"), *of_kind(rendered, "DaemonSet")]:
        account = pod_spec_of(workload)["serviceAccountName"]
        assert account in accounts
        binding = bindings[workload["metadata"]["name"]]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert one(rendered, "ClusterRole", binding["roleRef"]["name"])


# --------------------------------------------------------------------------- recorded




class Kubelet:
    """Stands in for the kubelet and the Deployment controller: what the operator waits on."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                self._tick()
            except Exception:  # the emulator may be stopping
                continue

    def _tick(self) -> None:
        for pod in self.api.list("v1", "Pod"):
            if not pod_ready(pod):
                self.api.patch_status("v1", "Pod", pod["metadata"]["name"], {
                    "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                }, pod["metadata"]["namespace"])
        for deployment in self.api.list("apps/v1", "Deployment"):
            generation = deployment["metadata"].get("generation", 1)
            replicas = deployment["spec"].get("replicas", 1)
            status = deployment.get("status") or {}
            if (status.get("observedGeneration"), status.get("availableReplicas")) != (
                    generation, replicas):
                self.api.patch_status("apps/v1", "Deployment", deployment["metadata"]["name"], {
                    "observedGeneration": generation, "replicas": replicas,
                    "updatedReplicas": replicas, "availableReplicas": replicas,
                }, deployment["metadata"]["namespace"])


class Operator:
    """The real operator in a thread, stopped through kopf's stop flag."""

    def __init__(self, cache_dir: Path, namespaces: tuple[str, ...] = ()) -> None:
        self.config = s.OperatorConfig(cache_dir=cache_dir, shard_listen_host="127.0.0.1",
                                       shard_port=0, shard_base_url="http://127.0.0.1:8081",
                                       resync_interval_s=5.0)
        self.namespaces = namespaces
        self.stop_flag = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(operate(config=self.config, namespaces=self.namespaces,
                                stop_flag=self.stop_flag))
        except BaseException as error:
            self.failure = error

    def __enter__(self) -> Operator:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the operator did not stop"
        assert self.failure is None, f"the operator failed: {self.failure!r}"


API = "edgeweave.io/v1alpha1"
KIND = "InferencePipeline"


@pytest.fixture()
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    with ApiServer() as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig")))
        api.apply_file(REPO / "helm" / "edgeweave" / "crds" /
                       "inferencepipelines.edgeweave.io.yaml")
        for i in range(3):
            api.create({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": f"pi-{i}", "labels": {
                    "edgeweave.io/device-class": "pi", "edgeweave.io/gflops": "10",
                    "edgeweave.io/memory-mb": "40", "edgeweave.io/bandwidth-mbps": "1000"}},
                "status": {"allocatable": {"cpu": "4", "memory": "4Gi"},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
        kubelet = Kubelet(api)
        kubelet.thread.start()
        try:
            yield api
        finally:
            kubelet.stop.set()
            kubelet.thread.join(10)


def _pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": KIND, "metadata": {"name": "vision", "namespace": "default"},
            "spec": {"model": {"uri": "zoo:mobilenet_v2"}, **spec}}


def _condition(api: ApiServer, kind: str) -> dict[str, Any]:
    body = api.get(API, KIND, "vision", "default") or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or []
                 if c["type"] == kind), {})


def _ready_at(api: ApiServer, generation: int) -> bool:
    ready = _condition(api, "Ready")
    planned = _condition(api, "Planned")
    return ready.get("status") == "True" and planned.get("observedGeneration") == generation


def _tamper(api: ApiServer, api_version: str, kind: str, name: str, labels: dict[str, str]) -> None:
    """Change labels behind the operator's back, as a user's `kubectl label` would."""
    def patch(emulator: Any) -> None:
        rtype = emulator.resolve(api_version, kind)
        emulator.patch(rtype, "default", name, "application/merge-patch+json",
                       {"metadata": {"labels": labels}})

    api.call(patch)


def _label(api: ApiServer, api_version: str, kind: str, name: str, key: str) -> str | None:
    return ((api.get(api_version, kind, name, "default") or {}).get("metadata") or {}).get(
        "labels", {}).get(key)


def _life_of_a_pipeline(api: ApiServer) -> None:
    api.create(_pipeline({}))
    wait_for("the pipeline Ready", lambda: _ready_at(api, 1))

    pod = api.list("v1", "Pod", "default")[0]["metadata"]["name"]
    _tamper(api, "v1", "Secret", "vision-token", {s.LABEL_COMPONENT: "tampered"})
    _tamper(api, "v1", "Pod", pod, {s.LABEL_PLAN_HASH: "tampered"})
    wait_for("labels put back", lambda: (
        _label(api, "v1", "Pod", pod, s.LABEL_PLAN_HASH) != "tampered"
        and _label(api, "v1", "Secret", "vision-token", s.LABEL_COMPONENT) == "token"))

    # A new gateway port: a new revision of stage pods, and the gateway Service patched.
    api.apply([_pipeline({"gateway": {"port": 8090}})])
    wait_for("the new revision serving", lambda: _ready_at(api, 2) and len(
        {p["metadata"]["labels"][s.LABEL_REVISION] for p in api.list("v1", "Pod", "default")}
    ) == 1)

    api.delete(API, KIND, "vision", "default")
    wait_for("the pipeline gone", lambda: api.get(API, KIND, "vision", "default") is None)


def _recorded_grants(api: ApiServer) -> tuple[set[Grant], list[str]]:
    """Each recorded request as the RBAC grant it needs, and the non-resource paths."""
    requests = api.call(lambda emulator: [(str(req.method), req.url.path, dict(req.params))
                                          for req in emulator])
    needed: set[Grant] = set()
    discovery: list[str] = []
    for method, path, params in requests:
        parsed = parse_resource_path(path)
        if parsed is None or parsed[2] is None:
            discovery.append(f"{method} {path}")
            continue
        group, _version, plural, _namespace, name, subresource = parsed
        resource = f"{plural}/{subresource}" if subresource else plural
        needed.add((group, resource, _verb(method, name, params)))
    return needed, discovery


def _verb(method: str, name: str | None, params: dict[str, str]) -> str:
    method = method.rsplit(".", 1)[-1].upper()
    if method == "GET":
        if name is not None:
            return "get"
        return "watch" if params.get("watch") in {"true", "1"} else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update",
            "DELETE": "delete" if name is not None else "deletecollection"}[method]


def _assert_discovery_only(paths: list[str]) -> None:
    """Requests outside resources are API discovery, which every authenticated
    account may read (the built-in system:discovery ClusterRole)."""
    for request in paths:
        method, path = request.split(" ", 1)
        assert method.endswith("GET"), request
        parts = path.strip("/").split("/")
        assert parts[0] in {"api", "apis"} and len(parts) <= 3, request


def test_recorded_calls_of_a_pipelines_life_are_exactly_the_grants(
    cluster: ApiServer, tmp_path: Path
) -> None:
    with Operator(tmp_path / "cache"):
        _life_of_a_pipeline(cluster)
    needed, discovery = _recorded_grants(cluster)
    _assert_discovery_only(discovery)
    granted = grants_of(_cluster_role({}, "operator"))
    assert needed - granted == set(), "the operator made calls the chart does not grant"
    assert granted - needed == set(), "the chart grants calls the operator never made"


def test_recorded_calls_of_a_namespaced_operator_are_granted(
    cluster: ApiServer, tmp_path: Path
) -> None:
    with Operator(tmp_path / "cache", namespaces=("default",)):
        cluster.create(_pipeline({}))
        wait_for("the pipeline Ready", lambda: _ready_at(cluster, 1))
    needed, discovery = _recorded_grants(cluster)
    _assert_discovery_only(discovery)
    granted = grants_of(_cluster_role({"operator": {"watchNamespaces": ["default"]}},
                                      "operator"))
    assert needed - granted == set()
    assert set(NAMESPACED_GRANTS) <= needed, "kopf follows namespaces in this mode"
