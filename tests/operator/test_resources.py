"""Desired objects, create-or-patch, the model store and the shard server."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest

from edgeweave.api.v1alpha1 import InferencePipelineSpec
from edgeweave.errors import EdgeweaveError
from edgeweave.modelstore import (
    ChecksumMismatchError,
    ModelInputError,
    ModelNotFoundError,
    ModelStore,
    ModelUnreachableError,
    model_metadata,
    plan_pipeline,
)
from edgeweave.operator import resources as r
from edgeweave.operator import settings as s
from edgeweave.operator.shardserver import ShardGrants, ShardServer
from edgeweave.partition.costmodel import Node
from edgeweave.worker.shardfile import read_shard

CONFIG = s.OperatorConfig(cache_dir=Path("/nonexistent"), shard_base_url="http://op.ops.svc:8081")
REF = r.PipelineRef(name="vision", namespace="edge", uid="uid-1234")


def spec(**overrides: Any) -> InferencePipelineSpec:
    return InferencePipelineSpec.model_validate({"model": {"uri": "zoo:mobilenet_v2"},
                                                 **overrides})


def rollout(pipeline_spec: InferencePipelineSpec | None = None, nodes: tuple = (("a",), ("b", "c")),
            ) -> r.Rollout:
    stages = tuple(
        r.StageLayout(index=i, nodes=names,
                      shard=r.StageShard(f"{i:064x}", memory_bytes=(i + 1) * 2**20),
                      threads={n: 4 for n in names})
        for i, names in enumerate(nodes)
    )
    return r.Rollout(ref=REF, spec=pipeline_spec or spec(), plan_hash="0123456789abcdef",
                     stages=stages, config=CONFIG)


def args_of(container: dict[str, Any], flag: str) -> list[str]:
    args = container["args"]
    return [args[i + 1] for i, arg in enumerate(args) if arg == flag]


# --------------------------------------------------------------------------- builders


def test_each_replica_is_one_pod_pinned_to_its_node_and_owned() -> None:
    plan = rollout()
    objects = r.stage_objects(plan)
    pods = [o for o in objects if o["kind"] == "Pod"]
    assert [(p["spec"]["nodeName"], p["metadata"]["labels"][s.LABEL_STAGE]) for p in pods] == [
        ("a", "0"), ("b", "1"), ("c", "1")]
    for pod in pods:
        meta = pod["metadata"]
        assert meta["ownerReferences"] == [REF.owner_reference()]
        assert meta["ownerReferences"][0]["controller"] is True
        assert meta["labels"][s.LABEL_PIPELINE] == "vision"
        assert meta["labels"][s.LABEL_PLAN_HASH] == "0123456789abcdef"
        assert meta["name"] == f"vision-s{meta['labels'][s.LABEL_STAGE]}-{plan.revision}-" \
                               f"{pod['spec']['nodeName']}"
        assert pod["spec"]["hostname"] == meta["name"]
        assert len(meta["name"]) <= 63


def test_stage_pods_fetch_their_own_shard_and_send_to_the_next_stage() -> None:
    plan = rollout()
    pods = {p["metadata"]["name"]: p for p in r.stage_objects(plan) if p["kind"] == "Pod"}
    first = pods[r.stage_pod_name("vision", 0, plan.revision, "a")]["spec"]["containers"][0]
    assert first["command"] == ["edgeweave"] and first["args"][0] == "worker"
    assert args_of(first, "--shard") == [f"http://op.ops.svc:8081/shards/{0:064x}"]
    assert args_of(first, "--shard-sha256") == [f"{0:064x}"]
    assert args_of(first, "--threads") == ["4"]
    service = r.stage_service_name("vision", 1, plan.revision)
    assert args_of(first, "--downstream") == [
        f"http://{r.stage_pod_name('vision', 1, plan.revision, n)}.{service}.edge.svc."
        f"cluster.local:{s.WORKER_PORT}" for n in ("b", "c")]
    last = pods[r.stage_pod_name("vision", 1, plan.revision, "c")]["spec"]["containers"][0]
    assert args_of(last, "--downstream") == ["http://vision-gateway.edge.svc.cluster.local:8080"]
    assert args_of(last, "--token-file") == [f"{s.TOKEN_MOUNT}/{s.TOKEN_KEY}"]


def test_stage_services_are_headless_and_select_one_revision() -> None:
    plan = rollout()
    service = r.stage_service(plan, 1)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {s.LABEL_PIPELINE: "vision", s.LABEL_STAGE: "1",
                                           s.LABEL_REVISION: plan.revision}
    pod = r.stage_pod(plan, 1, "b")
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for obj in [r.stage_pod(rollout(), 0, "a"), r.gateway_deployment(rollout(), "r")]:
        pod_spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod_spec["automountServiceAccountToken"] is False
        for container in pod_spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["runAsNonRoot"] is True


def test_names_are_deterministic_and_long_node_names_are_trimmed_uniquely() -> None:
    assert r.stage_objects(rollout()) == r.stage_objects(rollout())
    long_a, long_b = "node-" + "a" * 80, "node-" + "a" * 79 + "b"
    name_a = r.stage_pod_name("vision", 0, "deadbeef", long_a)
    name_b = r.stage_pod_name("vision", 0, "deadbeef", long_b)
    assert len(name_a) <= 63 and len(name_b) <= 63 and name_a != name_b
    dotted = r.stage_pod_name("vision", 0, "deadbeef", "Pi4.Rack_2")
    assert dotted == "vision-s0-deadbeef-pi4-rack-2"


def test_the_revision_moves_with_the_image_and_not_otherwise() -> None:
    assert rollout().revision == rollout().revision
    assert rollout(spec(workerImage="registry.local/worker:2")).revision != rollout().revision


def test_the_gateway_sends_to_stage_zero_and_mounts_the_api_key() -> None:
    plan = rollout(spec(auth={"apiKeySecretRef": {"name": "keys", "key": "vision"}},
                        gateway={"port": 9090, "replicas": 2}))
    deployment = r.gateway_deployment(plan, plan.revision)
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    route_file = args_of(container, "--stage0-file")
    assert route_file == [f"{s.STAGE0_MOUNT}/{s.STAGE0_KEY}"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["stage0"] == s.STAGE0_MOUNT
    configmap = r.stage0_configmap(plan, serial=3)
    route = r.route_of_configmap(configmap)
    assert route is not None
    assert (route.urls, route.revision, route.serial) == (tuple(r.stage_urls(plan, 0)),
                                                          plan.revision, 3)
    assert args_of(container, "--api-key-file") == [f"{s.API_KEY_MOUNT}/api-key"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["stage0"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["api-key"]["secret"] == {"secretName": "keys",
                                            "items": [{"key": "vision", "path": "api-key"}]}
    service = r.gateway_service(REF, plan.spec)
    assert service["spec"]["ports"][0]["port"] == 9090
    # The gateway turns Ready only after a result came back through the Service.
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert r.gateway_url(REF, 9090, CONFIG) == "http://vision-gateway.edge.svc.cluster.local:9090"


def test_each_gateway_pod_advertises_its_own_address_for_results() -> None:
    """With several replicas behind the Service, the last stage must reach the one that
    holds a request: each pod names itself, by the pod IP the downward API gives it."""
    from edgeweave.cli.gateway import bracketed_ipv6
    from edgeweave.sandbox.runner import expand
    from edgeweave.worker.frames import reply_to_problem

    plan = rollout(spec(gateway={"replicas": 3}))
    container = r.gateway_deployment(plan, plan.revision)["spec"]["template"]["spec"][
        "containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    [advertised] = args_of(container, "--advertise-url")
    assert advertised == f"http://$(POD_IP):{s.GATEWAY_CONTAINER_PORT}"
    for pod_ip, url in (("10.42.0.7", "http://10.42.0.7"), ("fd00::7", "http://[fd00::7]")):
        expanded = bracketed_ipv6(expand(advertised, {"POD_IP": pod_ip}))
        assert expanded == f"{url}:{s.GATEWAY_CONTAINER_PORT}"
        assert reply_to_problem(expanded) is None


def test_readiness_and_failures_are_read_from_the_kubelet() -> None:
    assert r.pod_ready({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert not r.pod_ready({"status": {"phase": "Running"}})
    crash = {"status": {"containerStatuses": [
        {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}
    assert r.pod_failure(crash) == "CrashLoopBackOff"
    deployment = {"metadata": {"generation": 2}, "spec": {"replicas": 1},
                  "status": {"observedGeneration": 1, "updatedReplicas": 1,
                             "availableReplicas": 1, "replicas": 1}}
    assert not r.deployment_rolled_out(deployment)
    deployment["status"]["observedGeneration"] = 2
    assert r.deployment_rolled_out(deployment)


def test_the_deployment_settings_come_from_the_environment() -> None:
    config = s.OperatorConfig.from_env({
        "POD_NAMESPACE": "ops", "EDGEWEAVE_SHARD_PORT": "9443",
        "EDGEWEAVE_CACHE_DIR": "/var/cache/edgeweave",
        "EDGEWEAVE_WORKER_IMAGE": "registry.local/worker:1",
    })
    assert config.shard_base_url == "http://edgeweave-operator.ops.svc:9443"
    assert config.shard_port == 9443 and config.cache_dir == Path("/var/cache/edgeweave")
    assert config.worker_image == "registry.local/worker:1"
    assert rollout().image == s.DEFAULT_WORKER_IMAGE
    assert r.Rollout(REF, spec(), "h", (), config).image == "registry.local/worker:1"


# --------------------------------------------------------------------------- apply


@pytest.fixture
def kube(api_server: Any, k8s: Any) -> r.Kube:
    """:class:`Kube` on the conftest's emulated API, with the namespace the objects use."""
    api_server.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "edge"}})
    return r.Kube(k8s)


def test_apply_creates_then_leaves_alone_then_patches(kube: r.Kube) -> None:
    service = r.gateway_service(REF, spec())
    assert r.apply(kube, service) is r.Applied.created
    assert r.apply(kube, service) is r.Applied.unchanged
    service["spec"]["ports"][0]["port"] = 9999
    assert r.apply(kube, service) is r.Applied.patched
    stored = kube.get(r.SERVICES, "edge", "vision-gateway")
    assert stored is not None and stored["spec"]["ports"][0]["port"] == 9999
    assert len(kube.list(r.SERVICES, "edge", {s.LABEL_PIPELINE: "vision"})) == 1


def test_apply_replaces_a_pod_whose_template_changed(kube: r.Kube) -> None:
    pod = r.stage_pod(rollout(), 0, "a")
    assert r.apply(kube, pod) is r.Applied.created
    first_uid = kube.get(r.PODS, "edge", pod["metadata"]["name"])["metadata"]["uid"]  # type: ignore[index]
    assert r.apply(kube, pod) is r.Applied.unchanged
    changed = r.stage_pod(rollout(), 0, "a")
    changed["spec"]["containers"][0]["args"][-1] = "renamed"
    changed["metadata"]["annotations"][s.ANNOTATION_TEMPLATE_HASH] = "other"
    assert r.apply(kube, changed) is r.Applied.replaced
    second = kube.get(r.PODS, "edge", pod["metadata"]["name"])
    assert second is not None and second["metadata"]["uid"] != first_uid


def test_apply_never_overwrites_the_token(kube: r.Kube) -> None:
    assert r.apply(kube, r.token_secret(REF, "first-token")) is r.Applied.created
    r.apply(kube, r.token_secret(REF, "second-token"))
    secret = kube.get(r.SECRETS, "edge", "vision-token")
    assert secret is not None
    stored = secret.get("stringData", {}).get("token") or __import__("base64").b64decode(
        secret["data"]["token"]).decode()
    assert stored == "first-token"


def test_list_filters_by_label_and_delete_reports_absence(kube: r.Kube) -> None:
    r.apply(kube, r.stage_service(rollout(), 0))
    found = kube.list(r.SERVICES, "edge", {s.LABEL_STAGE: "0"})
    assert [svc["metadata"]["name"] for svc in found] == [
        r.stage_service_name("vision", 0, rollout().revision)]
    name = found[0]["metadata"]["name"]
    assert kube.delete(r.SERVICES, "edge", name) is True
    assert kube.delete(r.SERVICES, "edge", name) is False


# --------------------------------------------------------------------------- model store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


def test_zoo_models_are_built_once_with_seeded_weights(store: ModelStore) -> None:
    first = store.resolve("zoo:mobilenet_v2")
    again = store.resolve("zoo:mobilenet_v2")
    assert first == again and first.path.stat().st_size > 10_000_000
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.sha256
    assert store.resolve("zoo:mobilenet_v2", first.sha256.upper()) == first


def test_bad_uris_say_what_to_fix(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'nosuchnet' in the zoo"):
        store.resolve("zoo:nosuchnet")
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path}/missing.onnx"):
        store.resolve(f"file://{tmp_path}/missing.onnx")
    with pytest.raises(ChecksumMismatchError, match=r"spec\.model\.sha256 is 0{64}"):
        store.resolve("zoo:mobilenet_v2", "0" * 64)


class _Files(http.server.SimpleHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Files.hits.append(self.path)
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    handler = lambda *a, **k: _Files(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Files.hits.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_models_are_downloaded_once_and_checked(
    store: ModelStore, tmp_path: Path, file_server: str
) -> None:
    source = store.resolve("zoo:mobilenet_v2")
    (tmp_path / "net.onnx").write_bytes(source.path.read_bytes())
    downloaded = store.resolve(f"{file_server}/net.onnx", source.sha256)
    assert downloaded.sha256 == source.sha256 and downloaded.name in ("net", "mobilenet_v2")
    fresh = ModelStore(tmp_path / "cache")
    first = fresh.resolve(f"{file_server}/net.onnx")
    again = fresh.resolve(f"{file_server}/net.onnx")
    assert first == again and _Files.hits == ["/net.onnx"]
    with pytest.raises(ChecksumMismatchError):
        ModelStore(tmp_path / "other").resolve(f"{file_server}/net.onnx", "f" * 64)
    with pytest.raises(ModelNotFoundError, match="HTTP 404"):
        fresh.resolve(f"{file_server}/absent.onnx")


def test_an_unreachable_server_is_a_passing_failure(store: ModelStore) -> None:
    with pytest.raises(ModelUnreachableError, match=r"127\.0\.0\.1:9"):
        store.resolve("http://127.0.0.1:9/model.onnx")


def test_shards_are_content_addressed_and_split_once(store: ModelStore) -> None:
    model = store.resolve("zoo:mobilenet_v2")
    profiled = store.profile(model)
    nodes = [Node(f"n{i}", "pi", 40 * 2**20, 125e6, gflops=10) for i in range(3)]
    plan = plan_pipeline(profiled, nodes, spec())
    assert len(plan.stages) >= 2
    shards = store.shards(model, profiled, plan)
    assert [shard.index for shard in shards] == list(range(len(plan.stages)))
    for shard in shards:
        assert shard.path.name == f"{shard.sha256}.onnx"
        assert hashlib.sha256(shard.path.read_bytes()).hexdigest() == shard.sha256
        assert store.shard_path(shard.sha256) == shard.path
    stamps = [shard.path.stat().st_mtime_ns for shard in shards]
    assert store.shards(model, profiled, plan) == shards
    assert [shard.path.stat().st_mtime_ns for shard in shards] == stamps
    assert store.shard_path("../../etc/passwd") is None


def test_metadata_describes_the_models_inputs_and_outputs(store: ModelStore) -> None:
    profiled = store.profile(store.resolve("zoo:mobilenet_v2"))
    metadata = model_metadata(profiled, "vision")
    assert metadata["name"] == "vision"
    assert [(i["datatype"], len(i["shape"])) for i in metadata["inputs"]] == [("FP32", 4)]
    assert metadata["outputs"] and metadata["outputs"][0]["datatype"] == "FP32"


def test_input_overrides_are_checked_against_the_model(store: ModelStore) -> None:
    model = store.resolve("zoo:mobilenet_v2")
    bad = spec(model={"uri": "zoo:mobilenet_v2", "inputs": [{"name": "pixels",
                                                            "shape": [1, 3, 224, 224]}]})
    with pytest.raises(ModelInputError, match=r"spec\.model\.inputs\[0\]\.name.*'pixels'"):
        store.profile(model, inputs=bad.model.inputs)


# --------------------------------------------------------------------------- shard server


def test_shards_are_served_only_with_the_pipelines_token(store: ModelStore) -> None:
    model = store.resolve("zoo:mobilenet_v2")
    profiled = store.profile(model)
    nodes = [Node(f"n{i}", "pi", 40 * 2**20, 125e6, gflops=10) for i in range(3)]
    shards = store.shards(model, profiled, plan_pipeline(profiled, nodes, spec()))
    mine, other = shards[0], shards[1]

    async def scenario() -> None:
        grants = ShardGrants()
        grants.grant("edge/vision", "vision-token", [mine.sha256])
        grants.grant("edge/other", "other-token", [other.sha256])
        server = ShardServer(grants, store.shard_path, "127.0.0.1", 0)
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        config = s.OperatorConfig(cache_dir=store.root, shard_base_url=base)
        try:
            async with aiohttp.ClientSession() as session:
                url = f"{base}/shards/{mine.sha256}"
                async with session.get(url) as response:
                    assert response.status == 401
                async with session.get(url, headers=_bearer("other-token")) as response:
                    assert response.status == 404
                async with session.get(url, headers=_bearer("vision-token")) as response:
                    assert response.status == 200
                    body = await response.read()
                    assert hashlib.sha256(body).hexdigest() == mine.sha256
                    assert response.headers["X-Content-Sha256"] == mine.sha256
                async with session.get(f"{base}/shards/{other.sha256}",
                                       headers=_bearer("vision-token")) as response:
                    assert response.status == 404
                grants.revoke("edge/vision")
                async with session.get(url, headers=_bearer("vision-token")) as response:
                    assert response.status == 404
                async with session.get(f"{base}/healthz") as response:
                    assert response.status == 200
                grants.grant("edge/vision", "vision-token", [mine.sha256])
                # What a stage pod runs: the worker's own fetch, checked by sha256.
                fetched = await read_shard(r.shard_url(config, mine.sha256),
                                           sha256=mine.sha256, token="vision-token")
                assert hashlib.sha256(fetched).hexdigest() == mine.sha256
        finally:
            await server.stop()

    asyncio.run(scenario())


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_layer_costs_come_from_the_environment_and_a_typo_is_named() -> None:
    assert s.OperatorConfig.from_env({}).layer_costs == "measured"
    assert s.OperatorConfig.from_env({"EDGEWEAVE_LAYER_COSTS": "flops"}).layer_costs == "flops"
    with pytest.raises(EdgeweaveError, match=r"EDGEWEAVE_LAYER_COSTS='flop'.*measured"):
        s.OperatorConfig.from_env({"EDGEWEAVE_LAYER_COSTS": "flop"})
