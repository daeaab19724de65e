"""The emulated Kubernetes API behaves like kube-apiserver where the operator relies on it.

Driven with the real ``kubernetes`` client, plain HTTP as kubectl and kopf send it,
kopf itself, and kubectl when it is installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kopf
import kubernetes
import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from edgeweave.sandbox.apiserver import ApiServer

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "inferencepipelines.edgeweave.io.yaml"
GROUP, VERSION, PLURAL = "edgeweave.io", "v1alpha1", "inferencepipelines"
NS = "default"
T = TypeVar("T")
# The `http` fixture (conftest.RawHttp): .get(path), .request(method, path, body,
# content_type=...) -> (status, json); .watch_lines(path) -> events of a finite watch.
RawHttp = Any


def pipeline(name: str, **spec: Any) -> dict[str, Any]:
    """An InferencePipeline manifest with a valid minimal spec, extendable per field."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferencePipeline",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "zoo:resnet18"}, **spec},
    }


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll until ``condition()`` is truthy; fail naming ``what`` if it never becomes so."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def make_pod(name: str, labels: dict[str, str] | None = None, node: str | None = None,
             owners: list[dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": labels or {}, **meta}
    if owners:
        metadata["ownerReferences"] = owners
    spec: dict[str, Any] = {"containers": [{"name": "worker", "image": "edgeweave/worker:1"}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"],
            "name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]}


def pod_names(core: CoreV1Api, **selectors: Any) -> list[str]:
    return sorted(p.metadata.name for p in core.list_pod_for_all_namespaces(**selectors).items)


def get_pipeline(custom: CustomObjectsApi, name: str) -> dict[str, Any]:
    result: dict[str, Any] = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    return result


def create_pipeline(custom: CustomObjectsApi, body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, body)
    return result


def exists(fetch: Any, *args: Any) -> bool:
    try:
        fetch(*args)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


# ---------------------------------------------------------------------- discovery


def test_discovery_serves_the_kinds_the_operator_uses(http: RawHttp) -> None:
    status, core = http.get("/api/v1")
    assert status == 200
    core_kinds = {r["kind"] for r in core["resources"] if "/" not in r["name"]}
    assert {"Node", "Pod", "Service", "Secret", "ConfigMap", "Event", "Namespace"} <= core_kinds
    pods = next(r for r in core["resources"] if r["name"] == "pods")
    assert pods["namespaced"] is True and "watch" in pods["verbs"] and "po" in pods["shortNames"]
    nodes = next(r for r in core["resources"] if r["name"] == "nodes")
    assert nodes["namespaced"] is False

    _, groups = http.get("/apis")
    served = {g["name"]: g["preferredVersion"]["version"] for g in groups["groups"]}
    assert served["apps"] == "v1"
    assert served["coordination.k8s.io"] == "v1"
    assert served["events.k8s.io"] == "v1"
    assert served["apiextensions.k8s.io"] == "v1"
    assert served["autoscaling"] == "v2"  # the highest version is preferred
    _, apps = http.get("/apis/apps/v1")
    assert "Deployment" in {r["kind"] for r in apps["resources"]}
    _, version = http.get("/version")
    assert version["major"] == "1"


def test_custom_resources_are_served_once_their_crd_exists(
    http: RawHttp, k8s: kubernetes.client.ApiClient, custom: CustomObjectsApi
) -> None:
    _, before = http.get("/apis")
    assert GROUP not in {g["name"] for g in before["groups"]}
    assert http.get(f"/apis/{GROUP}/{VERSION}")[0] == 404
    with pytest.raises(ApiException) as refused:
        create_pipeline(custom, pipeline("early"))
    assert refused.value.status == 404

    kubernetes.client.ApiextensionsV1Api(k8s).create_custom_resource_definition(
        yaml.safe_load(CRD_PATH.read_text()))

    _, after = http.get("/apis")
    assert GROUP in {g["name"] for g in after["groups"]}
    status, listing = http.get(f"/apis/{GROUP}/{VERSION}")
    assert status == 200
    by_name = {r["name"]: r for r in listing["resources"]}
    assert by_name[PLURAL]["kind"] == "InferencePipeline"
    assert by_name[PLURAL]["shortNames"] == ["ipl"]
    assert by_name[PLURAL]["namespaced"] is True
    assert f"{PLURAL}/status" in by_name
    crd = wait_until(lambda: http.get(
        f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}")[1]
        if any(c["type"] == "Established" for c in (http.get(
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{PLURAL}.{GROUP}")[1]
            .get("status") or {}).get("conditions", [])) else None, what="CRD Established")
    assert crd["status"]["acceptedNames"]["kind"] == "InferencePipeline"
    assert create_pipeline(custom, pipeline("late"))["metadata"]["name"] == "late"


def test_deleting_the_crd_removes_its_objects_and_stops_serving(
    http: RawHttp, pipeline_crd: dict[str, Any], custom: CustomObjectsApi,
    k8s: kubernetes.client.ApiClient,
) -> None:
    create_pipeline(custom, pipeline("doomed"))
    kubernetes.client.ApiextensionsV1Api(k8s).delete_custom_resource_definition(
        pipeline_crd["metadata"]["name"])
    wait_until(lambda: http.get(f"/apis/{GROUP}/{VERSION}")[0] == 404, what="CRD gone")
    assert GROUP not in {g["name"] for g in http.get("/apis")[1]["groups"]}


# ---------------------------------------------------------------------- CRUD and metadata


def test_create_assigns_identity_and_refuses_duplicates(core: CoreV1Api) -> None:
    created = core.create_namespaced_pod(NS, make_pod("stage-0"))
    meta = created.metadata
    assert len(meta.uid) == 36 and meta.resource_version.isdigit()
    assert meta.generation == 1 and meta.creation_timestamp is not None
    assert created.status.phase == "Pending"
    assert created.spec.restart_policy == "Always"  # a server default, as on a real cluster

    with pytest.raises(ApiException) as duplicate:
        core.create_namespaced_pod(NS, make_pod("stage-0"))
    assert duplicate.value.status == 409
    assert json.loads(duplicate.value.body)["message"] == 'pods "stage-0" already exists'

    generated = core.create_namespaced_config_map(
        NS, {"metadata": {"generateName": "plan-"}, "data": {"a": "1"}})
    assert generated.metadata.name.startswith("plan-") and len(generated.metadata.name) == 10

    with pytest.raises(ApiException) as nowhere:
        core.create_namespaced_pod("no-such-namespace", make_pod("x"))
    assert nowhere.value.status == 404


def test_resource_version_is_global_and_guards_replace(core: CoreV1Api) -> None:
    first = core.create_namespaced_config_map(NS, {"metadata": {"name": "a"}, "data": {"k": "1"}})
    second = core.create_namespaced_config_map(NS, {"metadata": {"name": "b"}, "data": {"k": "1"}})
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)

    fresh = core.read_namespaced_config_map("a", NS)
    fresh.data = {"k": "2"}
    replaced = core.replace_namespaced_config_map("a", NS, fresh)
    assert replaced.data == {"k": "2"}
    assert int(replaced.metadata.resource_version) > int(second.metadata.resource_version)

    stale = first
    stale.data = {"k": "3"}
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("a", NS, stale)
    assert conflict.value.status == 409
    assert "the object has been modified" in json.loads(conflict.value.body)["message"]
    assert core.read_namespaced_config_map("a", NS).data == {"k": "2"}


def test_a_patch_that_changes_nothing_is_not_a_write(core: CoreV1Api) -> None:
    created = core.create_namespaced_config_map(NS, {"metadata": {"name": "a"}, "data": {"k": "1"}})
    same = core.patch_namespaced_config_map("a", NS, {"data": {"k": "1"}})
    assert same.metadata.resource_version == created.metadata.resource_version


def test_cluster_scoped_and_namespaced_addressing(core: CoreV1Api, http: RawHttp) -> None:
    node = core.create_node({"metadata": {"name": "pi4-0", "labels": {"a": "b"}},
                             "status": {"allocatable": {"cpu": "4"}}})
    assert node.metadata.namespace is None
    assert node.status.allocatable == {"cpu": "4"}  # nodes register with their status
    assert http.get("/api/v1/namespaces/default/nodes/pi4-0")[0] == 404
    assert http.get("/api/v1/pods/x")[0] == 404
    core.create_namespace({"metadata": {"name": "edge"}})
    core.create_namespaced_pod("edge", make_pod("p"))
    core.create_namespaced_pod(NS, make_pod("p"))
    assert [p.metadata.namespace for p in core.list_namespaced_pod("edge").items] == ["edge"]
    assert len(core.list_pod_for_all_namespaces().items) == 2
    assert core.read_namespace("edge").status.phase == "Active"


def test_namespace_deletion_takes_its_contents(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "edge"}})
    core.create_namespaced_pod("edge", make_pod("p"))
    core.create_namespaced_secret("edge", {"metadata": {"name": "token"}})
    core.delete_namespace("edge")
    wait_until(lambda: not exists(core.read_namespace, "edge"), what="namespace removed")
    assert core.list_namespaced_pod("edge").items == []
    assert core.list_namespaced_secret("edge").items == []


def test_list_pages_with_limit_and_continue(core: CoreV1Api) -> None:
    for index in range(5):
        core.create_namespaced_pod(NS, make_pod(f"p{index}"))
    first = core.list_namespaced_pod(NS, limit=2)
    assert [p.metadata.name for p in first.items] == ["p0", "p1"]
    second = core.list_namespaced_pod(NS, limit=2, _continue=first.metadata._continue)
    third = core.list_namespaced_pod(NS, limit=2, _continue=second.metadata._continue)
    assert [p.metadata.name for p in second.items + third.items] == ["p2", "p3", "p4"]
    assert not third.metadata._continue


# ---------------------------------------------------------------------- selectors


@pytest.mark.parametrize(("selector", "expected"), [
    ("edgeweave.io/pipeline=resnet", ["r0", "r1"]),
    ("edgeweave.io/pipeline==resnet", ["r0", "r1"]),
    ("edgeweave.io/pipeline!=resnet", ["plain", "v0"]),
    ("edgeweave.io/stage in (0,2)", ["r0", "v0"]),
    ("edgeweave.io/stage notin (0)", ["plain", "r1", "v0"]),
    ("edgeweave.io/stage", ["r0", "r1", "v0"]),
    ("!edgeweave.io/stage", ["plain"]),
    ("edgeweave.io/pipeline=resnet,edgeweave.io/stage=1", ["r1"]),
    ("edgeweave.io/pipeline in (resnet,vit),edgeweave.io/stage notin (1)", ["r0", "v0"]),
])
def test_label_selectors(core: CoreV1Api, selector: str, expected: list[str]) -> None:
    for name, labels in {
        "r0": {"edgeweave.io/pipeline": "resnet", "edgeweave.io/stage": "0"},
        "r1": {"edgeweave.io/pipeline": "resnet", "edgeweave.io/stage": "1"},
        "v0": {"edgeweave.io/pipeline": "vit", "edgeweave.io/stage": "2"},
        "plain": {},
    }.items():
        core.create_namespaced_pod(NS, make_pod(name, labels))
    assert pod_names(core, label_selector=selector) == expected


def test_label_selectors_select_custom_resources_and_nodes(
    core: CoreV1Api, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    core.create_node({"metadata": {"name": "pi5", "labels": {"edgeweave.io/device-class": "rpi5"}}})
    core.create_node({"metadata": {"name": "pi4", "labels": {"edgeweave.io/device-class": "rpi4"}}})
    nodes = core.list_node(label_selector="edgeweave.io/device-class in (rpi5)").items
    assert [n.metadata.name for n in nodes] == ["pi5"]
    tagged = pipeline("tagged")
    tagged["metadata"]["labels"] = {"team": "vision"}
    create_pipeline(custom, tagged)
    create_pipeline(custom, pipeline("untagged"))
    found = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, label_selector="team")
    assert [o["metadata"]["name"] for o in found["items"]] == ["tagged"]


def test_malformed_label_selector_is_a_bad_request(core: CoreV1Api) -> None:
    with pytest.raises(ApiException) as bad:
        core.list_namespaced_pod(NS, label_selector="a in (b")
    assert bad.value.status == 400


def test_field_selectors(core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "edge"}})
    core.create_namespaced_pod(NS, make_pod("on-a", node="node-a"))
    core.create_namespaced_pod(NS, make_pod("on-b", node="node-b"))
    core.create_namespaced_pod("edge", make_pod("unscheduled"))
    assert pod_names(core, field_selector="spec.nodeName=node-a") == ["on-a"]
    assert pod_names(core, field_selector="spec.nodeName!=node-a") == ["on-b", "unscheduled"]
    assert pod_names(core, field_selector="spec.nodeName=") == ["unscheduled"]
    assert pod_names(core, field_selector="metadata.name=on-b") == ["on-b"]
    assert pod_names(core, field_selector="metadata.namespace=edge") == ["unscheduled"]
    assert pod_names(core, field_selector="metadata.namespace=default,spec.nodeName=node-b") == [
        "on-b"]
    with pytest.raises(ApiException) as unsupported:
        core.list_namespaced_pod(NS, field_selector="spec.image=x")
    assert unsupported.value.status == 400
    assert json.loads(unsupported.value.body)["message"] == "field label not supported: spec.image"


# ---------------------------------------------------------------------- patches


def test_merge_patch_removes_keys_set_to_null(core: CoreV1Api, http: RawHttp) -> None:
    core.create_namespaced_config_map(
        NS, {"metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1"}})
    status, patched = http.request("PATCH", "/api/v1/namespaces/default/configmaps/c",
                                   {"metadata": {"labels": {"a": None}}, "data": {"y": "2"}},
                                   content_type="application/merge-patch+json")
    assert status == 200
    assert patched["metadata"]["labels"] == {"b": "2"}
    assert patched["data"] == {"x": "1", "y": "2"}


def test_strategic_merge_patch_merges_containers_by_name(core: CoreV1Api) -> None:
    pod = make_pod("two")
    pod["spec"]["containers"].append({"name": "sidecar", "image": "proxy:1"})
    core.create_namespaced_pod(NS, pod)
    # A dict body makes the client send application/strategic-merge-patch+json.
    patched = core.patch_namespaced_pod("two", NS, {
        "spec": {"containers": [{"name": "sidecar", "image": "proxy:2"}]},
        "metadata": {"finalizers": ["edgeweave.io/cleanup"]},
    })
    images = {c.name: c.image for c in patched.spec.containers}
    assert images == {"worker": "edgeweave/worker:1", "sidecar": "proxy:2"}
    assert patched.metadata.finalizers == ["edgeweave.io/cleanup"]


def test_json_patch_test_operation_guards_against_concurrent_writes(
    core: CoreV1Api, http: RawHttp
) -> None:
    created = core.create_namespaced_config_map(NS, {"metadata": {"name": "c"}, "data": {"x": "1"}})
    core.patch_namespaced_config_map("c", NS, {"data": {"x": "2"}})  # someone else writes
    stale_ops = [
        {"op": "test", "path": "/metadata/resourceVersion",
         "value": created.metadata.resource_version},
        {"op": "add", "path": "/metadata/finalizers", "value": ["kopf"]},
    ]
    status, body = http.request("PATCH", "/api/v1/namespaces/default/configmaps/c", stale_ops,
                                content_type="application/json-patch+json")
    assert status == 422 and body["kind"] == "Status"
    current = core.read_namespaced_config_map("c", NS)
    fresh_ops = [dict(stale_ops[0], value=current.metadata.resource_version), stale_ops[1]]
    status, body = http.request("PATCH", "/api/v1/namespaces/default/configmaps/c", fresh_ops,
                                content_type="application/json-patch+json")
    assert status == 200 and body["metadata"]["finalizers"] == ["kopf"]


def test_strategic_merge_patch_is_refused_for_custom_resources(
    http: RawHttp, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    create_pipeline(custom, pipeline("p"))
    status, body = http.request(
        "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}/p",
        {"spec": {"objective": "latency"}}, content_type="application/strategic-merge-patch+json")
    assert status == 415 and body["reason"] == "UnsupportedMediaType"


def test_server_side_apply_creates_updates_and_drops_omitted_fields(http: RawHttp) -> None:
    path = "/api/v1/namespaces/default/configmaps/applied?fieldManager=me"
    yaml_v1 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\ndata: {a: '1', b: '2'}\n"
    status, created = http.request("PATCH", path, yaml_v1,
                                   content_type="application/apply-patch+yaml")
    assert status == 201 and created["data"] == {"a": "1", "b": "2"}
    yaml_v2 = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: applied}\ndata: {a: '3'}\n"
    status, updated = http.request("PATCH", path, yaml_v2,
                                   content_type="application/apply-patch+yaml")
    assert status == 200 and updated["data"] == {"a": "3"}
    assert updated["metadata"]["uid"] == created["metadata"]["uid"]


# ---------------------------------------------------------------------- custom resources


def test_custom_resource_defaults_come_from_the_crd_schema(
    custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    created = create_pipeline(custom, pipeline("defaults", unknownField=1))
    spec = created["spec"]
    assert spec["objective"] == "throughput"
    assert spec["model"]["batch"] == 1
    assert spec["replicas"] == {"allow": True}  # a defaulted {} gets its own defaults
    assert spec["replan"] == {"onNodeChurn": True, "minImprovement": 0.1, "cooldownSeconds": 60}
    assert "unknownField" not in spec  # pruned, as a structural schema prunes


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"model": {"uri": "zoo:resnet18"}, "objective": "fastest"}, "spec.objective",
     'Unsupported value: "fastest"'),
    ({"model": {"uri": "ftp://models/x.onnx"}}, "spec.model.uri", "should match"),
    ({"model": {"uri": "zoo:resnet18", "batch": 0}}, "spec.model.batch",
     "should be greater than or equal to 1"),
    ({"model": {"uri": "zoo:resnet18"}, "maxStages": "three"}, "spec.maxStages",
     "must be of type integer"),
    ({"objective": "latency"}, "spec.model", "Required value"),
])
def test_invalid_custom_resources_are_refused_with_422(
    custom: CustomObjectsApi, pipeline_crd: dict[str, Any], spec: dict[str, Any], field: str,
    words: str,
) -> None:
    body = pipeline("bad")
    body["spec"] = spec
    with pytest.raises(ApiException) as refused:
        create_pipeline(custom, body)
    assert refused.value.status == 422
    status = json.loads(refused.value.body)
    assert status["kind"] == "Status" and status["reason"] == "Invalid"
    assert status["message"].startswith('InferencePipeline.edgeweave.io "bad" is invalid: ')
    assert any(c["field"] == field and words in c["message"] for c in status["details"]["causes"])
    assert not exists(get_pipeline, custom, "bad")


def test_strict_field_validation_refuses_unknown_fields(
    http: RawHttp, pipeline_crd: dict[str, Any]
) -> None:
    body = pipeline("strict", surprise=True)
    status, answer = http.request(
        "POST", f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}?fieldValidation=Strict", body)
    assert status == 400 and 'unknown field "spec.surprise"' in answer["message"]


def test_generation_counts_spec_changes_only(
    custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    created = create_pipeline(custom, pipeline("gen"))
    assert created["metadata"]["generation"] == 1
    relabelled = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "gen", {"metadata": {"labels": {"a": "b"}}})
    assert relabelled["metadata"]["generation"] == 1
    with_status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "gen", {"status": {"phase": "Planning"}})
    assert with_status["metadata"]["generation"] == 1
    assert int(with_status["metadata"]["resourceVersion"]) > int(
        relabelled["metadata"]["resourceVersion"])
    respecced = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "gen", {"spec": {"objective": "latency"}})
    assert respecced["metadata"]["generation"] == 2


def test_status_subresource_separates_spec_and_status(
    custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    create_pipeline(custom, pipeline("sub"))
    main = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "sub",
        {"spec": {"maxStages": 2}, "status": {"phase": "Ready"}})
    assert main["spec"]["maxStages"] == 2 and "status" not in main
    status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "sub",
        {"spec": {"maxStages": 9}, "status": {"phase": "Ready", "kopf": {"progress": {}}}})
    assert status["status"] == {"phase": "Ready", "kopf": {"progress": {}}}
    assert status["spec"]["maxStages"] == 2
    with pytest.raises(ApiException) as invalid:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, NS, PLURAL, "sub", {"status": {"phase": "Exploded"}})
    assert invalid.value.status == 422


# ---------------------------------------------------------------------- deletion


def test_finalizers_hold_an_object_until_removed(
    custom: CustomObjectsApi, pipeline_crd: dict[str, Any], http: RawHttp
) -> None:
    held = pipeline("held")
    held["metadata"]["finalizers"] = ["edgeweave.io/cleanup"]
    created = create_pipeline(custom, held)
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "held")
    terminating = get_pipeline(custom, "held")
    assert terminating["metadata"]["deletionTimestamp"]
    assert terminating["metadata"]["finalizers"] == ["edgeweave.io/cleanup"]

    with pytest.raises(ApiException) as forbidden:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "held",
            {"metadata": {"finalizers": ["edgeweave.io/cleanup", "another"]}})
    assert forbidden.value.status == 422

    custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "held",
                                          {"metadata": {"finalizers": None}})
    assert not exists(get_pipeline, custom, "held")
    events = http.watch_lines(
        f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}?watch=true&timeoutSeconds=1"
        f"&resourceVersion={created['metadata']['resourceVersion']}")
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["deletionTimestamp"]


def test_owner_deletion_collects_dependents_recursively(
    core: CoreV1Api, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    owner = create_pipeline(custom, pipeline("owner"))
    pod = core.create_namespaced_pod(NS, make_pod("stage-0", owners=[owner_ref(owner)]))
    pod_ref = {"apiVersion": "v1", "kind": "Pod", "name": "stage-0", "uid": pod.metadata.uid}
    core.create_namespaced_config_map(NS, {"metadata": {"name": "grandchild",
                                                        "ownerReferences": [pod_ref]}})
    core.create_namespaced_pod(NS, make_pod("unrelated"))

    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "owner")
    wait_until(lambda: not exists(core.read_namespaced_pod, "stage-0", NS), what="pod collected")
    wait_until(lambda: not exists(core.read_namespaced_config_map, "grandchild", NS),
               what="grandchild collected")
    assert pod_names(core) == ["unrelated"]


def test_a_dependent_created_after_its_owner_was_deleted_is_collected(
    core: CoreV1Api, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    """A controller acting on a stale cache creates a pod for a Deployment already gone."""
    owner = create_pipeline(custom, pipeline("gone"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "gone")
    wait_until(lambda: not exists(get_pipeline, custom, "gone"), what="owner gone")
    core.create_namespaced_pod(NS, make_pod("late", owners=[owner_ref(owner)]))
    wait_until(lambda: not exists(core.read_namespaced_pod, "late", NS),
               what="the late dependent collected")


def test_a_dependent_with_another_live_owner_survives(
    core: CoreV1Api, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    first = create_pipeline(custom, pipeline("first"))
    second = create_pipeline(custom, pipeline("second"))
    core.create_namespaced_pod(NS, make_pod("shared", owners=[owner_ref(first), owner_ref(second)]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "first")
    wait_until(lambda: len(core.read_namespaced_pod("shared", NS).metadata.owner_references) == 1,
               what="the dangling owner reference dropped")
    assert core.read_namespaced_pod("shared", NS).metadata.owner_references[0].name == "second"


def test_orphan_and_foreground_propagation(
    core: CoreV1Api, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    orphaner = create_pipeline(custom, pipeline("orphaner"))
    core.create_namespaced_pod(NS, make_pod("orphan", owners=[owner_ref(orphaner)]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "orphaner",
                                           propagation_policy="Orphan")
    wait_until(lambda: not exists(get_pipeline, custom, "orphaner"), what="owner gone")
    assert core.read_namespaced_pod("orphan", NS).metadata.owner_references is None

    parent = create_pipeline(custom, pipeline("parent"))
    core.create_namespaced_pod(NS, make_pod("slow", owners=[owner_ref(parent)],
                                            finalizers=["edgeweave.io/drain"]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "parent",
                                           propagation_policy="Foreground")
    waiting = wait_until(lambda: core.read_namespaced_pod("slow", NS).metadata.deletion_timestamp,
                         what="the dependent being deleted first")
    assert waiting
    assert "foregroundDeletion" in get_pipeline(custom, "parent")["metadata"]["finalizers"]
    core.patch_namespaced_pod("slow", NS, {"metadata": {"$deleteFromPrimitiveList/finalizers": [
        "edgeweave.io/drain"]}})
    wait_until(lambda: not exists(get_pipeline, custom, "parent"), what="foreground owner gone")


# ---------------------------------------------------------------------- watch


def test_watch_streams_changes_from_a_resource_version(core: CoreV1Api) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, make_pod("w", {"app": "x"}))
    core.patch_namespaced_pod("w", NS, {"metadata": {"labels": {"tier": "1"}}})
    core.delete_namespaced_pod("w", NS)
    stream = kubernetes.watch.Watch().stream(core.list_namespaced_pod, NS,
                                             resource_version=start, timeout_seconds=1)
    events = [(e["type"], e["object"].metadata.name) for e in stream]
    assert events == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]


def test_watch_reports_objects_crossing_the_selector(core: CoreV1Api, http: RawHttp) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, make_pod("mover", {"edgeweave.io/pipeline": "a"}))
    core.patch_namespaced_pod("mover", NS, {"metadata": {"labels": {"edgeweave.io/pipeline": "b"}}})
    core.patch_namespaced_pod("mover", NS, {"metadata": {"labels": {"edgeweave.io/pipeline": "a"}}})
    events = http.watch_lines(
        "/api/v1/pods?watch=true&timeoutSeconds=1&allowWatchBookmarks=true"
        f"&labelSelector=edgeweave.io%2Fpipeline%3Da&resourceVersion={start}")
    assert [e["type"] for e in events if e["type"] != "BOOKMARK"] == ["ADDED", "DELETED", "ADDED"]


def test_watch_without_resource_version_lists_first_and_can_mark_the_end(
    core: CoreV1Api, http: RawHttp
) -> None:
    core.create_namespaced_pod(NS, make_pod("existing"))
    events = http.watch_lines("/api/v1/namespaces/default/pods?watch=true&timeoutSeconds=1"
                              "&allowWatchBookmarks=true&sendInitialEvents=true"
                              "&resourceVersionMatch=NotOlderThan")
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == "existing"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_watch_from_a_compacted_resource_version_is_gone(http_to: Any) -> None:
    with ApiServer(event_log_limit=10) as small:
        raw = http_to(small.url)
        for index in range(30):
            small.create({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": f"c{index}"}})
        events = raw.watch_lines("/api/v1/configmaps?watch=true&timeoutSeconds=1&resourceVersion=2")
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


def test_watch_delivers_live_events_to_a_waiting_client(core: CoreV1Api) -> None:
    start = core.list_namespaced_pod(NS).metadata.resource_version
    seen: list[str] = []

    def watch() -> None:
        for event in kubernetes.watch.Watch().stream(
            core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=5
        ):
            seen.append(event["type"])
            if event["type"] == "DELETED":
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    core.create_namespaced_pod(NS, make_pod("live"))
    core.delete_namespaced_pod("live", NS)
    watcher.join(30)
    assert seen == ["ADDED", "DELETED"]


# ---------------------------------------------------------------------- events


def test_core_and_events_k8s_io_events_can_be_posted(
    core: CoreV1Api, k8s: kubernetes.client.ApiClient
) -> None:
    core.create_namespaced_event(NS, {
        "metadata": {"generateName": "kopf-event-"}, "type": "Normal", "reason": "Planned",
        "message": "3 stages", "involvedObject": {"kind": "InferencePipeline", "name": "p",
                                                  "namespace": NS},
    })
    kubernetes.client.EventsV1Api(k8s).create_namespaced_event(NS, {
        "metadata": {"name": "e2"}, "eventTime": "2025-01-01T00:00:00.000000Z",
        "reportingController": "edgeweave.io/operator", "reportingInstance": "op-1",
        "action": "Plan", "reason": "Planned", "type": "Normal",
    })
    listed = core.list_namespaced_event(NS, field_selector="involvedObject.name=p").items
    assert [e.reason for e in listed] == ["Planned"]


# ---------------------------------------------------------------------- kopf


def test_kopf_lists_watches_patches_and_posts_events(
    kubeconfig: Path, custom: CustomObjectsApi, core: CoreV1Api, pipeline_crd: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = 5
        settings.persistence.finalizer = "edgeweave.io/test-operator"

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="planning")
    def created(body: Any, patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Planning"
        kopf.info(body, reason="Planned", message="planned by the test operator")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="cleanup")
    def deleted(**_: Any) -> None:
        logging.getLogger(__name__).info("cleaned up")

    create_pipeline(custom, pipeline("before"))  # found by kopf's initial list
    with KopfRunner(["run", "-A", "--standalone"], registry=registry, timeout=60) as runner:
        create_pipeline(custom, pipeline("after"))  # found by kopf's watch
        for name in ("before", "after"):
            wait_until(lambda n=name: (get_pipeline(custom, n).get("status") or {}).get("phase")
                       == "Planning", timeout=30, what=f"kopf to plan {name}")
        assert "edgeweave.io/test-operator" in get_pipeline(custom, "after")["metadata"][
            "finalizers"]
        wait_until(lambda: len(core.list_namespaced_event(
            NS, field_selector="reason=Planned").items) == 2, timeout=30, what="kopf's events")
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "after")
        wait_until(lambda: not exists(get_pipeline, custom, "after"), timeout=30,
                   what="kopf to release its finalizer")
    assert runner.exception is None
    assert "Handler 'planning' succeeded" in runner.output


# ---------------------------------------------------------------------- kubectl

KUBECTL = shutil.which("kubectl")


def kubectl(kubeconfig: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [KUBECTL or "kubectl", f"--cache-dir={tmp_path / 'kubecache'}", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_apply_get_and_delete(kubeconfig: Path, tmp_path: Path) -> None:
    example = REPO / "examples" / "pipelines" / "resnet50-pi4.yaml"
    applied = kubectl(kubeconfig, tmp_path, "apply", "-f", str(CRD_PATH))
    assert applied.returncode == 0, applied.stderr
    applied = kubectl(kubeconfig, tmp_path, "apply", "-f", str(example),
                      "-f", str(REPO / "examples" / "nodes-pi4-mixed.yaml"))
    assert applied.returncode == 0, applied.stderr
    assert "inferencepipeline.edgeweave.io/resnet50 created" in applied.stdout

    listed = kubectl(kubeconfig, tmp_path, "get", "ipl")
    assert listed.returncode == 0, listed.stderr
    header = listed.stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "STAGES", "NODES", "THROUGHPUT", "BOTTLENECK", "AGE"]
    nodes = kubectl(kubeconfig, tmp_path, "get", "nodes", "-l", "edgeweave.io/device-class=rpi5")
    assert nodes.stdout.split()[:7] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "pi5-8g-0",
                                        "Ready"]

    changed = tmp_path / "changed.yaml"
    changed.write_text(example.read_text().replace("objective: throughput", "objective: latency"))
    reapplied = kubectl(kubeconfig, tmp_path, "apply", "-f", str(changed))
    assert "resnet50 configured" in reapplied.stdout, reapplied.stderr
    generation = kubectl(kubeconfig, tmp_path, "get", "ipl", "resnet50", "-o",
                         "jsonpath={.metadata.generation} {.spec.objective}")
    assert generation.stdout == "2 latency"

    broken = tmp_path / "broken.yaml"
    broken.write_text(example.read_text().replace("objective: throughput", "objective: fastest"))
    refused = kubectl(kubeconfig, tmp_path, "apply", "-f", str(broken))
    assert refused.returncode != 0 and 'Unsupported value: "fastest"' in refused.stderr

    deleted = kubectl(kubeconfig, tmp_path, "delete", "-f", str(example))
    assert deleted.returncode == 0 and 'deleted' in deleted.stdout
    gone = kubectl(kubeconfig, tmp_path, "get", "ipl", "resnet50")
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_kubectl_sees_server_side_field_validation_in_openapi(
    http: RawHttp, pipeline_crd: dict[str, Any]
) -> None:
    """kubectl leaves validation to the server only if OpenAPI v3 says the server does it."""
    _, index = http.get("/openapi/v3")
    document_url = index["paths"][f"apis/{GROUP}/{VERSION}"]["serverRelativeURL"]
    status, document = http.get(document_url)
    assert status == 200
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}/{{name}}"
    patch = document["paths"][path]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": GROUP, "version": VERSION, "kind": "InferencePipeline"}
    assert "fieldValidation" in {p["name"] for p in patch["parameters"]}
    explained = document["components"]["schemas"][f"io.edgeweave.{VERSION}.InferencePipeline"]
    assert "replan" in explained["properties"]["spec"]["properties"]


def test_tables_for_kubectl_get_use_the_crd_printer_columns(
    http: RawHttp, custom: CustomObjectsApi, pipeline_crd: dict[str, Any]
) -> None:
    create_pipeline(custom, pipeline("shown"))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "shown", {
        "status": {"phase": "Ready"}})
    status, table = http.get(f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}", headers={
        "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})
    assert status == 200 and table["kind"] == "Table"
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:3] == ["Name", "Phase", "Stages"]
    assert table["rows"][0]["cells"][:2] == ["shown", "Ready"]
    assert table["rows"][0]["object"]["metadata"]["name"] == "shown"


def test_a_test_reaction_injects_faults_in_front_of_the_emulation(
    api_server: ApiServer, core: CoreV1Api
) -> None:
    """kmock's DSL still works: a reaction answers before the emulated API does."""
    import kmock

    api_server.call(lambda api: api["list", kmock.resource("v1/pods")] << 503)
    with pytest.raises(ApiException) as unavailable:
        core.list_namespaced_pod(NS)
    assert unavailable.value.status == 503
    assert core.list_namespaced_config_map(NS).items == []  # other requests unaffected


def test_sync_helpers_drive_nodes_as_the_sandbox_does(api_server: ApiServer) -> None:
    created = api_server.apply_file(REPO / "examples" / "nodes-pi4-mixed.yaml")
    assert len(created) == 8 and all(n["kind"] == "Node" for n in created)
    rpi4 = api_server.list("v1", "Node", label_selector="edgeweave.io/device-class=rpi4")
    assert len(rpi4) == 6

    def ready(name: str) -> str:
        node = api_server.get("v1", "Node", name)
        assert node is not None
        return next(c["status"] for c in node["status"]["conditions"] if c["type"] == "Ready")

    assert ready("pi4-4g-0") == "True"
    api_server.set_node_ready("pi4-4g-0", False)
    assert ready("pi4-4g-0") == "False"
    api_server.delete_node("pi4-4g-0")
    assert api_server.get("v1", "Node", "pi4-4g-0") is None
    assert api_server.emulator is not None
    history = api_server.call(lambda api: api.objects["v1/nodes", None, "pi4-4g-0"].history)
    assert history[-1] is None  # kmock's objects keep the deleted node's versions


def test_kubeconfig_points_the_client_at_the_server(api_server: ApiServer, tmp_path: Path) -> None:
    path = api_server.write_kubeconfig(tmp_path / "nested" / "kubeconfig")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    config = yaml.safe_load(path.read_text())
    assert config["clusters"][0]["cluster"]["server"] == api_server.url
    client = kubernetes.config.new_client_from_config(config_file=str(path))
    with client:
        names = [n.metadata.name for n in CoreV1Api(client).list_namespace().items]
    assert names == ["default", "kube-node-lease", "kube-public", "kube-system"]


def test_a_taken_port_is_reported_with_the_address(api_server: ApiServer) -> None:
    from edgeweave.sandbox import SandboxError

    assert api_server.port is not None
    with pytest.raises(SandboxError, match=f"127.0.0.1:{api_server.port}"):
        ApiServer(port=api_server.port).start()
