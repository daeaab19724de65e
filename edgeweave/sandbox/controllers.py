"""The controllers an emulated cluster needs besides the API server and the kubelet.

:mod:`edgeweave.sandbox.apiserver` stores objects and nothing more. A real cluster
also runs controllers that turn those objects into running things; the sandbox runs
small, faithful versions of the ones edgeweave's objects rely on:

* :class:`DeploymentController` — a Deployment becomes Pods (``RollingUpdate`` with
  ``maxSurge``/``maxUnavailable``, or ``Recreate``), failed Pods are replaced, and the
  Deployment's status counts replicas the way ``kubectl rollout status`` and the
  operator's ``deployment_rolled_out`` read them;
* :class:`Scheduler` — a Pod without ``spec.nodeName`` is bound to a Ready,
  schedulable node with a kubelet (one the sandbox runs), honouring
  ``nodeSelector`` and NoSchedule taints, least-loaded first;
* :class:`NodeLifecycleController` — Pods on a NotReady or deleted node are marked
  not Ready at once and deleted after a short grace, as the node lifecycle controller
  and the pod garbage collector do (minutes in a real cluster; seconds here);
* :class:`ServiceProxy` — kube-proxy and a LoadBalancer controller in one: every
  Service with a cluster IP gets a *sandbox address* on which a TCP relay forwards
  each new connection to one of its endpoints (Running pods matching the selector,
  Ready unless ``publishNotReadyAddresses``), round robin; a Service of type
  LoadBalancer gets that address as its ``status.loadBalancer.ingress``, as K3s'
  ServiceLB reports node addresses.

Deliberate simplifications: a Deployment owns its Pods directly (no ReplicaSet
objects; Pods carry the ``pod-template-hash`` label all the same), ``minReadySeconds``
and ``progressDeadlineSeconds`` are not enforced, and the scheduler counts pods rather
than resource requests.

Everything here is a client of the API server over HTTP, like the real components:
:class:`KubeApi` for calls and :class:`Informer` for list+watch caches. All of it runs
on one asyncio loop (the sandbox's cluster thread); each controller is level
triggered: any change wakes it and it reconciles everything it owns.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import aiohttp

from edgeweave.operator.resources import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NODES,
    PODS,
    SECRETS,
    SERVICES,
    Kind,
)
from edgeweave.sandbox.apiserver import now_rfc3339

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S: Final = 290
RELIST_DELAY_S: Final = 0.5
DEFAULT_POD_EVICTION_S: Final = 2.0
"""How long Pods stay on a NotReady or deleted node before they are deleted."""
TEMPLATE_HASH_LABEL: Final = "pod-template-hash"
RELAY_CHUNK: Final = 1 << 16
RELAY_CONNECT_TIMEOUT_S: Final = 3.0

Key = tuple[str | None, str]
"""(namespace, name) of an object; namespace ``None`` for cluster-scoped kinds."""


# --------------------------------------------------------------------------- the API


class KubeApiError(Exception):
    """An API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# Where kinds live in the REST API has one home, shared with the operator's client.
EVENTS: Final = Kind("/api/v1", "events")


class KubeApi:
    """JSON over HTTP to the (emulated) API server, as a kubelet or controller speaks it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: Any = None,
                      content_type: str = "application/json",
                      params: Mapping[str, str] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        try:
            async with self.session.request(
                method, self.base_url + path, data=data, headers=headers, params=params,
                timeout=aiohttp.ClientTimeout(total=30),
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise KubeApiError(f"{method} {path}: HTTP {response.status} {text[:300]}",
                                       response.status)
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise KubeApiError(f"{method} {path}: {error}") from None

    async def create(self, kind: Kind, namespace: str | None, body: Mapping[str, Any]) -> Any:
        return await self.request("POST", kind.path(namespace), body=dict(body))

    async def patch(self, kind: Kind, namespace: str | None, name: str,
                    patch: Mapping[str, Any], sub: str | None = None) -> Any:
        return await self.request("PATCH", kind.path(namespace, name, sub), body=dict(patch),
                                  content_type="application/merge-patch+json")

    async def delete(self, kind: Kind, namespace: str | None, name: str,
                     uid: str | None = None) -> bool:
        """Delete (only the object with ``uid`` when given); ``False`` if it was gone."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            options["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", kind.path(namespace, name), body=options)
        except KubeApiError as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    async def watch(self, kind: Kind, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request, until the server ends it."""
        params = {"watch": "1", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT_S)}
        async with self.session.get(
            self.base_url + kind.path(None), params=params,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as response:
            if response.status >= 400:
                raise KubeApiError(f"watch {kind.plural}: HTTP {response.status}",
                                   response.status)
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)


# --------------------------------------------------------------------------- informers


def key_of(obj: Mapping[str, Any]) -> Key:
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace"), str(metadata.get("name"))


class Informer:
    """A list+watch cache of one kind; wakes its subscribers on every change."""

    def __init__(self, api: KubeApi, kind: Kind) -> None:
        self.api = api
        self.kind = kind
        self.items: dict[Key, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._subscribers: list[asyncio.Event] = []
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def subscribe(self, event: asyncio.Event) -> None:
        self._subscribers.append(event)

    def on_event(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``listener(type, object)`` for every ADDED/MODIFIED/DELETED seen."""
        self._listeners.append(listener)

    def get(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self.items.get((namespace, name))

    def remember(self, obj: Mapping[str, Any] | None) -> None:
        """Record what a write returned, before its watch event arrives.

        Controllers are level triggered: without this, a pass that runs between a
        create and its event would create the object again (kube-controller-manager
        keeps "expectations" for the same reason).
        """
        if isinstance(obj, Mapping) and (obj.get("metadata") or {}).get("name"):
            self.items[key_of(obj)] = dict(obj)

    def forget(self, obj: Mapping[str, Any]) -> None:
        """Drop an object just deleted (its DELETED event may lag)."""
        self.items.pop(key_of(obj), None)

    def values(self) -> list[dict[str, Any]]:
        return list(self.items.values())

    def _notify(self, kind: str, obj: dict[str, Any]) -> None:
        for listener in self._listeners:
            listener(kind, obj)
        for event in self._subscribers:
            event.set()

    async def run(self) -> None:
        while True:
            try:
                version = await self._relist()
                await self._watch(version)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the API restarting, a dropped stream: list again
                log.debug("informer %s: %s; listing again", self.kind.plural, error)
            await asyncio.sleep(RELIST_DELAY_S)

    async def _relist(self) -> str:
        listed = await self.api.request("GET", self.kind.path(None))
        fresh = {key_of(item): item for item in listed.get("items") or []}
        gone = [obj for key, obj in self.items.items() if key not in fresh]
        self.items = fresh
        for obj in gone:
            self._notify("DELETED", obj)
        for obj in fresh.values():
            self._notify("MODIFIED", obj)
        self.synced.set()
        for event in self._subscribers:
            event.set()
        return str((listed.get("metadata") or {}).get("resourceVersion") or "0")

    async def _watch(self, version: str) -> None:
        while True:
            async for event in self.api.watch(self.kind, version):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise KubeApiError(f"watch {self.kind.plural}: {obj.get('message')}",
                                       int(obj.get("code") or 0))
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.items.pop(key_of(obj), None)
                else:
                    self.items[key_of(obj)] = obj
                self._notify(str(kind), obj)


@dataclass
class ClusterCache:
    """Informers of every kind the sandbox's controllers and kubelet read."""

    api: KubeApi
    pods: Informer = field(init=False)
    nodes: Informer = field(init=False)
    services: Informer = field(init=False)
    deployments: Informer = field(init=False)
    secrets: Informer = field(init=False)
    configmaps: Informer = field(init=False)

    def __post_init__(self) -> None:
        self.pods = Informer(self.api, PODS)
        self.nodes = Informer(self.api, NODES)
        self.services = Informer(self.api, SERVICES)
        self.deployments = Informer(self.api, DEPLOYMENTS)
        self.secrets = Informer(self.api, SECRETS)
        self.configmaps = Informer(self.api, CONFIGMAPS)

    @property
    def informers(self) -> list[Informer]:
        return [self.pods, self.nodes, self.services, self.deployments, self.secrets,
                self.configmaps]

    async def wait_synced(self) -> None:
        await asyncio.gather(*(informer.synced.wait() for informer in self.informers))


# --------------------------------------------------------------------------- object helpers


def meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return meta(obj).get("labels") or {}


def terminating(obj: Mapping[str, Any]) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def node_ready(node: Mapping[str, Any] | None) -> bool:
    if node is None:
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def is_headless(service: Mapping[str, Any]) -> bool:
    """``clusterIP: None``. (A LoadBalancer or NodePort Service the emulated API gave no
    cluster IP is still proxied: kube-apiserver would have allocated one.)"""
    return (service.get("spec") or {}).get("clusterIP") == "None"


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in meta(obj).get("ownerReferences") or [])


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """A Service's (equality) selector; an empty or missing one selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def _stable_hash(value: Any) -> str:
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    # kube-controller-manager's pod-template-hash is a short safe string as well.
    return digest[:10]


def _random_suffix(length: int = 5) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    return "".join(random.choice(alphabet) for _ in range(length))


def _scaled(value: Any, replicas: int, round_up: bool) -> int:
    """``maxSurge``/``maxUnavailable``: an int, or a percentage of ``replicas``."""
    if isinstance(value, str) and value.endswith("%"):
        share = float(value[:-1]) / 100 * replicas
        return math.ceil(share) if round_up else math.floor(share)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1 if round_up else 0


class Loop(abc.ABC):
    """A level-triggered controller: wake on change (or a timer), reconcile, repeat."""

    name = "controller"
    resync_s: float = 1.0

    def __init__(self) -> None:
        self.wake = asyncio.Event()

    @abc.abstractmethod
    async def reconcile(self) -> None:
        """Bring the world one step closer to what the API asks for."""

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=self.resync_s)
            self.wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except KubeApiError as error:
                log.info("%s: %s (retrying)", self.name, error)
            except Exception:
                log.exception("%s failed; retrying", self.name)


# --------------------------------------------------------------------------- deployments


class DeploymentController(Loop):
    """Deployments → Pods, rolled out as the Deployment's strategy says."""

    name = "deployment-controller"

    def __init__(self, api: KubeApi, cache: ClusterCache) -> None:
        super().__init__()
        self.api = api
        self.cache = cache
        for informer in (cache.deployments, cache.pods):
            informer.subscribe(self.wake)

    async def reconcile(self) -> None:
        for deployment in self.cache.deployments.values():
            if not terminating(deployment):
                await self._sync(deployment)

    def _pods_of(self, deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
        uid = meta(deployment).get("uid", "")
        namespace = meta(deployment).get("namespace")
        return [pod for pod in self.cache.pods.values()
                if meta(pod).get("namespace") == namespace and owned_by(pod, uid)
                and not terminating(pod)]

    async def _sync(self, deployment: dict[str, Any]) -> None:
        spec = deployment.get("spec") or {}
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        template_hash = _stable_hash(template)
        pods = self._pods_of(deployment)
        for pod in pods:
            if pod_phase(pod) in ("Failed", "Succeeded"):
                await self._delete_pod(pod)
        pods = [p for p in pods if pod_phase(p) not in ("Failed", "Succeeded")]
        new = [p for p in pods if labels_of(p).get(TEMPLATE_HASH_LABEL) == template_hash]
        old = [p for p in pods if p not in new]
        strategy = spec.get("strategy") or {}
        if strategy.get("type") == "Recreate":
            await self._recreate(deployment, template_hash, replicas, new, old)
        else:
            await self._roll(deployment, template_hash, replicas, new, old,
                             strategy.get("rollingUpdate") or {})
        await self._write_status(deployment, template_hash, replicas)

    async def _recreate(self, deployment: dict[str, Any], template_hash: str, replicas: int,
                        new: list[dict[str, Any]], old: list[dict[str, Any]]) -> None:
        for pod in old:
            await self._delete_pod(pod)
        if not old:
            await self._scale(deployment, template_hash, new, replicas)

    async def _roll(self, deployment: dict[str, Any], template_hash: str, replicas: int,
                    new: list[dict[str, Any]], old: list[dict[str, Any]],
                    rolling: Mapping[str, Any]) -> None:
        surge = _scaled(rolling.get("maxSurge", "25%"), replicas, round_up=True)
        unavailable = _scaled(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
        if surge == 0 and unavailable == 0:
            unavailable = 1
        room = replicas + surge - len(new) - len(old)
        wanted_new = min(replicas, len(new) + max(room, 0))
        if not old:
            wanted_new = replicas
        await self._scale(deployment, template_hash, new, wanted_new)
        # Old pods that serve nothing go first; ready ones only while enough stay available.
        for pod in [p for p in old if not pod_is_ready(p)]:
            await self._delete_pod(pod)
            old.remove(pod)
        available = sum(pod_is_ready(p) for p in new) + len(old)
        floor = replicas - unavailable
        for pod in sorted(old, key=lambda p: meta(p).get("creationTimestamp", "")):
            if available - 1 < floor:
                break
            await self._delete_pod(pod)
            available -= 1

    async def _scale(self, deployment: dict[str, Any], template_hash: str,
                     pods: list[dict[str, Any]], wanted: int) -> None:
        for _ in range(wanted - len(pods)):
            await self._create_pod(deployment, template_hash)
        if len(pods) > wanted:
            # Not-ready and newest pods are the cheapest to lose.
            ordered = sorted(pods, key=lambda p: (pod_is_ready(p),
                                                  meta(p).get("creationTimestamp", "")))
            for pod in ordered[: len(pods) - wanted]:
                await self._delete_pod(pod)

    async def _create_pod(self, deployment: dict[str, Any], template_hash: str) -> None:
        metadata = meta(deployment)
        template = (deployment.get("spec") or {}).get("template") or {}
        pod_meta = dict(template.get("metadata") or {})
        name = f"{metadata['name']}-{template_hash}-{_random_suffix()}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **pod_meta,
                "name": name,
                "namespace": metadata.get("namespace"),
                "labels": {**(pod_meta.get("labels") or {}), TEMPLATE_HASH_LABEL: template_hash},
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "Deployment", "name": metadata["name"],
                    "uid": metadata["uid"], "controller": True, "blockOwnerDeletion": True,
                }],
            },
            "spec": json.loads(json.dumps(template.get("spec") or {})),
        }
        self.cache.pods.remember(await self.api.create(PODS, metadata.get("namespace"), pod))
        log.info("deployment %s: created pod %s", metadata["name"], name)

    async def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        metadata = meta(pod)
        deleted = await self.api.delete(PODS, metadata.get("namespace"), metadata["name"],
                                        metadata.get("uid"))
        self.cache.pods.forget(pod)
        if deleted:
            log.info("deleted pod %s", metadata["name"])

    async def _write_status(self, deployment: dict[str, Any], template_hash: str,
                            replicas: int) -> None:
        pods = self._pods_of(deployment)
        updated = [p for p in pods if labels_of(p).get(TEMPLATE_HASH_LABEL) == template_hash]
        ready = [p for p in pods if pod_is_ready(p)]
        available = len(ready)
        status: dict[str, Any] = {
            "observedGeneration": meta(deployment).get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": len(ready),
            "availableReplicas": available,
            "unavailableReplicas": max(replicas - available, 0),
        }
        complete = len(updated) >= replicas and available >= replicas and len(pods) <= replicas
        old_status = deployment.get("status") or {}
        conditions = {c.get("type"): c for c in old_status.get("conditions") or []}
        status["conditions"] = [
            _condition(conditions.get("Available"), "Available", available >= replicas,
                       "MinimumReplicasAvailable" if available >= replicas
                       else "MinimumReplicasUnavailable"),
            _condition(conditions.get("Progressing"), "Progressing", True,
                       "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated"),
        ]
        if _same_status(old_status, status):
            return
        self.cache.deployments.remember(await self.api.patch(
            DEPLOYMENTS, meta(deployment).get("namespace"), meta(deployment)["name"],
            {"status": status}, sub="status"))


def _condition(old: Mapping[str, Any] | None, kind: str, true: bool, reason: str) -> dict[str, Any]:
    status = "True" if true else "False"
    unchanged = old is not None and old.get("status") == status
    stamp = old.get("lastTransitionTime") if unchanged and old else now_rfc3339()
    return {"type": kind, "status": status, "reason": reason, "lastTransitionTime": stamp,
            "lastUpdateTime": stamp}


def _same_status(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        copy = {k: v for k, v in status.items() if k != "conditions"}
        copy["conditions"] = sorted((c.get("type"), c.get("status"), c.get("reason"))
                                    for c in status.get("conditions") or [])
        return copy

    return strip(old) == strip(new)


# --------------------------------------------------------------------------- scheduling


def _tolerates(pod: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    for toleration in (pod.get("spec") or {}).get("tolerations") or []:
        if toleration.get("effect") and toleration.get("effect") != taint.get("effect"):
            continue
        if toleration.get("operator") == "Exists":
            if not toleration.get("key") or toleration.get("key") == taint.get("key"):
                return True
        elif toleration.get("key") == taint.get("key") and (
            toleration.get("value", "") == taint.get("value", "")
        ):
            return True
    return False


def schedulable_for(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Whether ``pod`` may be bound to ``node`` (readiness, cordon, selector, taints)."""
    if not node_ready(node) or (node.get("spec") or {}).get("unschedulable"):
        return False
    selector = (pod.get("spec") or {}).get("nodeSelector") or {}
    labels = labels_of(node)
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    return all(
        _tolerates(pod, taint) for taint in (node.get("spec") or {}).get("taints") or []
        if taint.get("effect") in ("NoSchedule", "NoExecute")
    )


class Scheduler(Loop):
    """Binds unpinned Pods to a node the sandbox runs: fewest pods, then most CPU."""

    name = "scheduler"

    def __init__(self, api: KubeApi, cache: ClusterCache,
                 has_kubelet: Callable[[str], bool]) -> None:
        super().__init__()
        self.api = api
        self.cache = cache
        self.has_kubelet = has_kubelet
        for informer in (cache.pods, cache.nodes):
            informer.subscribe(self.wake)

    async def reconcile(self) -> None:
        load: dict[str, int] = {}
        for pod in self.cache.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node and pod_phase(pod) not in ("Succeeded", "Failed"):
                load[node] = load.get(node, 0) + 1
        for pod in self.cache.pods.values():
            if (pod.get("spec") or {}).get("nodeName") or terminating(pod):
                continue
            candidates = [n for n in self.cache.nodes.values()
                          if self.has_kubelet(meta(n)["name"]) and schedulable_for(pod, n)]
            if not candidates:
                continue
            best = min(candidates, key=lambda n: (load.get(meta(n)["name"], 0),
                                                  -_cpu_of(n), meta(n)["name"]))
            name = meta(best)["name"]
            try:
                self.cache.pods.remember(await self.api.patch(
                    PODS, meta(pod).get("namespace"), meta(pod)["name"],
                    {"spec": {"nodeName": name}}))
            except KubeApiError as error:
                if error.status != 404:
                    raise
                continue
            load[name] = load.get(name, 0) + 1
            log.info("scheduled pod %s onto %s", meta(pod)["name"], name)


def _cpu_of(node: Mapping[str, Any]) -> float:
    return parse_cpu(((node.get("status") or {}).get("allocatable") or {}).get("cpu"), 0.0)


def parse_cpu(value: Any, default: float) -> float:
    """A Kubernetes CPU quantity (``"2"``, ``"500m"``, ``1.5``) in cores."""
    if value is None:
        return default
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return default


# --------------------------------------------------------------------------- node lifecycle


class NodeLifecycleController(Loop):
    """Pods of a lost node: not Ready at once, deleted after ``eviction_s``."""

    name = "node-lifecycle-controller"
    resync_s = 0.25

    def __init__(self, api: KubeApi, cache: ClusterCache,
                 eviction_s: float = DEFAULT_POD_EVICTION_S) -> None:
        super().__init__()
        self.api = api
        self.cache = cache
        self.eviction_s = eviction_s
        self._lost_since: dict[str, float] = {}
        for informer in (cache.pods, cache.nodes):
            informer.subscribe(self.wake)

    async def reconcile(self) -> None:
        now = time.monotonic()
        nodes = {meta(n)["name"]: n for n in self.cache.nodes.values()}
        lost = {name for name, node in nodes.items() if not node_ready(node)}
        for pod in self.cache.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node and node not in nodes:
                lost.add(node)
        self._lost_since = {name: self._lost_since.get(name, now) for name in lost}
        for pod in self.cache.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or node not in lost or terminating(pod):
                continue
            if now - self._lost_since[node] >= self.eviction_s:
                await self._evict(pod, node, node in nodes)
            elif pod_is_ready(pod):
                await self._mark_not_ready(pod, node)

    async def _mark_not_ready(self, pod: Mapping[str, Any], node: str) -> None:
        status = pod.get("status") or {}
        conditions = [c for c in status.get("conditions") or []
                      if c.get("type") not in ("Ready", "ContainersReady")]
        stamp = now_rfc3339()
        for kind in ("Ready", "ContainersReady"):
            conditions.append({"type": kind, "status": "False", "reason": "NodeNotReady",
                               "message": f"node {node} is not ready",
                               "lastTransitionTime": stamp})
        await self._patch_status(pod, {"conditions": conditions})

    async def _evict(self, pod: Mapping[str, Any], node: str, exists: bool) -> None:
        why = "NodeLost" if exists else "NodeDeleted"
        if pod_phase(pod) not in ("Succeeded", "Failed"):
            await self._patch_status(pod, {
                "phase": "Failed", "reason": why,
                "message": f"node {node} {'is NotReady' if exists else 'was deleted'}; "
                           "the pod was deleted by the node lifecycle controller"})
        metadata = meta(pod)
        deleted = await self.api.delete(PODS, metadata.get("namespace"), metadata["name"],
                                        metadata.get("uid"))
        self.cache.pods.forget(pod)
        if deleted:
            log.info("evicted pod %s from lost node %s", metadata["name"], node)

    async def _patch_status(self, pod: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        metadata = meta(pod)
        try:
            self.cache.pods.remember(await self.api.patch(
                PODS, metadata.get("namespace"), metadata["name"], {"status": dict(status)},
                sub="status"))
        except KubeApiError as error:
            if error.status != 404:
                raise


# --------------------------------------------------------------------------- services


class ServiceAddresses(Protocol):
    """Where the sandbox can put a Service's address (see :mod:`.runner`'s networks)."""

    async def allocate_service_address(self, key: str) -> str: ...

    async def release_service_address(self, key: str) -> None: ...


@dataclass
class _Published:
    """One Service as the proxy serves it."""

    uid: str
    address: str
    ports: tuple[tuple[int, Any], ...]
    servers: list[asyncio.Server] = field(default_factory=list)
    connections: set[asyncio.Task[None]] = field(default_factory=set)
    turn: int = 0


class ServiceProxy(Loop):
    """kube-proxy (a TCP relay per Service port) plus a LoadBalancer controller."""

    name = "service-proxy"

    def __init__(self, api: KubeApi, cache: ClusterCache, addresses: ServiceAddresses,
                 pod_address: Callable[[Mapping[str, Any]], str | None]) -> None:
        super().__init__()
        self.api = api
        self.cache = cache
        self.addresses = addresses
        self.pod_address = pod_address
        self.published: dict[Key, _Published] = {}
        self.changed = asyncio.Event()
        cache.services.subscribe(self.wake)

    def address_of(self, namespace: str, name: str) -> str | None:
        """The sandbox address of a Service with a cluster IP, once it is served."""
        published = self.published.get((namespace, name))
        return published.address if published is not None else None

    async def reconcile(self) -> None:
        live: dict[Key, dict[str, Any]] = {}
        for service in self.cache.services.values():
            spec = service.get("spec") or {}
            if is_headless(service) or terminating(service) or spec.get("type") == "ExternalName":
                continue
            live[key_of(service)] = service
        for key in [k for k, p in self.published.items()
                    if k not in live or meta(live[k]).get("uid") != p.uid]:
            await self._unpublish(key)
        for key, service in live.items():
            ports = tuple((int(p["port"]), p.get("targetPort", p["port"]))
                          for p in (service.get("spec") or {}).get("ports") or []
                          if str(p.get("protocol", "TCP")) == "TCP")
            published = self.published.get(key)
            if published is not None and published.ports != ports:
                await self._unpublish(key)
                published = None
            if published is None:
                published = await self._publish(key, service, ports)
            await self._report_load_balancer(service, published)

    async def _publish(self, key: Key, service: Mapping[str, Any],
                       ports: tuple[tuple[int, Any], ...]) -> _Published:
        uid = str(meta(service).get("uid"))
        address = await self.addresses.allocate_service_address(uid)
        published = _Published(uid=uid, address=address, ports=ports)
        self.published[key] = published
        for port, target in ports:
            server = await asyncio.start_server(
                lambda r, w, k=key, t=target: self._relay(k, t, r, w), address, port,
                reuse_address=True,
            )
            published.servers.append(server)
        log.info("service %s/%s served at %s (ports %s)", key[0], key[1], address,
                 ", ".join(str(p) for p, _ in ports))
        self.changed.set()
        return published

    async def _unpublish(self, key: Key) -> None:
        published = self.published.pop(key, None)
        if published is None:
            return
        for server in published.servers:
            server.close()
        for task in list(published.connections):
            task.cancel()
        for server in published.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        await self.addresses.release_service_address(published.uid)
        self.changed.set()

    async def close(self) -> None:
        for key in list(self.published):
            await self._unpublish(key)

    async def _report_load_balancer(self, service: Mapping[str, Any],
                                    published: _Published) -> None:
        if (service.get("spec") or {}).get("type") != "LoadBalancer":
            return
        wanted = {"ingress": [{"ip": published.address, "ipMode": "VIP"}]}
        if ((service.get("status") or {}).get("loadBalancer") or {}) == wanted:
            return
        metadata = meta(service)
        await self.api.patch(SERVICES, metadata.get("namespace"), metadata["name"],
                             {"status": {"loadBalancer": wanted}}, sub="status")

    def endpoints(self, key: Key, target: Any) -> list[tuple[str, int]]:
        """The (address, port) pairs a new connection to ``key`` may go to."""
        service = self.cache.services.get(*key)
        if service is None:
            return []
        spec = service.get("spec") or {}
        selector = spec.get("selector")
        include_unready = bool(spec.get("publishNotReadyAddresses"))
        found: list[tuple[str, int]] = []
        for pod in self.cache.pods.values():
            if meta(pod).get("namespace") != key[0] or terminating(pod):
                continue
            if not selector_matches(selector, labels_of(pod)) or pod_phase(pod) != "Running":
                continue
            if not (include_unready or pod_is_ready(pod)):
                continue
            address = self.pod_address(pod)
            port = container_port(pod, target)
            if address and port:
                found.append((address, port))
        return sorted(found)

    async def _relay(self, key: Key, target: Any, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        published = self.published.get(key)
        task = asyncio.current_task()
        if published is None or task is None:
            writer.close()
            return
        published.connections.add(task)
        try:
            upstream = await self._connect(published, key, target)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            published.connections.discard(task)
            writer.close()

    async def _connect(
        self, published: _Published, key: Key, target: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        candidates = self.endpoints(key, target)
        if not candidates:
            return None  # kube-proxy rejects: the client sees the connection refused
        start = published.turn
        published.turn += 1
        for offset in range(len(candidates)):
            address, port = candidates[(start + offset) % len(candidates)]
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, port),
                                              RELAY_CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                continue
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(RELAY_CHUNK):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


def container_port(pod: Mapping[str, Any], target: Any) -> int | None:
    """A Service's ``targetPort`` on ``pod``: a number, or a named container port."""
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == target:
                return int(port["containerPort"])
    return None
