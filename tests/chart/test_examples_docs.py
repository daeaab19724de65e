"""What a K3s user copies: docs/install.md, the example Nodes, and the GitOps examples.

Every file the install guide (and the README) names exists; every ``helm`` command's
chart and ``--set`` values render; every object name a ``kubectl`` command uses is
the one the chart or the operator creates; the ``edgeweave plan`` commands run; the
example Node objects are valid Kubernetes and plan as their comments say; the Argo CD
health check (real Lua 5.1, as Argo CD's gopher-lua) reads statuses the operator's own
status composer writes; the Flux HelmRelease creates and replaces the CRD.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_render import CHART_DIR, REPO, objects, of_kind, render, values_from_set_flags
from lupa import lua51

from edgeweave.api.v1alpha1 import InferencePipelineStatus, PlanStatus
from edgeweave.operator import resources as r
from edgeweave.operator.status import Observed, PlanFailure, Reason, compose

INSTALL = REPO / "docs" / "install.md"
DOCS = [INSTALL, REPO / "README.md"]
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:examples|helm|crds|docs|benchmarks)/[\w./*-]*[\w*/])")
LUA = REPO / "examples" / "argocd" / "health-inferencepipeline.lua"
KUBE_VERSION = kubernetes_validate.latest_version()


# --------------------------------------------------------------------------- the guide


def shell_commands(path: Path) -> list[list[str]]:
    """The commands of the ```sh blocks, continuation lines joined, as argv lists."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip().rstrip("&").strip()
            if line and not line.startswith("#"):
                commands.append(line)
    argvs = []
    for command in commands:
        try:
            argvs.append(shlex.split(command))
        except ValueError:
            continue  # a multi-line python -c program: not a command the tests parse
    return argvs


def commands_of(tool: str, *subcommand: str) -> Iterator[list[str]]:
    for argv in shell_commands(INSTALL):
        if argv[: 1 + len(subcommand)] == [tool, *subcommand]:
            yield argv


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == option]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_in_the_docs_exists(doc: Path) -> None:
    for path in REPO_PATH.findall(doc.read_text()):
        assert (REPO / path.rstrip("/")).exists(), f"{doc.name} names {path}, which is missing"
    for name in re.findall(r"`(Dockerfile|\.dockerignore)`", doc.read_text()):
        assert (REPO / name).exists()


def test_the_guide_covers_the_k3s_journey() -> None:
    text = INSTALL.read_text()
    for step in ("helm install", "kubectl label node", "nodeProfiler.enabled=true",
                 "kubectl apply -f examples/pipelines/", "kubectl get ipl -w",
                 "/v2/models/resnet50/infer", "examples/flux/helmrelease.yaml",
                 "examples/argocd/", "CreateReplace", "docker buildx build"):
        assert step in text, f"docs/install.md lacks {step!r}"


def test_helm_commands_name_the_chart_and_valid_values() -> None:
    helm_commands = [a for a in shell_commands(INSTALL) if a[0] == "helm"
                     and a[1] in {"install", "upgrade"}]
    assert len(helm_commands) >= 3
    for argv in helm_commands:
        release, chart = argv[2], argv[3]
        assert (REPO / chart / "Chart.yaml").exists(), chart
        values = values_from_set_flags(option_values(argv, "--set"))
        assert render(values, release=release, namespace=option_values(argv, "-n")[0])


def test_kubectl_names_are_what_the_chart_and_the_operator_create() -> None:
    (install,) = commands_of("helm", "install")
    release, namespace = install[2], option_values(install, "-n")[0]
    rendered = objects({"nodeProfiler": {"enabled": True}}, release=release,
                       namespace=namespace)
    names = {f"{o['kind'].lower()}/{o['metadata']['name']}" for o in rendered}
    pipelines = {doc["metadata"]["name"] for path in (REPO / "examples/pipelines").glob("*")
                 for doc in yaml.safe_load_all(path.read_text())}
    names |= {f"service/{r.gateway_name(name)}" for name in pipelines}
    referenced = {word for argv in shell_commands(INSTALL) if argv[0] == "kubectl"
                  for word in argv if re.fullmatch(r"(deployment|daemonset|service)/[\w-]+", word)}
    assert referenced, "the guide names objects to wait for and to port-forward to"
    assert referenced <= names, referenced - names


def test_applied_example_files_are_valid_manifests() -> None:
    applied = [path for argv in commands_of("kubectl", "apply")
               for path in option_values(argv, "-f") if (REPO / path).is_file()]
    assert "examples/pipelines/resnet50-pi4.yaml" in applied
    for path in applied:
        for doc in yaml.safe_load_all((REPO / path).read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            if doc["apiVersion"] in {"v1", "apps/v1"}:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_plan_commands_of_the_guide_run() -> None:
    runnable = [argv for argv in commands_of("edgeweave", "plan")
                if (REPO / option_values(argv, "--nodes")[0]).exists()]
    assert len(runnable) >= 2
    for argv in runnable:
        done = subprocess.run([sys.executable, "-m", "edgeweave", *argv[1:], "-o", "json"],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["stages"]


def test_buildx_builds_both_images_for_arm64_and_amd64() -> None:
    builds = list(commands_of("docker", "buildx", "build"))
    assert len(builds) == 2
    chart_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    expected_tags = {f"{chart_values[key]['repository']}:{app_version}"
                     for key in ("image", "workerImage")}
    tags = set()
    for argv in builds:
        platforms = set(option_values(argv, "--platform")[0].split(","))
        assert platforms == {"linux/arm64", "linux/amd64"}
        dockerfile = (option_values(argv, "-f") or ["Dockerfile"])[0]
        assert (REPO / dockerfile).is_file()
        assert argv[-1] == ".", "the build context is the repository root"
        tags.update(option_values(argv, "-t"))
    assert tags == expected_tags


# --------------------------------------------------------------------------- example nodes


def _nodes(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    assert document["kind"] == "List"
    return document["items"]


@pytest.mark.parametrize("name", ["nodes-samples.yaml", "nodes-vit-large-16.yaml"])
def test_example_nodes_are_valid_kubernetes_nodes(name: str) -> None:
    for node in _nodes(REPO / "examples" / name):
        kubernetes_validate.validate(node, KUBE_VERSION, strict=True)
        assert node["metadata"]["labels"]["edgeweave.io/device-class"]


def _plan(model: str, nodes: str) -> tuple[dict[str, Any], str]:
    done = subprocess.run(
        [sys.executable, "-m", "edgeweave", "plan", model, "--nodes", nodes, "-o", "json"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_vit_large_needs_the_whole_fleet_of_sixteen() -> None:
    path = "examples/nodes-vit-large-16.yaml"
    assert len(_nodes(REPO / path)) == 16
    plan, _ = _plan("zoo:vit_l_16", path)
    used = [node for stage in plan["stages"] for node in stage["nodes"]]
    # What the pipeline's comment promises: 3 stages on all 16 nodes, 1.6 images/s.
    assert len(plan["stages"]) == 3 and sorted(used) == sorted(
        n["metadata"]["name"] for n in _nodes(REPO / path))
    assert round(plan["throughput_per_s"], 1) == 1.6
    small = [n for n in _nodes(REPO / path)
             if int(n["metadata"]["labels"]["edgeweave.io/memory-mb"]) * 2**20
             < sum(stage["memory_bytes"] for stage in plan["stages"])]
    assert len(small) == 10, "the 2 GB and 1 GB boards cannot hold the model alone"


def test_node_samples_plan_as_their_comments_say() -> None:
    plan, _ = _plan("zoo:resnet50", "examples/nodes-samples.yaml")
    used = {node for stage in plan["stages"] for node in stage["nodes"]}
    assert used == {"pi5-0", "pi4-0", "pi4-1"}
    # What the table output tells a user about the other two samples.
    done = subprocess.run(
        [sys.executable, "-m", "edgeweave", "plan", "zoo:resnet50", "--nodes",
         "examples/nodes-samples.yaml"],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "COLUMNS": "200"})
    said = " ".join((done.stdout + done.stderr).split())
    assert "skipped node server-0: unschedulable (cordoned)" in said
    assert "'pi4-1' has no edgeweave.io/bandwidth-mbps label" in said


# --------------------------------------------------------------------------- Argo CD


PLAN = PlanStatus.model_validate({
    "stages": [{"index": 0, "layers": [0, 9], "nodes": ["pi-0"], "replicas": 1,
                "periodSeconds": 0.1, "inBytes": 10, "outBytes": 10, "memoryBytes": 100},
               {"index": 1, "layers": [10, 19], "nodes": ["pi-1", "pi-2"], "replicas": 2,
                "periodSeconds": 0.1, "inBytes": 10, "outBytes": 10, "memoryBytes": 100}],
    "periodSeconds": 0.1, "latencySeconds": 0.2, "bottleneckStage": 0,
    "hash": "0123456789abcdef", "throughputPerSecond": 10.0,
})
SERVING = Observed(revision="abcd1234", gateway_switched=True)


def _status(
    *, plan: PlanStatus | None = PLAN, failure: PlanFailure | None = None,
    observed: Observed = SERVING, lost: str | None = None,
) -> InferencePipelineStatus:
    return compose(None, generation=1, plan=plan, failure=failure, observed=observed,
                   endpoint="http://p-gateway.default.svc.cluster.local:8080", lost_hosts=lost)


def _health(status: InferencePipelineStatus | None, generation: int = 1) -> tuple[str, str]:
    body: dict[str, Any] = {"apiVersion": "edgeweave.io/v1alpha1", "kind": "InferencePipeline",
                            "metadata": {"name": "p", "generation": generation}}
    if status is not None:
        body["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(body, recursive=True)
    result = lua.execute(LUA.read_text())
    return result["status"], result["message"]


def test_lua_health_check_is_healthy_only_when_serving() -> None:
    state, message = _health(_status())
    assert state == "Healthy"
    assert "2 stages on 3 nodes" in message


@pytest.mark.parametrize(("status", "reason"), [
    pytest.param(lambda: _status(plan=None, failure=PlanFailure(
        Reason.InvalidSpec, "spec.model.uri: unknown zoo model")), "InvalidSpec", id="bad-spec"),
    pytest.param(lambda: _status(plan=None, failure=PlanFailure(
        Reason.NoMatchingNodes, "no node matches")), "NoMatchingNodes", id="no-nodes"),
    pytest.param(lambda: _status(failure=PlanFailure(
        Reason.Infeasible, "layer 3 fits nowhere")), "Infeasible", id="old-plan-serving"),
    pytest.param(lambda: _status(observed=Observed(
        revision="abcd1234", pods_failing={"p-s0": "CrashLoopBackOff"},
        gateway_switched=True)), "PodsFailing", id="pods-failing"),
    pytest.param(lambda: _status(lost="node pi-1 is NotReady"), "NodeLost", id="node-lost"),
])
def test_lua_health_check_is_degraded_with_the_reason(status: Any, reason: str) -> None:
    state, message = _health(status())
    assert state == "Degraded"
    assert message.startswith(f"{reason}: ")


@pytest.mark.parametrize(("status", "generation", "words"), [
    pytest.param(lambda: None, 1, "Waiting for the edgeweave operator", id="new"),
    pytest.param(lambda: _status(), 2, "Waiting for the edgeweave operator", id="new-generation"),
    pytest.param(lambda: _status(plan=None, failure=PlanFailure(
        Reason.ModelUnreachable, "GET https://models.example/x.onnx: timed out")), 1,
        "ModelUnreachable: ", id="model-download-retried"),
    pytest.param(lambda: _status(observed=Observed(revision="abcd1234",
                                                   pods_waiting=["p-s1-abcd1234-pi-2"])),
                 1, "waiting for stage pods to be Ready: p-s1-abcd1234-pi-2", id="pods-starting"),
    pytest.param(lambda: _status(observed=Observed(revision="abcd1234")), 1,
                 "waiting for the gateway Deployment", id="gateway-rolling-out"),
])
def test_lua_health_check_is_progressing_meanwhile(
    status: Any, generation: int, words: str
) -> None:
    state, message = _health(status(), generation)
    assert state == "Progressing"
    assert words in message


def test_argocd_configmap_carries_the_health_check_verbatim() -> None:
    configmap = yaml.safe_load((REPO / "examples/argocd/argocd-cm.yaml").read_text())
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["name"] == "argocd-cm"
    key = "resource.customizations.health.edgeweave.io_InferencePipeline"
    assert configmap["data"] == {key: LUA.read_text()}
    kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)


def test_argocd_applications_point_at_the_chart_and_the_pipelines() -> None:
    chart_app, pipelines_app = yaml.safe_load_all(
        (REPO / "examples/argocd/application.yaml").read_text())
    for app in (chart_app, pipelines_app):
        assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = chart_app["spec"]["source"]
    assert (REPO / source["path"]) == CHART_DIR
    assert render(source["helm"]["valuesObject"], release=source["helm"]["releaseName"],
                  namespace=chart_app["spec"]["destination"]["namespace"])
    sync = chart_app["spec"]["syncPolicy"]
    assert "ServerSideApply=true" in sync["syncOptions"]
    assert sync["automated"]["prune"] is False, "pruning the CRD would delete every pipeline"
    pipelines = pipelines_app["spec"]["source"]
    assert (REPO / pipelines["path"] / pipelines["directory"]["include"]).is_file()


# --------------------------------------------------------------------------- Flux


def test_flux_helmrelease_creates_and_replaces_the_crd() -> None:
    documents = list(yaml.safe_load_all((REPO / "examples/flux/helmrelease.yaml").read_text()))
    by_kind = {doc["kind"]: doc for doc in documents}
    assert set(by_kind) == {"Namespace", "GitRepository", "HelmRelease"}
    namespace, source, release = (by_kind[k] for k in ("Namespace", "GitRepository",
                                                       "HelmRelease"))
    kubernetes_validate.validate(namespace, KUBE_VERSION, strict=True)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    assert source["apiVersion"] == "source.toolkit.fluxcd.io/v1"
    assert release["apiVersion"] == "helm.toolkit.fluxcd.io/v2"
    spec = release["spec"]
    assert spec["install"]["crds"] == "CreateReplace"
    assert spec["upgrade"]["crds"] == "CreateReplace"
    chart = spec["chart"]["spec"]
    assert (REPO / chart["chart"]).resolve() == CHART_DIR
    assert "!/helm/" in source["spec"]["ignore"].split(), "the chart is fetched"
    assert chart["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"],
                                  "namespace": source["metadata"]["namespace"]}
    assert release["metadata"]["namespace"] == namespace["metadata"]["name"]
    rendered = objects(spec["values"], release=spec["releaseName"],
                       namespace=release["metadata"]["namespace"])
    assert of_kind(rendered, "DaemonSet") and of_kind(rendered, "NetworkPolicy")
