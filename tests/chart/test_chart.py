"""The Helm chart, rendered by the real Helm engine with default and non-default values.

What a K3s user and a GitOps fleet rely on: the chart lints clean in strict mode, every
built-in object it renders is valid Kubernetes (kubernetes-validate, strict), its CRD
is the generated one, the example pipelines pass that CRD's schema, the operator it
deploys is configured the way ``edgeweave/operator/settings.py`` reads it, every pod
(the chart's and the stage and gateway pods the operator creates) passes the
restricted Pod Security Standard, and the NetworkPolicies admit exactly a pipeline's
own traffic. RBAC has its own file (test_rbac.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml
from chart_render import (
    CHART_DIR,
    NAMESPACE,
    REPO,
    env_of,
    ingress_allowed,
    lint,
    notes,
    objects,
    of_kind,
    one,
    pod_spec_of,
    render,
    restricted_violations,
    selector_matches,
)

import edgeweave

# Imported to register their commands on the app, whose options the tests read.
import edgeweave.cli.gateway
import edgeweave.cli.operator
import edgeweave.cli.profile_node
import edgeweave.cli.worker
from edgeweave.api import load_pipeline_file, render_crd_yaml
from edgeweave.api.v1alpha1 import InferencePipelineSpec
from edgeweave.cli import app
from edgeweave.operator import resources as r
from edgeweave.operator import settings as s
from edgeweave.worker.stage import PUBLIC_PATHS

CRD_FILE = "inferencepipelines.edgeweave.io.yaml"
EXAMPLE_PIPELINES = sorted((REPO / "examples" / "pipelines").glob("*.yaml"))

# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest
# kubernetes-validate knows: an object valid in both is valid in between.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

# Custom resource kinds the chart may render: kubernetes-validate has no schema for them
# (they come from CRDs, not from Kubernetes), so their shape is checked by their own tests.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

PIPELINE_A = {"name": "resnet50", "namespace": "default"}
PIPELINE_B = {"name": "vit-large", "namespace": "vision"}

EVERYTHING: dict[str, Any] = {
    "fullnameOverride": "edge",
    "image": {"repository": "registry.example.com/edge/operator", "tag": "1.2.3",
              "pullPolicy": "Always"},
    "workerImage": {"repository": "registry.example.com/edge/worker", "tag": "1.2.3",
                    "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {
        "watchNamespaces": ["default", "team-*"],
        "verbose": True,
        "shardPort": 9081,
        "healthPort": 9082,
        "resyncSeconds": 10,
        "clusterDomain": "edge.local",
        "gatewayServiceType": "LoadBalancer",
        "layerCosts": "flops",
        "resources": {"requests": {"cpu": "250m", "memory": "1Gi"},
                      "limits": {"cpu": "4", "memory": "6Gi"}},
        "cache": {"sizeLimit": "20Gi", "existingClaim": "edgeweave-cache"},
        "podAnnotations": {"example.com/team": "edge"},
        "podLabels": {"example.com/tier": "control"},
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                         "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
    },
    "serviceAccount": {"name": "edge-operator", "annotations": {"example.com/owner": "edge"}},
    "nodeProfiler": {
        "enabled": True,
        "image": {"repository": "registry.example.com/edge/profiler", "tag": "9.9.9",
                  "pullPolicy": "Always"},
        "peer": "http://192.168.1.10:8099",
        "seconds": 10,
        "reserveMb": 512,
        "port": 9099,
        "resources": {"requests": {"cpu": "50m", "memory": "256Mi"}},
        "tolerations": [{"operator": "Exists"}],
        "nodeSelector": {"edgeweave.io/profile": "true"},
    },
    "networkPolicy": {
        "enabled": True,
        "pipelines": [PIPELINE_A, PIPELINE_B],
        "gatewayFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "clients"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}],
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                       "interval": "15s", "namespaces": ["default"]},
}
FIXED_BANDWIDTH: dict[str, Any] = {
    "nodeProfiler": {"enabled": True, "bandwidthMbps": 940, "deviceClass": "rpi4"},
    "networkPolicy": {"enabled": True, "pipelines": [PIPELINE_A]},
    "serviceMonitor": {"enabled": True},
}
EXISTING_ACCOUNT: dict[str, Any] = {
    "rbac": {"create": False},
    "serviceAccount": {"create": False, "name": "edgeweave-existing"},
}
VALUE_SETS = {"defaults": {}, "everything": EVERYTHING, "fixed-bandwidth": FIXED_BANDWIDTH,
              "existing-account": EXISTING_ACCOUNT}


def _ids(sets: dict[str, Any]) -> list[Any]:
    return [pytest.param(values, id=name) for name, values in sets.items()]


# --------------------------------------------------------------------------- lint, render


@pytest.mark.parametrize("values", _ids(VALUE_SETS))
def test_strict_lint_finds_no_problem(values: dict[str, Any]) -> None:
    report = lint(values)
    assert report["errors"] == []
    warnings = [m for m in report["messages"] if m["severity"] >= 2]
    assert warnings == [], warnings


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("values", _ids(VALUE_SETS))
def test_every_built_in_object_is_valid_kubernetes(values: dict[str, Any], version: str) -> None:
    rendered = objects(values)
    assert rendered
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_defaults_render_the_operator_and_nothing_optional() -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects())
    assert kinds == [
        ("ClusterRole", "edgeweave-operator"),
        ("ClusterRoleBinding", "edgeweave-operator"),
        ("Deployment", "edgeweave-operator"),
        ("Service", "edgeweave-operator"),
        ("ServiceAccount", "edgeweave-operator"),
    ]


def test_each_switch_adds_its_objects() -> None:
    rendered = objects(EVERYTHING)
    assert len(of_kind(rendered, "DaemonSet")) == 1
    assert len(of_kind(rendered, "ServiceMonitor")) == 1
    # The operator's policy, then a stage and a gateway policy per listed pipeline.
    policies = {(p["metadata"]["namespace"], p["metadata"]["name"])
                for p in of_kind(rendered, "NetworkPolicy")}
    assert policies == {
        (NAMESPACE, "edge-operator"),
        ("default", "edge-resnet50-stages"), ("default", "edge-resnet50-gateway"),
        ("vision", "edge-vit-large-stages"), ("vision", "edge-vit-large-gateway"),
    }
    without_rbac = objects(EXISTING_ACCOUNT)
    assert not [o for o in without_rbac if o["kind"] in
                {"ClusterRole", "ClusterRoleBinding", "ServiceAccount"}]
    assert pod_spec_of(one(without_rbac, "Deployment"))["serviceAccountName"] == \
        "edgeweave-existing"


@pytest.mark.parametrize(("values", "complaint"), [
    pytest.param({"replicas": 3}, "additional properties 'replicas'", id="unknown-key"),
    pytest.param({"nodeProfiler": {"resources": {"limits": {"cpu": "1"}}}},
                 "additional properties 'limits'", id="profiler-limits"),
    pytest.param({"nodeProfiler": {"enabled": True, "peer": "http://pi:8099",
                                   "bandwidthMbps": 940}},
                 "either peer", id="peer-and-bandwidth"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="pull-policy"),
    pytest.param({"networkPolicy": {"enabled": True, "pipelines": [{"name": "resnet50"}]}},
                 "namespace", id="pipeline-without-namespace"),
    pytest.param({"serviceAccount": {"create": False}}, "serviceAccount.name is required",
                 id="no-account"),
    pytest.param({"operator": {"watchNamespaces": ["Default"]}}, "watchNamespaces",
                 id="bad-namespace"),
])
def test_bad_values_are_refused_with_the_key_named(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(complaint)):
        render(values)


def test_notes_tell_the_next_steps_with_files_that_exist() -> None:
    text = notes()
    assert "rollout status deployment/edgeweave-operator" in text
    assert "kubectl get ipl" in text
    assert "helm show crds" in text, "the CRD upgrade step"
    for path in re.findall(r"\b((?:examples|docs|helm)/[\w./-]*\w)", text):
        assert (REPO / path).exists(), f"NOTES.txt names {path}, which does not exist"
    assert "daemonset/edgeweave-node-profiler" in notes({"nodeProfiler": {"enabled": True}})


# --------------------------------------------------------------------------- the CRD


def test_chart_crd_is_the_generated_crd() -> None:
    """Helm installs crds/ verbatim: it must be the CRD the API models generate."""
    chart_crd = (CHART_DIR / "crds" / CRD_FILE).read_text()
    assert chart_crd == render_crd_yaml(), (
        f"helm/edgeweave/crds/{CRD_FILE} has drifted from edgeweave/api/v1alpha1.py; "
        f"regenerate it with `edgeweave crd -o helm/edgeweave/crds/{CRD_FILE}`"
    )
    assert chart_crd == (REPO / "crds" / CRD_FILE).read_text()
    assert sorted(p.name for p in (CHART_DIR / "crds").iterdir()) == [CRD_FILE]
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(yaml.safe_load(chart_crd), version, strict=True)


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((CHART_DIR / "crds" / CRD_FILE).read_text())
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", EXAMPLE_PIPELINES, ids=lambda p: p.name)
def test_example_pipelines_pass_the_crd_schema(path: Path) -> None:
    # Kubernetes schemas are OpenAPI 3.0: draft-4 numeric keywords; x-kubernetes-* ignored.
    validator = jsonschema.Draft4Validator(_crd_schema())
    for document in yaml.safe_load_all(path.read_text()):
        assert document["apiVersion"] == "edgeweave.io/v1alpha1"
        errors = ["/".join(map(str, e.absolute_path)) + ": " + e.message
                  for e in validator.iter_errors(document)]
        assert errors == [], f"{path.name}: {errors}"
    assert load_pipeline_file(path), "edgeweave's own validation accepts it too"


def test_example_pipeline_files_are_all_checked() -> None:
    names = {p.name for p in EXAMPLE_PIPELINES}
    assert {"resnet50-pi4.yaml", "vit-large-16.yaml"} <= names


# --------------------------------------------------------------------------- the operator


def _operator(values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = one(objects(values), "Deployment")
    (container,) = pod_spec_of(deployment)["containers"]
    return deployment, container


def _cli_options(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {opt for param in click_command.params
            for opt in (*param.opts, *getattr(param, "secondary_opts", ()))}


def _assert_cli_accepts(container: dict[str, Any]) -> None:
    """The container runs ``edgeweave <command> --option ...``: every option must exist."""
    command, *args = container["args"]
    options = _cli_options(command)
    unknown = [arg for arg in args if arg.startswith("--") and arg not in options]
    assert unknown == [], f"edgeweave {command} has no option {unknown}"


@pytest.mark.parametrize("values", _ids(VALUE_SETS))
def test_operator_pod_is_restricted(values: dict[str, Any]) -> None:
    deployment, _ = _operator(values)
    pod = pod_spec_of(deployment)
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] == s.RUN_AS_USER, "the images' user"
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two operators"


@pytest.mark.parametrize("values", _ids(VALUE_SETS))
def test_operator_has_probes_on_its_ports_and_bounded_resources(values: dict[str, Any]) -> None:
    _, container = _operator(values)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["port"] in ports and liveness["httpGet"]["port"] in ports
    # Readiness is the shard server's /healthz (what stage pods need); liveness is kopf's
    # endpoint, which the operator serves where --liveness says.
    assert ports[readiness["httpGet"]["port"]] == int(env_of(container)["EDGEWEAVE_SHARD_PORT"])
    liveness_url = container["args"][container["args"].index("--liveness") + 1]
    assert liveness_url == (f"http://0.0.0.0:{ports[liveness['httpGet']['port']]}"
                            f"{liveness['httpGet']['path']}")
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("values", _ids(VALUE_SETS))
def test_operator_settings_come_out_as_the_chart_means(values: dict[str, Any]) -> None:
    """The environment the chart sets, read by the operator's own OperatorConfig.from_env,
    points stage pods at the chart's Service and gives them the chart's worker image."""
    rendered = objects(values)
    deployment, container = _operator(values)
    env = env_of(container)
    assert env.pop("POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    config = s.OperatorConfig.from_env({**env, "POD_NAMESPACE": NAMESPACE})

    service = one(rendered, "Service")
    assert selector_matches({"matchLabels": service["spec"]["selector"]},
                            deployment["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    domain = (values.get("operator") or {}).get("clusterDomain", "cluster.local")
    assert config.shard_base_url == (
        f"http://{service['metadata']['name']}.{NAMESPACE}.svc.{domain}:{port['port']}")
    shard_port = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    assert config.shard_port == shard_port["containerPort"]
    assert config.cluster_domain == domain
    assert config.gateway_service_type == (values.get("operator") or {}).get(
        "gatewayServiceType", "ClusterIP")
    assert config.layer_costs == (values.get("operator") or {}).get("layerCosts", "measured")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(config.cache_dir) in mounts, "the cache is a volume, not the read-only root"

    worker = values.get("workerImage")
    expected = (f"{worker['repository']}:{worker['tag']}" if worker
                else s.DEFAULT_WORKER_IMAGE)
    assert config.worker_image == expected
    _assert_cli_accepts(container)


def test_operator_serves_only_the_namespaces_asked_for() -> None:
    _, container = _operator(EVERYTHING)
    args = container["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["default", "team-*"]
    _, default = _operator()
    assert "--namespace" not in default["args"], "cluster-wide by default"


def test_chart_versions_match_the_package() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["appVersion"] == edgeweave.__version__
    assert one(objects(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] \
        == f"ghcr.io/edgeweave/operator:{edgeweave.__version__}"


# --------------------------------------------------------------------------- node profiler


@pytest.mark.parametrize("values", _ids({"everything": EVERYTHING,
                                         "fixed-bandwidth": FIXED_BANDWIDTH}))
def test_profiler_measures_the_node_and_labels_it(values: dict[str, Any]) -> None:
    daemonset = one(objects(values), "DaemonSet")
    pod = pod_spec_of(daemonset)
    (container,) = pod["containers"]
    assert restricted_violations(pod) == []
    assert "limits" not in container["resources"], "a limit would be measured, not the node"
    assert env_of(container)["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    args = container["args"]
    assert args[:3] == ["profile-node", "--apply", "--serve"]
    listen_port = int(args[args.index("--listen") + 1].rsplit(":", 1)[1])
    (port,) = container["ports"]
    assert port["containerPort"] == listen_port
    assert container["readinessProbe"]["httpGet"]["port"] == port["name"]
    _assert_cli_accepts(container)


def test_profiler_runs_the_operator_image_by_default() -> None:
    """The operator image carries onnxruntime and the Kubernetes client: what
    profile-node --apply needs (the worker image has no Kubernetes client)."""
    values = {"image": {"repository": "r.example/op", "tag": "7", "pullPolicy": "Always"},
              "nodeProfiler": {"enabled": True}}
    rendered = objects(values)
    profiler = pod_spec_of(one(rendered, "DaemonSet"))["containers"][0]
    assert profiler["image"] == "r.example/op:7"
    fixed = pod_spec_of(one(objects(FIXED_BANDWIDTH), "DaemonSet"))["containers"][0]["args"]
    assert fixed[fixed.index("--bandwidth-mbps") + 1] == "940"
    assert fixed[fixed.index("--device-class") + 1] == "rpi4"


# --------------------------------------------------------------------------- pipeline pods

REF = r.PipelineRef(name="resnet50", namespace="default", uid="uid-1")
OTHER = r.PipelineRef(name="vit-large", namespace="default", uid="uid-2")
CONFIG = s.OperatorConfig(cache_dir=Path("/var/cache/edgeweave"))


def _rollout(ref: r.PipelineRef = REF, **spec: Any) -> r.Rollout:
    pipeline_spec = InferencePipelineSpec.model_validate({"model": {"uri": "zoo:resnet50"},
                                                          **spec})
    stages = tuple(
        r.StageLayout(index=i, nodes=nodes, shard=r.StageShard(f"{i:064x}", 2**20),
                      threads={n: 4 for n in nodes})
        for i, nodes in enumerate((("pi-0",), ("pi-1", "pi-2")))
    )
    return r.Rollout(ref=ref, spec=pipeline_spec, plan_hash="0123456789abcdef", stages=stages,
                     config=CONFIG)


def _pipeline_pods(rollout: r.Rollout) -> list[dict[str, Any]]:
    stage_pods = [o for o in r.stage_objects(rollout) if o["kind"] == "Pod"]
    return [*stage_pods, r.gateway_deployment(rollout, rollout.revision)]


@pytest.mark.parametrize("spec", [
    pytest.param({}, id="plain"),
    pytest.param({"resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": "1Gi"}},
                  "auth": {"apiKeySecretRef": {"name": "keys", "key": "api-key"}}},
                 id="resources-and-api-key"),
])
def test_stage_and_gateway_pods_the_operator_creates_are_restricted(spec: dict[str, Any]) -> None:
    for obj in _pipeline_pods(_rollout(**spec)):
        pod = pod_spec_of(obj)
        assert restricted_violations(pod) == [], obj["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] == s.RUN_AS_USER
        assert pod["automountServiceAccountToken"] is False, "stage pods never call the API"


# --------------------------------------------------------------------------- network policy


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "Deployment":
        return obj["spec"]["template"]["metadata"]["labels"]
    return obj["metadata"]["labels"]


def _port(obj: dict[str, Any]) -> int:
    (container,) = pod_spec_of(obj)["containers"]
    (port,) = container["ports"]
    return int(port["containerPort"])


def _pipeline_parts(rollout: r.Rollout) -> dict[str, dict[str, Any]]:
    pods = _pipeline_pods(rollout)
    by_stage = {p["metadata"]["labels"].get(s.LABEL_STAGE): p for p in pods if p["kind"] == "Pod"}
    return {"stage0": by_stage["0"], "stage1": by_stage["1"], "gateway": pods[-1]}


@pytest.mark.parametrize("values", _ids({"everything": EVERYTHING,
                                         "fixed-bandwidth": FIXED_BANDWIDTH}))
def test_only_a_pipelines_own_pods_reach_its_stages(values: dict[str, Any]) -> None:
    policies = of_kind(objects(values), "NetworkPolicy")
    own, other = _pipeline_parts(_rollout(REF)), _pipeline_parts(_rollout(OTHER))
    ns = REF.namespace

    def allowed(source: dict[str, Any], target: dict[str, Any], namespace: str = ns) -> bool:
        return ingress_allowed(policies, source=(namespace, _labels(source)),
                               target=(ns, _labels(target)), port=_port(target))

    assert _port(own["stage0"]) == s.WORKER_PORT
    assert allowed(own["gateway"], own["stage0"]), "the gateway feeds stage 0"
    assert allowed(own["stage0"], own["stage1"]), "a stage feeds the next"
    assert allowed(own["stage1"], own["gateway"]), "the last stage returns to the gateway"
    assert not allowed(other["gateway"], own["stage0"]), "another pipeline's gateway"
    assert not allowed(other["stage1"], own["stage1"]), "another pipeline's stage"
    stranger = {"kind": "Pod", "metadata": {"labels": {"app": "curious"}}}
    assert not allowed(stranger, own["stage0"])
    assert not ingress_allowed(policies, source=(ns, _labels(own["gateway"])),
                               target=(ns, _labels(own["stage0"])), port=22), "other ports"


def test_gateways_serve_clients_unless_restricted() -> None:
    gateway = _pipeline_parts(_rollout(REF))["gateway"]
    client = (("shop", {"app": "shop"}))
    target = (REF.namespace, _labels(gateway))
    open_policies = of_kind(objects(FIXED_BANDWIDTH), "NetworkPolicy")
    assert ingress_allowed(open_policies, source=client, target=target, port=_port(gateway))

    restricted = of_kind(objects(EVERYTHING), "NetworkPolicy")
    assert not ingress_allowed(restricted, source=client, target=target, port=_port(gateway))
    assert ingress_allowed(restricted, source=("clients", {"app": "shop"}), target=target,
                           port=_port(gateway))
    rendered = objects(EVERYTHING)
    operator = (NAMESPACE, one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"])
    assert ingress_allowed(restricted, source=operator, target=target, port=_port(gateway)), (
        "the operator tells gateway pods where stage 0 moved")
    assert not ingress_allowed(restricted, source=("elsewhere", operator[1]), target=target,
                               port=_port(gateway)), "operator labels in another namespace"


def test_prometheus_reaches_stage_metrics_only_when_allowed() -> None:
    stage = _pipeline_parts(_rollout(REF))["stage0"]
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    target = (REF.namespace, _labels(stage))
    assert "/metrics" in PUBLIC_PATHS, "scrapers carry no token"
    assert ingress_allowed(of_kind(objects(EVERYTHING), "NetworkPolicy"), source=prometheus,
                           target=target, port=s.WORKER_PORT)
    assert not ingress_allowed(of_kind(objects(FIXED_BANDWIDTH), "NetworkPolicy"),
                               source=prometheus, target=target, port=s.WORKER_PORT)


def test_only_stage_pods_fetch_shards_from_the_operator() -> None:
    rendered = objects(EVERYTHING)
    policies = of_kind(rendered, "NetworkPolicy")
    operator = (NAMESPACE, one(rendered, "Deployment")["spec"]["template"]["metadata"]["labels"])
    shard_port = EVERYTHING["operator"]["shardPort"]
    parts = _pipeline_parts(_rollout(REF))
    assert ingress_allowed(policies, source=("default", _labels(parts["stage1"])),
                           target=operator, port=shard_port)
    assert not ingress_allowed(policies, source=("default", _labels(parts["gateway"])),
                               target=operator, port=shard_port)
    assert not ingress_allowed(policies, source=("default", {"app": "curious"}),
                               target=operator, port=shard_port)


# --------------------------------------------------------------------------- service monitor


def test_service_monitor_scrapes_the_services_the_operator_creates() -> None:
    # kubernetes-validate cannot check a ServiceMonitor (a CRD kind): check its shape here.
    monitor = one(objects(EVERYTHING), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["default"]}
    assert {e["path"] for e in spec["endpoints"]} == {"/metrics"}
    assert all(re.fullmatch(r"\d+[smh]", e["interval"]) for e in spec["endpoints"])

    rollout = _rollout(REF)
    services = [o for o in r.stage_objects(rollout) if o["kind"] == "Service"]
    services.append(r.gateway_service(REF, rollout.spec))
    scraped_ports = {e["port"] for e in spec["endpoints"]}
    for service in services:
        assert selector_matches(spec["selector"], service["metadata"]["labels"])
        names = {p["name"] for p in service["spec"]["ports"]}
        assert names & scraped_ports, f"{service['metadata']['name']} exposes {names}"
    for obj in (r.token_secret(REF, "t"), r.plan_configmap(REF, {}, {})):
        assert not selector_matches(spec["selector"], obj["metadata"]["labels"])

    default_monitor = one(objects(FIXED_BANDWIDTH), "ServiceMonitor")
    assert default_monitor["spec"]["namespaceSelector"] == {"any": True}
