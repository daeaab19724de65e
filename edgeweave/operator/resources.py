"""The Kubernetes objects of one pipeline, and how they are applied.

The first half builds *desired* objects as plain dicts, purely from the plan and the
spec, so that the same inputs always give the same objects (the idempotence of the
operator rests on it): the token Secret, the plan ConfigMap, one Pod per stage
replica pinned to its planned node, one headless Service per stage, and the gateway
Deployment and Service.

Stage objects carry the plan's *revision* (the plan hash plus the pod template's
inputs) in their names and labels, so that during a make-before-break rollout the
new plan's pods and Services sit beside the old ones without clashing, and the old
revision can be removed as a whole once the new one serves. Every object has an
owner reference to the pipeline, so deleting the pipeline deletes them.

The second half, :class:`Kube` and :func:`apply`, is a thin create-or-patch layer on
the official client's REST plumbing, working on plain JSON, so that what is compared
is exactly what the API server stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from edgeweave.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION, InferencePipelineSpec
from edgeweave.errors import EdgeweaveError
from edgeweave.operator import settings as s
from edgeweave.worker.routing import RouteError, Stage0Route

log = logging.getLogger(__name__)

MAX_NAME = 63
"""A DNS label: pod hostnames, Service names and label values are held to it."""


# --------------------------------------------------------------------------- names


def dns_label(text: str) -> str:
    """``text`` as a DNS-1123 label: lowercase alphanumerics and '-', no edge dashes."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label or "x"


def trimmed(name: str, limit: int = MAX_NAME) -> str:
    """``name`` cut to ``limit`` characters, with a hash of the whole to stay unique."""
    if len(name) <= limit:
        return name
    suffix = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{suffix}"


def token_secret_name(pipeline: str) -> str:
    return f"{pipeline}-token"


def plan_configmap_name(pipeline: str) -> str:
    return f"{pipeline}-plan"


def gateway_name(pipeline: str) -> str:
    return f"{pipeline}-gateway"


def stage0_configmap_name(pipeline: str) -> str:
    return f"{pipeline}-stage0"


def stage_service_name(pipeline: str, stage: int, revision: str) -> str:
    return trimmed(f"{pipeline}-s{stage}-{revision}")


def stage_pod_name(pipeline: str, stage: int, revision: str, node: str) -> str:
    """``<pipeline>-s<stage>-<revision>-<node>``: deterministic, and a valid hostname."""
    return trimmed(f"{pipeline}-s{stage}-{revision}-{dns_label(node)}")


def revision_of(plan_hash: str, template: Mapping[str, Any]) -> str:
    """8 hex digits naming a plan together with what its pods are built from."""
    canonical = json.dumps({"plan": plan_hash, "template": template}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PipelineRef:
    """The pipeline object every derived object points back to."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self, component: str) -> dict[str, str]:
        return {
            s.LABEL_PIPELINE: self.name,
            s.LABEL_COMPONENT: component,
            s.LABEL_MANAGED_BY: s.MANAGED_BY,
        }


@dataclass(frozen=True)
class StageShard:
    """A stage's shard as the pods need it: where to fetch it and how to check it."""

    sha256: str
    memory_bytes: int


@dataclass(frozen=True)
class StageLayout:
    """One stage of the plan in force: its replica nodes, shard and per-node threads."""

    index: int
    nodes: tuple[str, ...]
    shard: StageShard
    threads: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """Everything the stage pods of one revision are built from."""

    ref: PipelineRef
    spec: InferencePipelineSpec
    plan_hash: str
    stages: tuple[StageLayout, ...]
    config: s.OperatorConfig

    @property
    def image(self) -> str:
        return self.spec.worker_image or self.config.worker_image

    @property
    def revision(self) -> str:
        return revision_of(self.plan_hash, self.template_inputs())

    def template_inputs(self) -> dict[str, Any]:
        """What besides the plan shapes the pods: a change here rolls them out too."""
        resources = self.spec.resources.to_dict() if self.spec.resources else None
        return {
            "image": self.image,
            "pullPolicy": self.config.image_pull_policy,
            "resources": resources,
            "shards": [stage.shard.sha256 for stage in self.stages],
            "threads": [sorted(stage.threads.items()) for stage in self.stages],
            "shardBase": self.config.shard_base_url,
            "gatewayPort": self.spec.gateway.port,
        }


# --------------------------------------------------------------------------- urls


def service_host(name: str, namespace: str, config: s.OperatorConfig) -> str:
    return f"{name}.{namespace}.svc.{config.cluster_domain}"


def stage_pod_url(rollout: Rollout, stage: int, node: str) -> str:
    """The address of one replica: ``<hostname>.<stage service>`` resolves to the pod."""
    ref, revision = rollout.ref, rollout.revision
    pod = stage_pod_name(ref.name, stage, revision, node)
    service = stage_service_name(ref.name, stage, revision)
    return f"http://{pod}.{service_host(service, ref.namespace, rollout.config)}:{s.WORKER_PORT}"


def stage_urls(rollout: Rollout, stage: int) -> list[str]:
    return [stage_pod_url(rollout, stage, node) for node in rollout.stages[stage].nodes]


def gateway_url(ref: PipelineRef, port: int, config: s.OperatorConfig) -> str:
    """The pipeline's endpoint: the gateway Service (what ``status.endpoint`` says)."""
    return f"http://{service_host(gateway_name(ref.name), ref.namespace, config)}:{port}"


def shard_url(config: s.OperatorConfig, sha256: str) -> str:
    return f"{config.shard_base_url}/shards/{urllib.parse.quote(sha256)}"


# --------------------------------------------------------------------------- objects


def _metadata(
    name: str,
    ref: PipelineRef,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": ref.namespace,
        "labels": dict(labels),
        "ownerReferences": [ref.owner_reference()],
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def token_secret(ref: PipelineRef, token: str) -> dict[str, Any]:
    """The pipeline's bearer token: stages and gateway require it of each other."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(token_secret_name(ref.name), ref, ref.labels("token")),
        "type": "Opaque",
        "stringData": {s.TOKEN_KEY: token},
    }


def plan_configmap(
    ref: PipelineRef, plan: Mapping[str, Any], metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """The plan in force and the model's protocol metadata (mounted by the gateway)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan_configmap_name(ref.name), ref, ref.labels("plan")),
        "data": {
            s.PLAN_KEY: json.dumps(plan, indent=2, sort_keys=True),
            s.METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True),
        },
    }


def stage_labels(rollout: Rollout, stage: int) -> dict[str, str]:
    return {
        **rollout.ref.labels(s.COMPONENT_STAGE),
        s.LABEL_STAGE: str(stage),
        s.LABEL_PLAN_HASH: rollout.plan_hash,
        s.LABEL_REVISION: rollout.revision,
    }


def stage_service(rollout: Rollout, stage: int) -> dict[str, Any]:
    """Headless: it gives each replica a DNS name; traffic never goes through it."""
    labels = stage_labels(rollout, stage)
    selector = {key: labels[key] for key in (s.LABEL_PIPELINE, s.LABEL_STAGE, s.LABEL_REVISION)}
    name = stage_service_name(rollout.ref.name, stage, rollout.revision)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, rollout.ref, labels),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            # Replicas must be reachable by name before they are Ready: the upstream
            # link connects while the shard loads, and retries until it answers.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "stream", "port": s.WORKER_PORT, "targetPort": s.WORKER_PORT}],
        },
    }


def stage_pod(rollout: Rollout, stage: int, node: str) -> dict[str, Any]:
    """One replica of one stage, pinned to its planned node by ``spec.nodeName``."""
    ref, revision = rollout.ref, rollout.revision
    layout = rollout.stages[stage]
    name = stage_pod_name(ref.name, stage, revision, node)
    downstream = (
        stage_urls(rollout, stage + 1)
        if stage + 1 < len(rollout.stages)
        else [gateway_url(ref, rollout.spec.gateway.port, rollout.config)]
    )
    args = [
        "worker",
        "--shard", shard_url(rollout.config, layout.shard.sha256),
        "--shard-sha256", layout.shard.sha256,
        "--listen", f"0.0.0.0:{s.WORKER_PORT}",
        *[arg for url in downstream for arg in ("--downstream", url)],
        "--token-file", f"{s.TOKEN_MOUNT}/{s.TOKEN_KEY}",
        "--threads", str(layout.threads.get(node, 1)),
        "--name", name,
    ]
    container = _container(
        "stage", rollout, args, port=s.WORKER_PORT,
        readiness={"httpGet": {"path": "/readyz", "port": s.WORKER_PORT}},
        liveness={"httpGet": {"path": "/healthz", "port": s.WORKER_PORT}},
    )
    if rollout.spec.resources is not None:
        container["resources"] = rollout.spec.resources.to_dict()
    pod_spec = {
        **_pod_security(),
        "nodeName": node,
        "hostname": name,
        "subdomain": stage_service_name(ref.name, stage, revision),
        "restartPolicy": "Always",
        "containers": [container],
        "volumes": [_token_volume(ref), _tmp_volume()],
    }
    annotations = {
        s.ANNOTATION_SHARD_SHA256: layout.shard.sha256,
        s.ANNOTATION_MEMORY_BYTES: str(layout.shard.memory_bytes),
    }
    annotations[s.ANNOTATION_TEMPLATE_HASH] = _hash_of(pod_spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(name, ref, stage_labels(rollout, stage), annotations),
        "spec": pod_spec,
    }


def stage_objects(rollout: Rollout) -> list[dict[str, Any]]:
    """A revision's Services then Pods, stage by stage (Services first: pods need DNS)."""
    services = [stage_service(rollout, stage.index) for stage in rollout.stages]
    pods = [
        stage_pod(rollout, stage.index, node) for stage in rollout.stages for node in stage.nodes
    ]
    return services + pods


def stage0_configmap(rollout: Rollout, serial: int) -> dict[str, Any]:
    """Where the gateway sends: switched by rewriting this, never by a new gateway pod
    (a new pod would lose the requests the old one holds)."""
    ref = rollout.ref
    route = stage0_route(rollout, serial)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(stage0_configmap_name(ref.name), ref, ref.labels("stage0")),
        "data": {s.STAGE0_KEY: route.to_json()},
    }


def stage0_route(rollout: Rollout, serial: int) -> Stage0Route:
    return Stage0Route(revision=rollout.revision, urls=tuple(stage_urls(rollout, 0)),
                       serial=serial)


def route_of_configmap(configmap: Mapping[str, Any] | None) -> Stage0Route | None:
    """The route an existing ConfigMap holds (None when absent or unreadable)."""
    text = ((configmap or {}).get("data") or {}).get(s.STAGE0_KEY)
    if not text:
        return None
    try:
        return Stage0Route.from_json(text)
    except RouteError:
        return None


def gateway_deployment(rollout: Rollout, stage0_revision: str) -> dict[str, Any]:
    """The front door. Its pods follow the route ConfigMap (and the operator's pushes);
    ``stage0_revision`` records the plan revision every gateway pod confirmed following,
    so the template never changes with a re-plan and the pods live on.

    Each pod advertises its own address (the downward API's pod IP): the last stage
    sends a result to the replica that holds the request, not through the Service, which
    could pick another replica once there are several."""
    ref, spec = rollout.ref, rollout.spec
    labels = ref.labels(s.COMPONENT_GATEWAY)
    pod_ip = "POD_IP"
    args = [
        "gateway",
        "--model-name", ref.name,
        "--metadata", f"{s.PLAN_MOUNT}/{s.METADATA_KEY}",
        "--listen", f"0.0.0.0:{s.GATEWAY_CONTAINER_PORT}",
        "--advertise-url", f"http://$({pod_ip}):{s.GATEWAY_CONTAINER_PORT}",
        "--stage0-file", f"{s.STAGE0_MOUNT}/{s.STAGE0_KEY}",
        "--token-file", f"{s.TOKEN_MOUNT}/{s.TOKEN_KEY}",
    ]
    volumes = [_token_volume(ref), _plan_volume(ref), _tmp_volume(),
               {"name": "stage0", "configMap": {"name": stage0_configmap_name(ref.name)}}]
    key_ref = spec.auth.api_key_secret_ref
    if key_ref is not None:
        args += ["--api-key-file", f"{s.API_KEY_MOUNT}/api-key"]
        volumes.append({
            "name": "api-key",
            "secret": {"secretName": key_ref.name, "items": [{"key": key_ref.key,
                                                              "path": "api-key"}]},
        })
    container = _container(
        "gateway", rollout, args, port=s.GATEWAY_CONTAINER_PORT,
        readiness={"httpGet": {"path": "/v2/health/ready", "port": s.GATEWAY_CONTAINER_PORT}},
        liveness={"tcpSocket": {"port": s.GATEWAY_CONTAINER_PORT}},
    )
    # Kubernetes expands $(POD_IP) in args from the container's own env.
    container["env"] = [{"name": pod_ip,
                         "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    if key_ref is not None:
        container["volumeMounts"].append(
            {"name": "api-key", "mountPath": s.API_KEY_MOUNT, "readOnly": True}
        )
    container["volumeMounts"].append(
        {"name": "plan", "mountPath": s.PLAN_MOUNT, "readOnly": True}
    )
    container["volumeMounts"].append(
        {"name": "stage0", "mountPath": s.STAGE0_MOUNT, "readOnly": True}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(
            gateway_name(ref.name), ref, labels, {s.ANNOTATION_STAGE0: stage0_revision}
        ),
        "spec": {
            "replicas": spec.gateway.replicas,
            "selector": {"matchLabels": {s.LABEL_PIPELINE: ref.name,
                                         s.LABEL_COMPONENT: s.COMPONENT_GATEWAY}},
            # A new gateway must be up before the old one goes: it holds requests.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {**_pod_security(), "containers": [container], "volumes": volumes},
            },
        },
    }


def gateway_service(ref: PipelineRef, spec: InferencePipelineSpec,
                    service_type: str = "ClusterIP") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(gateway_name(ref.name), ref, ref.labels(s.COMPONENT_GATEWAY)),
        "spec": {
            "selector": {s.LABEL_PIPELINE: ref.name, s.LABEL_COMPONENT: s.COMPONENT_GATEWAY},
            # The last stage streams results here, and a gateway turns Ready only once a
            # result came back: endpoints that waited for Ready would never get one.
            "publishNotReadyAddresses": True,
            "type": service_type,
            "ports": [{"name": "http", "port": spec.gateway.port,
                       "targetPort": s.GATEWAY_CONTAINER_PORT}],
        },
    }


def _container(
    name: str,
    rollout: Rollout,
    args: list[str],
    *,
    port: int,
    readiness: Mapping[str, Any],
    liveness: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "image": rollout.image,
        "imagePullPolicy": rollout.config.image_pull_policy,
        "command": ["edgeweave"],
        "args": args,
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {**readiness, "periodSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {**liveness, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "token", "mountPath": s.TOKEN_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _pod_security() -> dict[str, Any]:
    """The restricted Pod Security Standard; stage pods never talk to the API server."""
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": s.RUN_AS_USER,
            "runAsGroup": s.RUN_AS_USER,
            "fsGroup": s.RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _token_volume(ref: PipelineRef) -> dict[str, Any]:
    return {"name": "token", "secret": {"secretName": token_secret_name(ref.name),
                                        "defaultMode": 0o440}}


def _plan_volume(ref: PipelineRef) -> dict[str, Any]:
    return {"name": "plan", "configMap": {"name": plan_configmap_name(ref.name)}}


def _tmp_volume() -> dict[str, Any]:
    # The root filesystem is read-only; onnxruntime and aiohttp may still want scratch.
    return {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}


def _hash_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- observed state


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The kubelet's verdict: the pod's ``Ready`` condition is True."""
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_failure(pod: Mapping[str, Any]) -> str | None:
    """Why a pod will not become Ready on its own (failed, crash-looping), if it won't."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return status.get("reason") or status.get("message") or "Failed"
    for container in status.get("containerStatuses") or ():
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in {"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff",
                                     "CreateContainerConfigError", "InvalidImageName"}:
            return str(waiting["reason"])
    return None


def deployment_rolled_out(deployment: Mapping[str, Any] | None) -> bool:
    """Whether every replica runs the current template and is available."""
    if deployment is None:
        return False
    metadata, spec = deployment.get("metadata") or {}, deployment.get("spec") or {}
    status = deployment.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    generation = metadata.get("generation")
    if generation is not None and int(status.get("observedGeneration", 0)) < int(generation):
        return False
    return (
        int(status.get("updatedReplicas", 0)) >= wanted
        and int(status.get("availableReplicas", 0)) >= wanted
        and int(status.get("replicas", 0)) <= wanted
    )


# --------------------------------------------------------------------------- the API


class KubeError(EdgeweaveError):
    """The API server refused or failed a request; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    prefix: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        parts = [self.prefix]
        if self.namespaced and namespace is not None:
            parts += ["namespaces", urllib.parse.quote(namespace)]
        parts.append(self.plural)
        if name is not None:
            parts.append(urllib.parse.quote(name))
        if sub is not None:
            parts.append(sub)
        return "/".join(parts)


PODS = Kind("/api/v1", "pods")
SERVICES = Kind("/api/v1", "services")
SECRETS = Kind("/api/v1", "secrets")
CONFIGMAPS = Kind("/api/v1", "configmaps")
NODES = Kind("/api/v1", "nodes", namespaced=False)
DEPLOYMENTS = Kind("/apis/apps/v1", "deployments")
PIPELINES = Kind(f"/apis/{GROUP}/{VERSION}", PLURAL)

KINDS: Mapping[str, Kind] = {
    "Pod": PODS, "Service": SERVICES, "Secret": SECRETS, "ConfigMap": CONFIGMAPS,
    "Deployment": DEPLOYMENTS, "Node": NODES, KIND: PIPELINES,
}


class Kube:
    """Blocking JSON calls to the API server through a ``kubernetes.client.ApiClient``.

    Call from a worker thread (``asyncio.to_thread``): the official client is synchronous.
    """

    def __init__(self, api_client: Any, timeout_s: float = 30.0) -> None:
        self.client = api_client
        self.timeout_s = timeout_s

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        serialized = self.client.param_serialize(
            method=method, resource_path=path, query_params=list(query),
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )
        http_method, url, http_headers, http_body, post_params = serialized
        try:
            response = self.client.call_api(
                http_method, url, header_params=http_headers, body=http_body,
                post_params=post_params, _request_timeout=self.timeout_s,
            )
            data = response.read()
        except Exception as error:  # urllib3 and the client raise many kinds
            status = int(getattr(error, "status", 0) or 0)
            raise KubeError(f"{method} {path}: {error}", status) from None
        text = data.decode() if isinstance(data, bytes) else (data or "")
        if response.status >= 400:
            raise KubeError(f"{method} {path}: HTTP {response.status} {_message(text)}",
                            response.status)
        return json.loads(text) if text else None

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", kind.path(namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def list(
        self, kind: Kind, namespace: str | None, selector: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector(selector))] if selector else []
        listed = self.request("GET", kind.path(namespace), query=query) or {}
        items = listed.get("items") or []
        # Filter here as well: a lax API (or emulator) may ignore the selector.
        return [item for item in items if _labels_match(item, selector)]

    def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", kind.path(namespace), body=dict(body))

    def patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", kind.path(namespace, name, subresource), body=dict(patch),
            content_type="application/merge-patch+json",
        )

    def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        """Delete in the background; ``False`` if it was already gone."""
        try:
            self.request("DELETE", kind.path(namespace, name),
                         body={"propagationPolicy": "Background"})
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        return True


def label_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(selector.items()))


def _labels_match(item: Mapping[str, Any], selector: Mapping[str, str] | None) -> bool:
    labels = (item.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in (selector or {}).items())


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message") or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


# --------------------------------------------------------------------------- apply


class Applied(StrEnum):
    created = "created"
    patched = "patched"
    replaced = "replaced"
    unchanged = "unchanged"


def apply(kube: Kube, desired: Mapping[str, Any]) -> Applied:
    """Create ``desired`` or bring the existing object to it, touching only what differs.

    Pods cannot change most fields in place, so a pod whose template hash differs is
    deleted and created again. A Secret's data is never overwritten: the token must
    outlive the operator, so only its labels and owner are kept current.
    """
    kind = KINDS[desired["kind"]]
    metadata = desired["metadata"]
    namespace, name = metadata.get("namespace"), metadata["name"]
    existing = kube.get(kind, namespace, name)
    if existing is None:
        try:
            kube.create(kind, namespace, desired)
            return Applied.created
        except KubeError as error:
            if error.status != 409:
                raise
            existing = kube.get(kind, namespace, name)
            if existing is None:
                raise
    if kind is PODS and _template_hash(existing) != _template_hash(desired):
        kube.delete(kind, namespace, name)
        kube.create(kind, namespace, desired)
        return Applied.replaced
    patch = _patch_for(desired, existing, keep_data=kind is SECRETS)
    if not patch:
        return Applied.unchanged
    log.debug("patching %s %s: %s", desired["kind"], name, patch)
    kube.patch(kind, namespace, name, patch)
    return Applied.patched


def _template_hash(obj: Mapping[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(s.ANNOTATION_TEMPLATE_HASH)


def _patch_for(
    desired: Mapping[str, Any], existing: Mapping[str, Any], *, keep_data: bool
) -> dict[str, Any]:
    """A merge patch taking ``existing`` to ``desired`` (empty when it is there already)."""
    patch: dict[str, Any] = {}
    meta_patch = {
        key: desired["metadata"][key]
        for key in ("labels", "annotations", "ownerReferences")
        if key in desired["metadata"]
        and not contains((existing.get("metadata") or {}).get(key), desired["metadata"][key])
    }
    if meta_patch:
        patch["metadata"] = meta_patch
    body_keys = [key for key in desired if key not in {"apiVersion", "kind", "metadata", "status"}]
    if keep_data:
        body_keys = [key for key in body_keys if key not in {"data", "stringData"}]
    if desired["kind"] == "Pod":
        body_keys = []  # only labels and annotations of a pod may change in place
    for key in body_keys:
        if not contains(existing.get(key), desired[key]):
            patch[key] = desired[key]
    return patch


def contains(actual: Any, wanted: Any) -> bool:
    """Whether ``actual`` holds everything in ``wanted`` (API-server defaults aside)."""
    if isinstance(wanted, Mapping):
        return isinstance(actual, Mapping) and all(
            contains(actual.get(key), value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    if isinstance(wanted, int | float) and not isinstance(wanted, bool):
        return actual == wanted or str(actual) == str(wanted)
    return actual == wanted


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    references = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return any(ref.get("uid") == uid for ref in references)


def names_of(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    return {obj["metadata"]["name"] for obj in objects}
