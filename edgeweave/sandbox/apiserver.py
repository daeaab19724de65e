"""An emulated Kubernetes API server for the operator's tests and the sandbox.

Built on kmock (PyPI ``kmock``, by kopf's author): :class:`EmulatedKubernetes` is a
``kmock.KubernetesScaffold``, so it keeps kmock's request model, its Status-shaped
error responses, its ``objects`` array with per-object history for assertions, and
its DSL — a test can still inject faults in front of the emulation, e.g.
``api['list', kmock.resource('v1/pods')] << 500``. What kmock's own
``KubernetesEmulator`` lacks, and a real operator relies on, is implemented here:

* uid, a global ``resourceVersion`` bumped on every write (and not on no-op writes),
  ``generation`` bumped only by changes outside metadata and status,
  creationTimestamp; optimistic concurrency (409) on PUT and patches that carry a
  resourceVersion;
* PUT; merge, strategic-merge, JSON and apply patches (see :mod:`.patching`);
* the status subresource (the main endpoint ignores status, ``/status`` changes only
  status) and the ``Namespace`` resource itself (kmock's URL parser fails on
  ``/api/v1/namespaces`` and reads ``/api/v1/namespaces/NAME`` as a namespace, not
  an object, so requests are parsed here into kmock's own ``Request``);
* the defaults kube-apiserver gives pods, services and deployments (``restartPolicy``,
  ``clusterIP``, ...) and its refusal of pod spec changes, so that an operator's
  drift detection meets them here first;
* finalizers and ``deletionTimestamp``; Background, Foreground and Orphan
  propagation; owner-reference garbage collection, recursively; namespace and CRD
  deletion that takes their contents with them;
* list with ``labelSelector`` / ``fieldSelector`` / ``limit`` + ``continue``; watch
  from a ``resourceVersion`` (410 Gone when compacted away), ``timeoutSeconds``,
  bookmarks, ``sendInitialEvents``; objects entering or leaving a selector are
  reported as ADDED / DELETED, as the real watch cache does;
* CustomResourceDefinitions that start serving their resources (discovery included)
  with pruning, defaulting and validation against the CRD schema (422 ``Invalid``);
* server-side printing (``as=Table``, also for ``kubectl get -w``) and just enough
  OpenAPI (see :mod:`.openapi`) for ``kubectl get``, ``apply``, ``delete`` to work.

kmock's ``Server`` is not used: it patches aiohttp's DNS resolution process-wide
(for in-process clients), which a sandbox that also runs kopf and the pod runner
must not have; :class:`ApiServer` serves the handler with plain aiohttp instead.

Deliberate simplifications: no authentication or authorisation; pods are deleted at
once (as with ``--grace-period=0``; the sandbox's pod runner kills processes on the
DELETED event); no controllers run (nothing turns a Deployment into Pods, nothing
schedules a Pod without ``nodeName``); ``managedFields`` are not kept and
server-side apply detects no conflicts between managers; a ``continue`` token pages
through the current state, not a snapshot; Events never expire.

All state lives in one asyncio loop and is changed only by synchronous code within
it, so no write is ever interleaved with another. :class:`ApiServer` runs that loop
in a thread of its own for synchronous callers (pytest, the sandbox CLI).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import random
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import rendering

from edgeweave.errors import EdgeweaveError
from edgeweave.sandbox import openapi, patching, tables
from edgeweave.sandbox.resources import CrdError, Registry, ResourceType, builtin_types, crd_types
from edgeweave.sandbox.selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0+edgeweave-sandbox",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
FOREGROUND_FINALIZER = "foregroundDeletion"
CRD_CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"
_SERVER_META_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp",
                       "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
                       "selfLink")
_IMMUTABLE_META_FIELDS = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "generation")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # as apiserver's names.SimpleNameGenerator


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(EdgeweaveError):
    """An API failure, answered as a ``kind: Status`` object like kube-apiserver's.

    It is an :class:`EdgeweaveError` because, raised through :class:`ApiServer`'s
    helpers (e.g. applying a user's NODES.yaml), it names what the user must fix.
    """

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _details(rtype: ResourceType, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified_plural} "{name}" not found',
                    _details(rtype, name))


def conflict(rtype: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {rtype.qualified_plural} "{name}": {why}',
                    _details(rtype, name))


def invalid(rtype: ResourceType, name: str, causes: list[dict[str, str]]) -> ApiError:
    texts = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details = _details(rtype, name) | {"kind": rtype.kind, "causes": causes}
    return ApiError(422, "Invalid", f'{rtype.qualified_kind} "{name}" is invalid: {summary}',
                    details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def resource_not_served() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource",
                    {"causes": [{"reason": "UnexpectedServerResponse",
                                 "message": "404 page not found"}]})


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _without_meta_and_status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _content_type(request: kmock.Request) -> str:
    raw = request.headers.get("Content-Type") or request.headers.get("content-type") or ""
    return raw.split(";")[0].strip().lower()


def _decode_body(request: kmock.Request) -> Any:
    """The request body as JSON, or YAML for apply patches and ``application/yaml``."""
    if not request.body:
        return None
    content_type = _content_type(request)
    try:
        if "yaml" in content_type:
            return yaml.safe_load(request.body.decode("utf-8"))
        return json.loads(request.body)
    except (ValueError, yaml.YAMLError) as exc:
        raise bad_request(f"the request body could not be decoded: {exc}") from exc


class _ServeDirectly(Exception):
    """Raised by a fallback reaction: no test reaction claimed the request, serve it here."""

    def __init__(self, respond: Callable[[kmock.Request], Any]) -> None:
        super().__init__()
        self.respond = respond


@dataclasses.dataclass(frozen=True)
class _Reply:
    body: dict[str, Any]
    status: int = 200


@dataclasses.dataclass(frozen=True)
class Route:
    """What a resource URL addresses."""

    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One committed change, kept for watchers that resume from a resourceVersion."""

    rv: int
    key: tuple[str, str, str]
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


PathParts = tuple[str, str, str | None, str | None, str | None, str | None]


def parse_resource_path(path: str) -> PathParts | None:
    """``(group, version, plural, namespace, name, subresource)`` of an API path, or None.

    Unlike kmock's parser, this tells ``/api/v1/namespaces/NAME`` (the Namespace
    object) from ``/api/v1/namespaces/NS/pods`` (pods in a namespace).
    """
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return (group, version, None, namespace, None, None)
    plural = rest[0]
    name = rest[1] if len(rest) >= 2 else None
    subresource = "/".join(rest[2:]) or None
    return (group, version, plural, namespace, name, subresource)


def _guess_action(method: str, name: str | None, params: Mapping[str, str]) -> kmock.action | None:
    if method == "GET" and params.get("watch") in ("true", "1"):
        return kmock.action.WATCH
    if name is None:
        return {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(method)
    return {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE,
            "DELETE": kmock.action.DELETE}.get(method)


@attrs.define(kw_only=True)
class EmulatedKubernetes(kmock.KubernetesScaffold):
    """The Kubernetes API semantics, as a kmock handler (serve it with :class:`ApiServer`).

    Options: ``history_limit`` versions kept per object in :attr:`objects`;
    ``request_log_limit`` requests kept for assertions; ``event_log_limit`` changes
    kept for watchers resuming from an old resourceVersion (older → 410 Gone);
    ``watch_timeout`` for watches that give no ``timeoutSeconds``;
    ``bookmark_interval`` between BOOKMARK events on watches that allow them.
    """

    history_limit: int = 20
    request_log_limit: int = 2000
    event_log_limit: int = 20000
    watch_timeout: float = 1800.0
    bookmark_interval: float = 60.0

    _registry: Registry = attrs.field(init=False, factory=lambda: Registry(builtin_types()))
    _live: dict[tuple[str, str, str], dict[tuple[str | None, str], dict[str, Any]]] = attrs.field(
        init=False, factory=dict)
    _uids: dict[str, tuple[tuple[str, str, str], str | None, str]] = attrs.field(
        init=False, factory=dict)
    _gone_uids: set[str] = attrs.field(init=False, factory=set)
    """Uids of deleted objects: a dependent created later that names one is collected."""
    _rv: int = attrs.field(init=False, default=1)
    _log: list[WatchEvent] = attrs.field(init=False, factory=list)
    _compacted_rv: int = attrs.field(init=False, default=0)
    _changed: asyncio.Event | None = attrs.field(init=False, default=None)
    _closing: bool = attrs.field(init=False, default=False)
    _terminating: set[tuple[tuple[str, str, str], str | None, str]] = attrs.field(
        init=False, factory=set)
    _applied: dict[tuple[str, str], dict[str, Any]] = attrs.field(init=False, factory=dict)
    _loop: asyncio.AbstractEventLoop | None = attrs.field(init=False, default=None)
    _objects: kmock.ObjectsArray = attrs.field(init=False, factory=kmock.ObjectsArray)

    @property
    def objects(self) -> kmock.ObjectsArray:
        """Every object ever stored, with its recent versions (kmock's assertion helpers)."""
        return self._objects

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Resource requests no test reaction claimed are served below, outside kmock's
        # payload rendering, which cannot stream or vary the status per request.
        self.fallback[self._is_resource_request] << self._delegate
        self.fallback["get /openapi/v2"] << self._delegate_openapi_v2
        self.fallback["get /openapi/v3"] << self._serve_openapi_index
        self.fallback["get", re.compile(r"/openapi/v3/.+")] << self._serve_openapi_document
        for probe in ("/healthz", "/livez", "/readyz"):
            self.fallback["get", probe] << b"ok"
        for rtype in self._registry.all():
            self._mirror_discovery(rtype)
        for namespace in INITIAL_NAMESPACES:
            self.create(self._rtype("", "v1", "namespaces"), None,
                        {"metadata": {"name": namespace}})

    # ------------------------------------------------------------------ plumbing

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        return await super().__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close_watches()
        await super().__aexit__(exc_type, exc_value, traceback)

    def close_watches(self) -> None:
        """End every open watch stream cleanly (they see the end of the response)."""
        self._closing = True
        self._notify()

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's entry point, with this module's URL parser (see parse_resource_path)."""
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse_request(raw_request)
            self._remember(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as exc:
                raw_response = exc.args[0]
                if exc.__cause__ is not None:
                    raise exc.__cause__ from None
                raise
        except Exception as exc:
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def _parse_request(self, raw: aiohttp.web.BaseRequest) -> kmock.Request:
        body = await raw.read()
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        params = dict(raw.query)
        parsed = parse_resource_path(raw.path)
        resource = namespace = name = subresource = None
        if parsed is not None and parsed[2] is not None:
            group, version, plural, namespace, name, subresource = parsed
            resource = kmock.resource(group, version, plural)
        return kmock.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=params,
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=text,
            data=data,
            action=_guess_action(raw.method, name, params) if resource is not None else None,
            resource=resource,
            namespace=namespace,
            name=name,
            subresource=subresource,
        )

    def _remember(self, request: kmock.Request) -> None:
        """Keep requests for assertions, but only the recent ones: the sandbox runs for hours."""
        self._requests.append(request)
        if len(self._requests) > self.request_log_limit:
            del self._requests[: len(self._requests) - self.request_log_limit // 2]
            for payload in self._payloads:
                reaction_log = payload._requests
                if len(reaction_log) > self.request_log_limit // 2:
                    del reaction_log[: len(reaction_log) - self.request_log_limit // 2]

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, ApiError):
            return aiohttp.web.json_response(exc.status(), status=exc.code)
        if isinstance(exc, kmock.KubernetesNotFoundError):
            return aiohttp.web.json_response(resource_not_served().status(), status=404)
        if isinstance(exc, kmock.KubernetesError):
            error = ApiError(exc.status, str(exc.reason or "InternalError"),
                             str(exc.message or repr(exc)))
            return aiohttp.web.json_response(error.status(), status=error.code)
        logger.exception("The emulated API failed on a request")
        error = ApiError(500, "InternalError", f"Internal error occurred: {exc!r}")
        return aiohttp.web.json_response(error.status(), status=500)

    async def _stream_error(self, exc: Exception, raw_response: aiohttp.web.StreamResponse) -> None:
        error = exc if isinstance(exc, ApiError) else ApiError(500, "InternalError", repr(exc))
        line = json.dumps({"type": "ERROR", "object": error.status()})
        with contextlib.suppress(ConnectionError):
            await raw_response.write(line.encode() + b"\n")

    def _is_resource_request(self, request: kmock.Request) -> bool:
        return request.resource is not None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _wait_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    # ------------------------------------------------------------------ registry

    @property
    def registry(self) -> Registry:
        return self._registry

    def _rtype(self, group: str, version: str, plural: str) -> ResourceType:
        rtype = self._registry.get(group, version, plural)
        if rtype is None:
            raise resource_not_served()
        return rtype

    def resolve(self, api_version: str, kind_or_plural: str) -> ResourceType:
        """The served resource of an ``apiVersion`` and a kind (``Pod``) or plural (``pods``)."""
        rtype = self._registry.by_kind(api_version, kind_or_plural)
        if rtype is None:
            group, _, version = api_version.rpartition("/")
            rtype = self._registry.get(group, version, kind_or_plural)
        if rtype is None:
            raise ApiError(404, "NotFound",
                           f'no matches for kind "{kind_or_plural}" in version "{api_version}"')
        return rtype

    def _mirror_discovery(self, rtype: ResourceType) -> None:
        """Keep kmock's ``resources`` array in step, for tests that introspect it."""
        self.resources[rtype.ref] = kmock.ResourceInfo(
            namespaced=rtype.namespaced, kind=rtype.kind, singular=rtype.singular,
            verbs=set(rtype.verbs), shortnames=set(rtype.short_names),
            categories=set(rtype.categories), subresources=set(rtype.subresources),
        )

    # ------------------------------------------------------------------ storage

    def _bucket(self, rtype: ResourceType) -> dict[tuple[str | None, str], dict[str, Any]]:
        return self._live.setdefault(rtype.key, {})

    def lookup(self, rtype: ResourceType, namespace: str | None,
               name: str) -> dict[str, Any] | None:
        """The stored object (do not mutate it), or None."""
        return self._live.get(rtype.key, {}).get((namespace if rtype.namespaced else None, name))

    def _require(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.lookup(rtype, namespace, name)
        if obj is None:
            raise not_found(rtype, name)
        return obj

    def objects_of(self, rtype: ResourceType, namespace: str | None = None) -> list[dict[str, Any]]:
        """Stored objects of a resource (in one namespace or all), sorted as etcd keys sort."""
        bucket = self._live.get(rtype.key, {})
        items = [
            obj for (ns, _), obj in bucket.items()
            if namespace is None or not rtype.namespaced or ns == namespace
        ]
        return sorted(items, key=lambda o: (_meta(o).get("namespace") or "", _meta(o)["name"]))

    def _commit(self, rtype: ResourceType, obj: dict[str, Any], event: str,
                old: dict[str, Any] | None) -> dict[str, Any]:
        """Store one write: new resourceVersion, watchers notified, history mirrored."""
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        namespace = meta.get("namespace") if rtype.namespaced else None
        key = (namespace, meta["name"])
        bucket = self._bucket(rtype)
        if event == "DELETED":
            bucket.pop(key, None)
            self._uids.pop(meta.get("uid", ""), None)
            self._gone_uids.add(meta.get("uid", ""))
        else:
            bucket[key] = obj
            self._uids[meta["uid"]] = (rtype.key, namespace, meta["name"])
        self._mirror(rtype, namespace, meta["name"], obj, event)
        self._log.append(WatchEvent(self._rv, rtype.key, event, obj, old))
        if len(self._log) > self.event_log_limit:
            dropped = self._log[: len(self._log) - self.event_log_limit // 2]
            self._compacted_rv = dropped[-1].rv
            del self._log[: len(dropped)]
        self._notify()
        return obj

    def _mirror(self, rtype: ResourceType, namespace: str | None, name: str,
                obj: dict[str, Any], event: str) -> None:
        key = (rtype.ref, namespace, name)
        if key not in self.objects:
            self.objects[key] = obj
            return
        record = self.objects[key]
        if event == "DELETED":
            record.delete()
        else:
            record.history.append(obj)
        if len(record.history) > self.history_limit:
            del record.history[: len(record.history) - self.history_limit]

    # ------------------------------------------------------------------ create

    def create(self, rtype: ResourceType, namespace: str | None, body: Any,
               *, dry_run: bool = False, field_validation: str | None = None) -> dict[str, Any]:
        """POST to a collection: a new object with uid, resourceVersion and generation 1."""
        obj = self._incoming(rtype, body)
        meta = obj["metadata"]
        namespace = self._creation_namespace(rtype, namespace, meta)
        name = self._creation_name(rtype, meta)
        if self.lookup(rtype, namespace, name) is not None:
            raise ApiError(409, "AlreadyExists",
                           f'{rtype.qualified_plural} "{name}" already exists',
                           _details(rtype, name))
        for field in _SERVER_META_FIELDS:
            meta.pop(field, None)
        meta.update({
            "uid": str(uuid.uuid4()),
            "creationTimestamp": now_rfc3339(),
            "generation": 1,
        })
        self._reset_status_on_create(rtype, obj)
        self._apply_builtin_defaults(rtype, obj)
        obj = self._admit(rtype, obj, name, field_validation)
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._check_crd(rtype, obj, name)
        if dry_run:
            return obj
        self._commit(rtype, obj, "ADDED", None)
        self._after_create(rtype, obj)
        return obj

    def _incoming(self, rtype: ResourceType, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad_request(f"the body of a {rtype.kind} must be a JSON object")
        obj = copy.deepcopy(body)
        if obj.get("apiVersion", rtype.api_version) != rtype.api_version or (
            obj.get("kind", rtype.kind) != rtype.kind
        ):
            raise bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) or its kind "
                f"({obj.get('kind')}) does not match the expected {rtype.api_version} {rtype.kind}"
            )
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if not isinstance(obj.get("metadata", {}), dict):
            raise bad_request("metadata must be an object")
        obj["metadata"] = dict(obj.get("metadata") or {})
        return obj

    def _creation_namespace(self, rtype: ResourceType, namespace: str | None,
                            meta: dict[str, Any]) -> str | None:
        if not rtype.namespaced:
            if namespace is not None:
                raise resource_not_served()
            meta.pop("namespace", None)
            return None
        if namespace is None:
            raise ApiError(405, "MethodNotAllowed",
                           f"the server does not allow this method on the requested resource "
                           f"({rtype.qualified_plural} without a namespace)")
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the namespace "
                              "sent on the request")
        meta["namespace"] = namespace
        ns_obj = self.lookup(self._rtype("", "v1", "namespaces"), None, namespace)
        if ns_obj is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if _meta(ns_obj).get("deletionTimestamp"):
            raise ApiError(403, "Forbidden",
                           f"{rtype.plural} \"{meta.get('name') or meta.get('generateName')}\" is "
                           f"forbidden: unable to create new content in namespace {namespace} "
                           "because it is being terminated")
        return namespace

    def _creation_name(self, rtype: ResourceType, meta: dict[str, Any]) -> str:
        name = meta.get("name")
        if not name and meta.get("generateName"):
            for _ in range(100):
                suffix = "".join(random.choices(_GENERATE_ALPHABET, k=5))
                candidate = f"{meta['generateName'][:58]}{suffix}"
                if self.lookup(rtype, meta.get("namespace"), candidate) is None:
                    name = candidate
                    break
        if not name:
            raise invalid(rtype, "", [{
                "reason": "FieldValueRequired", "field": "metadata.name",
                "message": "Required value: name or generateName is required",
            }])
        pattern = _DNS_LABEL if rtype.plural == "namespaces" else _DNS_SUBDOMAIN
        if not isinstance(name, str) or len(name) > 253 or not pattern.match(name):
            raise invalid(rtype, str(name), [{
                "reason": "FieldValueInvalid", "field": "metadata.name",
                "message": f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist '
                           "of lower case alphanumeric characters, '-' or '.', and must start and "
                           "end with an alphanumeric character",
            }])
        meta["name"] = name
        return name

    def _reset_status_on_create(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        """What each kind's registry strategy does to ``status`` on create."""
        if rtype.custom:
            if rtype.has_status_subresource:
                obj.pop("status", None)
            return
        match rtype.plural:
            case "pods":
                obj["status"] = {"phase": "Pending"}
            case "namespaces":
                obj["status"] = {"phase": "Active"}
                obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            case "nodes" | "events":
                pass  # nodes register with their status; events have no status
            case _ if rtype.has_status_subresource:
                obj.pop("status", None)

    def _apply_builtin_defaults(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        """The defaults kube-apiserver fills in that an operator's drift check would notice."""
        spec = obj.get("spec")
        if not isinstance(spec, dict) or rtype.custom:
            return
        if rtype.plural == "pods":
            _default_pod_spec(spec)
        elif rtype.plural == "services":
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if spec.get("type") == "ClusterIP" and "clusterIP" not in spec:
                spec["clusterIP"] = self._allocate_cluster_ip()
            if spec.get("clusterIP") and spec.get("clusterIP") != "None":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        elif rtype.plural == "deployments":
            spec.setdefault("replicas", 1)
            spec.setdefault("revisionHistoryLimit", 10)
            spec.setdefault("progressDeadlineSeconds", 600)
            spec.setdefault("strategy", {"type": "RollingUpdate", "rollingUpdate": {
                "maxUnavailable": "25%", "maxSurge": "25%"}})
            template_spec = (spec.get("template") or {}).get("spec")
            if isinstance(template_spec, dict):
                _default_pod_spec(template_spec)

    def _allocate_cluster_ip(self) -> str:
        used = {
            (o.get("spec") or {}).get("clusterIP")
            for o in self.objects_of(self._rtype("", "v1", "services"))
        }
        for index in range(10, 65000):
            candidate = f"10.96.{index // 256}.{index % 256}"
            if candidate not in used:
                return candidate
        raise ApiError(500, "InternalError", "the service IP range 10.96.0.0/16 is exhausted")

    def _admit(self, rtype: ResourceType, obj: dict[str, Any], name: str,
               field_validation: str | None = None) -> dict[str, Any]:
        """Prune, default and validate a custom resource against its CRD schema.

        With ``fieldValidation=Strict`` (what kubectl sends), fields the schema does
        not declare are refused instead of silently pruned.
        """
        if rtype.schema is None:
            return obj
        if field_validation == "Strict":
            unknown = rtype.schema.unknown_fields(obj)
            if unknown:
                raise bad_request("strict decoding error: " + ", ".join(
                    f'unknown field "{path}"' for path in unknown))
        stored, causes = rtype.schema.admit(obj)
        if causes:
            raise invalid(rtype, name, [cause.as_dict() for cause in causes])
        return stored

    def _check_crd(self, rtype: ResourceType, crd: dict[str, Any], name: str) -> None:
        try:
            crd_types(crd)
        except CrdError as exc:
            raise invalid(rtype, name, [{"reason": "FieldValueInvalid", "field": "",
                                         "message": str(exc)}]) from exc

    def _after_create(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._serve_crd(obj)
        # A controller acting on a stale cache may create a dependent of an owner that is
        # already gone; the real garbage collector removes such dangling dependents too.
        # (Owners never seen here are left alone: tests name synthetic owners.)
        for ref in _meta(obj).get("ownerReferences") or []:
            owner_uid = ref.get("uid")
            if owner_uid in self._gone_uids and owner_uid not in self._uids:
                self._soon(lambda uid=owner_uid: self._collect_garbage(uid))

    def _serve_crd(self, crd: dict[str, Any]) -> None:
        """Register the CRD's resources and report it Established, as the CRD controller does."""
        spec = crd["spec"]
        self._registry.remove_crd(spec["group"], spec["names"]["plural"])
        for rtype in crd_types(crd):
            self._registry.add(rtype)
            self._mirror_discovery(rtype)
        crd_rtype = self._rtype("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        status = crd.get("status") or {}
        if status.get("acceptedNames") == spec["names"] and any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            return
        established = copy.deepcopy(crd)
        now = now_rfc3339()
        established["status"] = {
            "acceptedNames": copy.deepcopy(spec["names"]),
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": now},
            ],
        }
        if established != crd:
            self._commit(crd_rtype, established, "MODIFIED", crd)

    # ------------------------------------------------------------------ update

    def replace(self, rtype: ResourceType, namespace: str | None, name: str, body: Any,
                subresource: str | None = None, *, dry_run: bool = False,
                field_validation: str | None = None) -> dict[str, Any]:
        """PUT: the whole object, refused with 409 if its resourceVersion is stale."""
        old = self._require(rtype, namespace, name)
        candidate = self._incoming(rtype, body)
        given_name = candidate["metadata"].get("name")
        if given_name not in (None, name):
            raise bad_request(f"the name of the object ({given_name}) does not match the name on "
                              f"the URL ({name})")
        given_rv = candidate["metadata"].get("resourceVersion")
        if given_rv and given_rv != _meta(old)["resourceVersion"]:
            raise conflict(rtype, name, "the object has been modified; please apply your changes "
                                        "to the latest version and try again")
        return self._update(rtype, old, candidate, subresource, dry_run=dry_run,
                            field_validation=field_validation)

    def patch(self, rtype: ResourceType, namespace: str | None, name: str, content_type: str,
              body: Any, subresource: str | None = None, *, field_manager: str | None = None,
              dry_run: bool = False,
              field_validation: str | None = None) -> tuple[dict[str, Any], bool]:
        """PATCH in any of the four flavours; returns the object and whether it was created."""
        old = self.lookup(rtype, namespace, name)
        if content_type == "application/apply-patch+yaml":
            return self._server_side_apply(rtype, namespace, name, old, body, subresource,
                                           field_manager, dry_run, field_validation)
        if old is None:
            raise not_found(rtype, name)
        base = copy.deepcopy(old)
        try:
            match content_type:
                case "application/merge-patch+json":
                    patched = patching.merge_patch(base, body)
                case "application/strategic-merge-patch+json":
                    if rtype.custom:
                        raise _unsupported_patch(rtype)
                    patched = patching.strategic_merge_patch(base, body)
                case "application/json-patch+json":
                    patched = patching.json_patch(base, body)
                case _:
                    raise _unsupported_patch(rtype)
        except patching.PatchError as exc:
            raise ApiError(422, "Invalid", str(exc), _details(rtype, name)) from exc
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patch did not produce an object",
                           _details(rtype, name))
        given_rv = _meta(patched).get("resourceVersion")
        if given_rv and given_rv != _meta(old)["resourceVersion"]:
            raise conflict(rtype, name, "the object has been modified; please apply your changes "
                                        "to the latest version and try again")
        candidate = self._incoming(rtype, patched)
        return self._update(rtype, old, candidate, subresource, dry_run=dry_run,
                            field_validation=field_validation), False

    def _server_side_apply(self, rtype: ResourceType, namespace: str | None, name: str,
                           old: dict[str, Any] | None, body: Any, subresource: str | None,
                           field_manager: str | None, dry_run: bool,
                           field_validation: str | None) -> tuple[dict[str, Any], bool]:
        if not field_manager:
            raise bad_request("PATCH requests with content type application/apply-patch+yaml "
                              "must specify a fieldManager")
        applied = self._incoming(rtype, body)
        if applied["metadata"].get("name") not in (None, name):
            raise bad_request(f"the name of the object ({applied['metadata'].get('name')}) does "
                              f"not match the name on the URL ({name})")
        applied["metadata"]["name"] = name
        uid = _meta(old).get("uid") if old else None
        memory_key = (uid or "", field_manager)
        if old is None:
            if subresource is not None:
                raise not_found(rtype, name)
            created = self.create(rtype, namespace, applied, dry_run=dry_run,
                                  field_validation=field_validation)
            if not dry_run:
                self._applied[(_meta(created)["uid"], field_manager)] = applied
            return created, True
        patched = patching.server_side_apply(copy.deepcopy(old), applied,
                                             self._applied.get(memory_key))
        result = self._update(rtype, old, self._incoming(rtype, patched), subresource,
                              dry_run=dry_run, field_validation=field_validation)
        if not dry_run:
            self._applied[memory_key] = applied
        return result, False

    def _update(self, rtype: ResourceType, old: dict[str, Any], candidate: dict[str, Any],
                subresource: str | None, *, dry_run: bool = False,
                field_validation: str | None = None) -> dict[str, Any]:
        """The common tail of PUT and PATCH: subresource rules, immutables, generation."""
        name = _meta(old)["name"]
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in candidate:
                new["status"] = candidate["status"]
            else:
                new.pop("status", None)
        elif subresource is not None:
            raise resource_not_served()
        else:
            new = candidate
            if rtype.has_status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new["metadata"] = dict(_meta(new))
        old_meta = _meta(old)
        for field in _IMMUTABLE_META_FIELDS:
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        meta.pop("managedFields", None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise invalid(rtype, name, [{
                    "reason": "FieldValueForbidden", "field": "metadata.finalizers",
                    "message": "Forbidden: no new finalizers can be added if the object is being "
                               "deleted, found new finalizers " + json.dumps(sorted(added)),
                }])
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        if rtype.plural == "pods" and not rtype.group:
            self._check_pod_update(rtype, old, new)
        new = self._admit(rtype, new, name, field_validation)
        if _without_meta_and_status(new) != _without_meta_and_status(old):
            new["metadata"]["generation"] = int(old_meta.get("generation", 1)) + 1
        if new == old or dry_run:
            return new if dry_run else old
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._check_crd(rtype, new, name)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(rtype, new, old)
            return new
        self._commit(rtype, new, "MODIFIED", old)
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions") and not (
            new["metadata"].get("deletionTimestamp")
        ):
            self._serve_crd(new)
        return new

    def _check_pod_update(self, rtype: ResourceType, old: dict[str, Any],
                          new: dict[str, Any]) -> None:
        """A pod's spec is immutable but for images and a few fields, as on a real cluster."""
        old_spec = copy.deepcopy(old.get("spec") or {})
        new_spec = copy.deepcopy(new.get("spec") or {})
        for spec in (old_spec, new_spec):
            for field in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
                spec.pop(field, None)
            for container in spec.get("containers") or []:
                container.pop("image", None)
            for container in spec.get("initContainers") or []:
                container.pop("image", None)
        if not old_spec.get("nodeName"):
            new_spec.pop("nodeName", None)
            old_spec.pop("nodeName", None)
        if old_spec != new_spec:
            raise invalid(rtype, _meta(old)["name"], [{
                "reason": "FieldValueForbidden", "field": "spec",
                "message": "Forbidden: pod updates may not change fields other than "
                           "`spec.containers[*].image`, `spec.initContainers[*].image`, "
                           "`spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to "
                           "existing tolerations), `spec.terminationGracePeriodSeconds`",
            }])

    # ------------------------------------------------------------------ delete

    def delete(self, rtype: ResourceType, namespace: str | None, name: str,
               options: Mapping[str, Any] | None = None, *,
               dry_run: bool = False) -> dict[str, Any]:
        """DELETE: at once, or deletionTimestamp first while finalizers remain."""
        obj = self._require(rtype, namespace, name)
        options = options or {}
        preconditions = options.get("preconditions") or {}
        meta = _meta(obj)
        if preconditions.get("uid") and preconditions["uid"] != meta.get("uid"):
            raise conflict(rtype, name, f"Precondition failed: UID in precondition: "
                                        f"{preconditions['uid']}, UID in object meta: "
                                        f"{meta.get('uid')}")
        if preconditions.get("resourceVersion") and (
            preconditions["resourceVersion"] != meta.get("resourceVersion")
        ):
            raise conflict(rtype, name, "the object has been modified; please apply your changes "
                                        "to the latest version and try again")
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is True:
            policy = "Orphan"
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise bad_request(f"invalid propagationPolicy {policy!r}")
        if dry_run or meta.get("deletionTimestamp"):
            return obj
        return self._delete_object(rtype, obj, policy or "Background")

    def _delete_object(self, rtype: ResourceType, obj: dict[str, Any],
                       policy: str) -> dict[str, Any]:
        meta = _meta(obj)
        finalizers = list(meta.get("finalizers") or [])
        uid = meta["uid"]
        if policy == "Orphan":
            self._orphan_dependents(uid)
        elif policy == "Foreground" and self._dependents(uid):
            finalizers.append(FOREGROUND_FINALIZER)
        system_cleanup = rtype.key in (("", "v1", "namespaces"),
                                       ("apiextensions.k8s.io", "v1", "customresourcedefinitions"))
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            finalizers.append(CRD_CLEANUP_FINALIZER)
        if not finalizers and not system_cleanup:
            return self._remove(rtype, copy.deepcopy(obj), obj)
        terminating = copy.deepcopy(obj)
        terminating["metadata"]["deletionTimestamp"] = now_rfc3339()
        terminating["metadata"]["deletionGracePeriodSeconds"] = 0
        if finalizers:
            terminating["metadata"]["finalizers"] = finalizers
        if rtype.plural == "namespaces" and not rtype.group:
            terminating["status"] = {"phase": "Terminating"}
        self._commit(rtype, terminating, "MODIFIED", obj)
        self._terminating.add((rtype.key, meta.get("namespace"), meta["name"]))
        self._start_cleanup(rtype, terminating)
        self._soon(self._settle)
        return terminating

    def _remove(self, rtype: ResourceType, final: dict[str, Any],
                old: dict[str, Any]) -> dict[str, Any]:
        """The object is gone: DELETED to watchers, then GC of what it owned (asynchronously)."""
        self._commit(rtype, final, "DELETED", old)
        uid = _meta(final)["uid"]
        self._applied = {k: v for k, v in self._applied.items() if k[0] != uid}
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            self._unserve_crd(final)
        self._soon(lambda: self._collect_garbage(uid))
        self._soon(self._settle)
        return final

    def _unserve_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd.get("spec") or {}
        for rtype in self._registry.remove_crd(spec.get("group", ""),
                                               (spec.get("names") or {}).get("plural", "")):
            for obj in self.objects_of(rtype):
                self._commit(rtype, copy.deepcopy(obj), "DELETED", obj)
            if rtype.ref in self.resources:
                del self.resources[rtype.ref]

    def _soon(self, callback: Callable[[], None]) -> None:
        """Run after the current request, as the real controllers run after the write."""
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon(self._guarded, callback)
        else:
            callback()

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except ApiError as exc:
            logger.debug("A background cleanup step was refused: %s", exc.message)

    def _all_live(self) -> Iterable[tuple[ResourceType, dict[str, Any]]]:
        for key, bucket in list(self._live.items()):
            rtype = self._registry.get(*key)
            if rtype is None:
                continue
            for obj in list(bucket.values()):
                yield rtype, obj

    def _dependents(self, owner_uid: str) -> list[tuple[ResourceType, dict[str, Any]]]:
        return [
            (rtype, obj) for rtype, obj in self._all_live()
            if any(ref.get("uid") == owner_uid for ref in _meta(obj).get("ownerReferences") or [])
        ]

    def _collect_garbage(self, owner_uid: str) -> None:
        """Delete the dependents of a removed owner, or drop the dangling reference.

        A dependent that still has another live owner stays and loses only the
        reference to the gone one, as the real garbage collector does.
        """
        for rtype, obj in self._dependents(owner_uid):
            current = self.lookup(rtype, _meta(obj).get("namespace"), _meta(obj)["name"])
            if current is None or _meta(current).get("uid") != _meta(obj).get("uid"):
                continue
            refs = _meta(current).get("ownerReferences") or []
            alive = [ref for ref in refs if ref.get("uid") in self._uids]
            if alive:
                updated = copy.deepcopy(current)
                updated["metadata"]["ownerReferences"] = alive
                self._update(rtype, current, updated, None)
            elif not _meta(current).get("deletionTimestamp"):
                self._delete_object(rtype, current, "Background")

    def _orphan_dependents(self, owner_uid: str) -> None:
        for rtype, obj in self._dependents(owner_uid):
            updated = copy.deepcopy(obj)
            refs = [r for r in updated["metadata"]["ownerReferences"] if r.get("uid") != owner_uid]
            if refs:
                updated["metadata"]["ownerReferences"] = refs
            else:
                updated["metadata"].pop("ownerReferences")
            self._update(rtype, obj, updated, None)

    def _start_cleanup(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        """Begin what a terminating owner waits for: its dependents, its contents."""
        meta = _meta(obj)
        victims: list[tuple[ResourceType, dict[str, Any]]] = []
        if FOREGROUND_FINALIZER in (meta.get("finalizers") or []):
            victims += self._dependents(meta["uid"])
        if rtype.key == ("", "v1", "namespaces"):
            victims += [(t, o) for t, o in self._all_live()
                        if t.namespaced and _meta(o).get("namespace") == meta["name"]]
        if rtype.key == ("apiextensions.k8s.io", "v1", "customresourcedefinitions"):
            victims += self._custom_objects_of(obj)
        for victim_type, victim in victims:
            if not _meta(victim).get("deletionTimestamp"):
                self._soon(lambda t=victim_type, v=victim: self._delete_if_same(t, v))

    def _delete_if_same(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        current = self.lookup(rtype, _meta(obj).get("namespace"), _meta(obj)["name"])
        if current is not None and _meta(current).get("uid") == _meta(obj).get("uid") and not (
            _meta(current).get("deletionTimestamp")
        ):
            self._delete_object(rtype, current, "Background")

    def _custom_objects_of(
        self, crd: Mapping[str, Any]
    ) -> list[tuple[ResourceType, dict[str, Any]]]:
        spec = crd.get("spec") or {}
        wanted = (spec.get("group"), (spec.get("names") or {}).get("plural"))
        return [(t, o) for t, o in self._all_live() if t.custom and (t.group, t.plural) == wanted]

    def _settle(self) -> None:
        """Finish terminating objects whose system finalizers have nothing left to wait for."""
        for key in list(self._terminating):
            group_version_plural, namespace, name = key
            rtype = self._registry.get(*group_version_plural)
            obj = self._live.get(group_version_plural, {}).get(
                (namespace if rtype and rtype.namespaced else None, name))
            if rtype is None or obj is None:
                self._terminating.discard(key)
                continue
            meta = _meta(obj)
            finalizers = list(meta.get("finalizers") or [])
            if FOREGROUND_FINALIZER in finalizers and not self._dependents(meta["uid"]):
                finalizers.remove(FOREGROUND_FINALIZER)
            if CRD_CLEANUP_FINALIZER in finalizers and not self._custom_objects_of(obj):
                finalizers.remove(CRD_CLEANUP_FINALIZER)
            is_namespace = rtype.key == ("", "v1", "namespaces")
            if is_namespace and any(
                t.namespaced and _meta(o).get("namespace") == name for t, o in self._all_live()
            ):
                continue
            if finalizers != list(meta.get("finalizers") or []):
                updated = copy.deepcopy(obj)
                updated["metadata"]["finalizers"] = finalizers
                self._update(rtype, obj, updated, None)
            elif is_namespace and not finalizers:
                self._remove(rtype, copy.deepcopy(obj), obj)
            if self.lookup(rtype, namespace, name) is None:
                self._terminating.discard(key)

    # ------------------------------------------------------------------ list & watch

    def list(self, rtype: ResourceType, namespace: str | None,
             labels: LabelSelector | None = None, fields: FieldSelector | None = None,
             limit: int | None = None, continue_token: str | None = None) -> dict[str, Any]:
        """A ``...List`` object; with ``limit``, pages chained by ``continue`` tokens."""
        items = [
            obj for obj in self.objects_of(rtype, namespace)
            if (labels is None or labels.matches(_meta(obj).get("labels")))
            and (fields is None or fields.matches(obj))
        ]
        list_rv = str(self._rv)
        if continue_token:
            start_after, list_rv = _decode_continue(continue_token)
            items = [o for o in items if _sort_key(o) > start_after]
        metadata: dict[str, Any] = {"resourceVersion": list_rv}
        if limit and len(items) > limit:
            items = items[:limit]
            metadata["continue"] = _encode_continue(_sort_key(items[-1]), list_rv)
            metadata["remainingItemCount"] = 0
        return {
            "kind": f"{rtype.kind}List",
            "apiVersion": rtype.api_version,
            "metadata": metadata,
            "items": items,
        }

    def _matcher(self, rtype: ResourceType, namespace: str | None, labels: LabelSelector,
                 fields: FieldSelector) -> Callable[[Mapping[str, Any] | None], bool]:
        def matches(obj: Mapping[str, Any] | None) -> bool:
            if obj is None:
                return False
            meta = _meta(obj)
            if rtype.namespaced and namespace is not None and meta.get("namespace") != namespace:
                return False
            return labels.matches(meta.get("labels")) and fields.matches(obj)
        return matches

    async def watch(self, rtype: ResourceType, namespace: str | None, labels: LabelSelector,
                    fields: FieldSelector, since: str | None, timeout: float,
                    bookmarks: bool, send_initial: bool) -> AsyncIterator[dict[str, Any]]:
        """Watch events (as dicts) for one resource, from ``since`` or from now."""
        matches = self._matcher(rtype, namespace, labels, fields)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if since in (None, "", "0") or send_initial:
            cursor = self._rv
            for obj in self.objects_of(rtype, namespace):
                if matches(obj):
                    yield {"type": "ADDED", "object": obj}
            if send_initial and bookmarks:
                yield self._bookmark(rtype, cursor, initial_end=True)
        else:
            cursor = _parse_rv(since)
            if cursor < self._compacted_rv:
                yield _gone(since)
                return
        next_bookmark = loop.time() + self.bookmark_interval
        while not self._closing:
            if cursor < self._compacted_rv:
                yield _gone(str(cursor))
                return
            start = bisect.bisect_right(self._log, cursor, key=lambda e: e.rv)
            pending = self._log[start:]
            if pending:
                cursor = pending[-1].rv
            for event in pending:
                if event.key != rtype.key:
                    continue
                translated = _translate(event, matches)
                if translated is not None:
                    yield translated
            now = loop.time()
            if now >= deadline:
                return
            if bookmarks and now >= next_bookmark:
                yield self._bookmark(rtype, cursor)
                next_bookmark = now + self.bookmark_interval
            if pending:
                continue
            wait_for = min(deadline, next_bookmark if bookmarks else deadline) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_event().wait(), timeout=max(wait_for, 0.0))

    def _bookmark(self, rtype: ResourceType, rv: int, initial_end: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK",
                "object": {"kind": rtype.kind, "apiVersion": rtype.api_version,
                           "metadata": metadata}}

    # ------------------------------------------------------------------ HTTP

    def _delegate(self, request: kmock.Request) -> rendering.Payload:
        raise _ServeDirectly(self._respond_resource)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        try:
            return await super()._handle(request)
        except _ServeDirectly as direct:
            response: aiohttp.web.StreamResponse = await direct.respond(request)
            return response

    async def _respond_resource(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        reply = self._serve_resource(request)
        if isinstance(reply, _Reply):
            return aiohttp.web.json_response(reply.body, status=reply.status)
        return await self._stream(request, reply)

    def _delegate_openapi_v2(self, request: kmock.Request) -> rendering.Payload:
        raise _ServeDirectly(self._respond_openapi_v2)

    async def _respond_openapi_v2(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """An OpenAPI v2 document without definitions, in protobuf for kubectl.

        kubectl validates ``kind: List`` manifests on the client against this
        document; a kind it does not describe is accepted as is, and this server
        validates custom resources against their CRD schemas itself.
        """
        accept = request.headers.get("Accept") or request.headers.get("accept") or ""
        if "protobuf" in accept:
            return aiohttp.web.Response(
                body=openapi.v2_protobuf(SERVER_VERSION["gitVersion"]),
                content_type="application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )
        return aiohttp.web.json_response(openapi.v2_json(SERVER_VERSION["gitVersion"]))

    async def _stream(self, request: kmock.Request,
                      events: AsyncIterator[dict[str, Any]]) -> aiohttp.web.StreamResponse:
        """A watch response: chunked JSON lines until the stream ends or the client leaves."""
        raw_request = request._raw_request
        assert raw_request is not None
        response = aiohttp.web.StreamResponse(status=200,
                                              headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw_request)
        as_table = "as=Table" in (request.headers.get("Accept") or "")
        include = request.params.get("includeObject", "Metadata")
        route = self._route(request)
        first = True
        try:
            async for event in events:
                if as_table and event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    table = tables.to_table(route.rtype, [event["object"]], {}, include)
                    if not first:
                        table["columnDefinitions"] = []
                    event = {"type": event["type"], "object": table}
                    first = False
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        except ApiError as exc:
            await self._stream_error(exc, response)
        return response

    def _serve_resource(self, request: kmock.Request) -> _Reply | AsyncIterator[dict[str, Any]]:
        route = self._route(request)
        method = str(getattr(request.method, "value", request.method)).upper()
        params = request.params
        dry_run = params.get("dryRun") == "All"
        strictness = params.get("fieldValidation")
        rtype, namespace, name, sub = route.rtype, route.namespace, route.name, route.subresource
        if sub is not None and sub not in rtype.subresources:
            raise resource_not_served()
        if sub is not None and sub != "status":
            raise ApiError(405, "MethodNotAllowed",
                           f"the emulated API does not serve the {sub} subresource")
        if method == "GET" and params.get("watch") in ("true", "1"):
            return self._serve_watch(route, params, name)
        if method == "GET" and name is None:
            listed = self.list(rtype, namespace, self._labels(params), self._fields(rtype, params),
                               _parse_limit(params.get("limit")), params.get("continue"))
            return self._maybe_table(request, rtype, listed["items"], listed["metadata"], listed)
        if method == "GET":
            obj = self._require(rtype, namespace, name)
            return self._maybe_table(request, rtype, [obj], {"resourceVersion": str(self._rv)}, obj)
        if method == "POST" and name is None:
            created = self.create(rtype, namespace, _decode_body(request), dry_run=dry_run,
                                  field_validation=strictness)
            return _Reply(created, 201)
        if method == "DELETE" and name is None:
            return _Reply(self._delete_collection(rtype, namespace, request))
        if name is None:
            raise ApiError(405, "MethodNotAllowed",
                           "the server does not allow this method on the requested resource")
        if method == "PUT":
            return _Reply(self.replace(rtype, namespace, name, _decode_body(request), sub,
                                       dry_run=dry_run, field_validation=strictness))
        if method == "PATCH":
            patched, created = self.patch(rtype, namespace, name, _content_type(request),
                                          _decode_body(request), sub,
                                          field_manager=params.get("fieldManager"), dry_run=dry_run,
                                          field_validation=strictness)
            return _Reply(patched, 201 if created else 200)
        if method == "DELETE":
            options = dict(_decode_body(request) or {})
            if "propagationPolicy" in params:
                options["propagationPolicy"] = params["propagationPolicy"]
            return _Reply(self.delete(rtype, namespace, name, options, dry_run=dry_run))
        raise ApiError(405, "MethodNotAllowed",
                       "the server does not allow this method on the requested resource")

    def _route(self, request: kmock.Request) -> Route:
        assert request.resource is not None
        rtype = self._rtype(request.resource.group or "", request.resource.version or "",
                            request.resource.plural or "")
        if request.namespace is not None and not rtype.namespaced:
            raise resource_not_served()
        if request.name is not None and rtype.namespaced and request.namespace is None:
            raise resource_not_served()
        return Route(rtype, request.namespace, request.name, request.subresource)

    def _fields(self, rtype: ResourceType, params: Mapping[str, str]) -> FieldSelector:
        try:
            return parse_field_selector(params.get("fieldSelector"), rtype.plural,
                                        builtin=not rtype.custom)
        except SelectorError as exc:
            raise bad_request(str(exc)) from exc

    def _labels(self, params: Mapping[str, str]) -> LabelSelector:
        try:
            return parse_label_selector(params.get("labelSelector"))
        except SelectorError as exc:
            raise bad_request(str(exc)) from exc

    def _serve_watch(self, route: Route, params: Mapping[str, str],
                     name: str | None) -> AsyncIterator[dict[str, Any]]:
        labels = self._labels(params)
        fields = self._fields(route.rtype, params)
        if name is not None:
            by_name = parse_field_selector(f"metadata.name={name}", route.rtype.plural, False)
            fields = FieldSelector(fields.requirements + by_name.requirements)
        since = params.get("resourceVersion")
        if since not in (None, "", "0"):
            _parse_rv(since)
        try:
            timeout = float(params.get("timeoutSeconds") or 0)
        except ValueError as exc:
            raise bad_request(f"invalid timeoutSeconds: {params.get('timeoutSeconds')!r}") from exc
        if timeout <= 0:  # as kube-apiserver: absent or 0 means the server's own timeout
            timeout = self.watch_timeout
        return self.watch(
            route.rtype, route.namespace, labels, fields, since, timeout,
            bookmarks=params.get("allowWatchBookmarks") in ("true", "1"),
            send_initial=params.get("sendInitialEvents") in ("true", "1"),
        )

    def _maybe_table(self, request: kmock.Request, rtype: ResourceType,
                     items: list[dict[str, Any]], metadata: Mapping[str, Any],
                     plain: dict[str, Any]) -> _Reply:
        accept = request.headers.get("Accept") or request.headers.get("accept") or ""
        if "as=Table" not in accept:
            return _Reply(plain)
        return _Reply(tables.to_table(rtype, items, metadata,
                                      request.params.get("includeObject", "Metadata")))

    def _delete_collection(self, rtype: ResourceType, namespace: str | None,
                           request: kmock.Request) -> dict[str, Any]:
        params = request.params
        listed = self.list(rtype, namespace, self._labels(params), self._fields(rtype, params))
        options = dict(_decode_body(request) or {})
        for obj in listed["items"]:
            self.delete(rtype, _meta(obj).get("namespace"), _meta(obj)["name"], options)
        return {**listed, "metadata": {"resourceVersion": str(self._rv)}}

    # ------------------------------------------------------------------ discovery

    async def _serve_server_version(self, request: kmock.Request) -> rendering.Payload:
        return dict(SERVER_VERSION)

    async def _serve_api(self, request: kmock.Request) -> rendering.Payload:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.host or "127.0.0.1"}]}

    def _group_entry(self, group: str, versions: list[str]) -> dict[str, Any]:
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": listed, "preferredVersion": listed[0]}

    async def _serve_apis(self, request: kmock.Request) -> rendering.Payload:
        groups = [self._group_entry(g, vs) for g, vs in self._registry.groups().items()]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> rendering.Payload:
        group = request.url.path.strip("/").split("/")[1]
        versions = self._registry.groups().get(group)
        if not versions:
            raise resource_not_served()
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_entry(group, versions)}

    async def _serve_version(self, request: kmock.Request) -> rendering.Payload:
        parts = request.url.path.strip("/").split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        served = self._registry.in_group_version(group, version)
        if not served:
            raise resource_not_served()
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for rtype in served for entry in rtype.discovery_entries()],
        }

    async def _serve_root(self, request: kmock.Request) -> rendering.Payload:
        paths = {"/api", "/api/v1", "/apis", "/version", "/healthz", "/livez", "/readyz",
                 "/openapi/v2", "/openapi/v3"}
        for group, versions in self._registry.groups().items():
            paths.add(f"/apis/{group}")
            paths.update(f"/apis/{group}/{v}" for v in versions)
        return {"paths": sorted(paths)}

    async def _serve_openapi_index(self, request: kmock.Request) -> rendering.Payload:
        return openapi.index(self._registry)

    async def _serve_openapi_document(self, request: kmock.Request) -> rendering.Payload:
        parts = request.url.path.strip("/").split("/")[2:]
        if len(parts) == 2 and parts[0] == "api":
            document = openapi.group_version_document(self._registry, "", parts[1])
        elif len(parts) == 3 and parts[0] == "apis":
            document = openapi.group_version_document(self._registry, parts[1], parts[2])
        else:
            document = None
        if document is None:
            raise resource_not_served()
        return document

    # ------------------------------------------------------------------ sync helpers

    def apply_object(self, obj: Mapping[str, Any],
                     field_manager: str = "edgeweave-sandbox") -> dict[str, Any]:
        """Create or update one manifest by server-side apply (used by :meth:`ApiServer.apply`)."""
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not api_version or not kind:
            raise bad_request("a manifest needs apiVersion and kind")
        rtype = self.resolve(str(api_version), str(kind))
        meta = _meta(obj)
        namespace = (meta.get("namespace") or "default") if rtype.namespaced else None
        result, _ = self.patch(rtype, namespace, str(meta.get("name")),
                               "application/apply-patch+yaml", dict(obj),
                               field_manager=field_manager)
        return result


def _default_pod_spec(spec: dict[str, Any]) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        image = str(container.get("image", ""))
        latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def _unsupported_patch(rtype: ResourceType) -> ApiError:
    accepted = ["application/json-patch+json", "application/merge-patch+json",
                "application/apply-patch+yaml"]
    if not rtype.custom:
        accepted.insert(2, "application/strategic-merge-patch+json")
    return ApiError(415, "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    "include: " + ", ".join(accepted))


def _sort_key(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace') or ''}/{meta.get('name')}"


def _encode_continue(start_after: str, rv: str) -> str:
    raw = json.dumps({"start": start_after, "rv": rv}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[str, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(data["start"]), str(data["rv"])
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_request(f"invalid continue token: {token!r}") from exc


def _parse_limit(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return max(0, int(text)) or None
    except ValueError as exc:
        raise bad_request(f"invalid limit: {text!r}") from exc


def _parse_rv(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise bad_request(f'invalid resource version "{text}"') from exc


def _gone(since: str) -> dict[str, Any]:
    return {"type": "ERROR", "object": ApiError(
        410, "Expired", f"too old resource version: {since} (compacted)").status()}


def _translate(event: WatchEvent,
               matches: Callable[[Mapping[str, Any] | None], bool]) -> dict[str, Any] | None:
    """The event as this watcher sees it: crossing its selector is ADDED or DELETED."""
    now, before = matches(event.obj), matches(event.old)
    if event.type == "DELETED":
        return {"type": "DELETED", "object": event.obj} if (now or before) else None
    if event.type == "ADDED":
        return {"type": "ADDED", "object": event.obj} if now else None
    if now and before:
        return {"type": "MODIFIED", "object": event.obj}
    if now:
        return {"type": "ADDED", "object": event.obj}
    if before:
        return {"type": "DELETED", "object": event.obj}
    return None


# ---------------------------------------------------------------------- the server


class SandboxError(EdgeweaveError):
    """The emulated API could not start or was asked for something it does not have."""


class ApiServer:
    """The emulated API on ``http://127.0.0.1:PORT``, in a thread with its own event loop.

    Usage::

        with ApiServer() as api:
            api.write_kubeconfig(tmp / "kubeconfig")
            api.apply_file("crds/inferencepipelines.edgeweave.io.yaml")
            ...

    The ``emulator`` attribute is the kmock handler; its state may only be touched
    from the server's loop, which :meth:`call` does for synchronous callers.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self.host = host
        self._requested_port = port
        self._options = options
        self.emulator: EmulatedKubernetes | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.port: int | None = None

    # -- lifecycle

    def start(self, timeout: float = 30.0) -> ApiServer:
        """Start serving; returns once the port accepts connections."""
        if self._thread is not None:
            raise SandboxError("the emulated API server is already running")
        self._thread = threading.Thread(target=self._run, name="emulated-kube-apiserver",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise SandboxError(f"the emulated API server did not start within {timeout:g} s")
        if self._failure is not None:
            self._thread.join()
            self._thread = None
            raise SandboxError(f"the emulated API server could not listen on "
                               f"{self.host}:{self._requested_port}: {self._failure}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: open watches end, the port closes, the thread exits."""
        if self._thread is None or self._loop is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        emulator = EmulatedKubernetes(**self._options)
        self.emulator = emulator
        async with emulator:
            server = aiohttp.web.Server(emulator, access_log=None, handler_cancellation=True)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0, handle_signals=False)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, self.host, self._requested_port)
            try:
                await site.start()
                address = runner.addresses[0]
                self.port = int(address[1])
                self._ready.set()
                await self._stopped.wait()
                emulator.close_watches()
                await asyncio.sleep(0)
            finally:
                await runner.cleanup()

    # -- addressing

    @property
    def url(self) -> str:
        if self.port is None:
            raise SandboxError("the emulated API server is not running")
        return f"http://{self.host}:{self.port}"

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig for this server (plain HTTP; the token is accepted but not checked)."""
        name = "edgeweave-sandbox"
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": {"server": self.url}}],
            "users": [{"name": name, "user": {"token": "edgeweave-sandbox"}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name,
                                                     "namespace": namespace}}],
            "current-context": name,
            "preferences": {},
        }

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write :meth:`kubeconfig` to ``path`` (parents created, mode 0600) and return it."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(self.kubeconfig(namespace), sort_keys=False))
        target.chmod(0o600)
        return target

    # -- synchronous access to the emulator's state

    def call(self, fn: Callable[[EmulatedKubernetes], T], timeout: float = 30.0) -> T:
        """Run ``fn(emulator)`` in the server's loop and return its result (or raise)."""
        if self._loop is None or self.emulator is None or self._thread is None:
            raise SandboxError("the emulated API server is not running")
        emulator = self.emulator

        async def run() -> T:
            return fn(emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create one object from its manifest (namespace ``default`` if it names none)."""
        def create(api: EmulatedKubernetes) -> dict[str, Any]:
            rtype = api.resolve(str(obj.get("apiVersion")), str(obj.get("kind")))
            namespace = (_meta(obj).get("namespace") or "default") if rtype.namespaced else None
            return copy.deepcopy(api.create(rtype, namespace, dict(obj)))
        return self.call(create)

    def get(self, api_version: str, kind: str, name: str,
            namespace: str | None = None) -> dict[str, Any] | None:
        """The object, or None if there is none."""
        def get(api: EmulatedKubernetes) -> dict[str, Any] | None:
            found = api.lookup(api.resolve(api_version, kind), namespace, name)
            return copy.deepcopy(found) if found is not None else None
        return self.call(get)

    def list(self, api_version: str, kind: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        """Objects of a kind (all namespaces unless one is given), optionally by label."""
        def list_(api: EmulatedKubernetes) -> list[dict[str, Any]]:
            rtype = api.resolve(api_version, kind)
            listed = api.list(rtype, namespace, parse_label_selector(label_selector))
            return copy.deepcopy(listed["items"])
        return self.call(list_)

    def patch_status(self, api_version: str, kind: str, name: str, status: Mapping[str, Any],
                     namespace: str | None = None) -> dict[str, Any]:
        """Merge-patch an object's status, as a kubelet or controller would."""
        def patch(api: EmulatedKubernetes) -> dict[str, Any]:
            rtype = api.resolve(api_version, kind)
            sub = "status" if rtype.has_status_subresource else None
            result, _ = api.patch(rtype, namespace, name, "application/merge-patch+json",
                                  {"status": dict(status)}, sub)
            return copy.deepcopy(result)
        return self.call(patch)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None,
               propagation_policy: str = "Background") -> dict[str, Any]:
        """Delete an object as ``kubectl delete`` would (finalizers and GC included)."""
        def delete(api: EmulatedKubernetes) -> dict[str, Any]:
            rtype = api.resolve(api_version, kind)
            return copy.deepcopy(api.delete(rtype, namespace, name,
                                            {"propagationPolicy": propagation_policy}))
        return self.call(delete)

    def delete_node(self, name: str) -> dict[str, Any]:
        """Remove a Node, as when a machine leaves the cluster."""
        return self.delete("v1", "Node", name)

    def set_node_ready(self, name: str, ready: bool) -> dict[str, Any]:
        """Flip the Node's Ready condition, as the node controller does when a kubelet stops."""
        node = self.get("v1", "Node", name)
        if node is None:
            raise SandboxError(f"there is no node {name!r} in the emulated cluster")
        conditions = [c for c in (node.get("status") or {}).get("conditions") or []
                      if c.get("type") != "Ready"]
        conditions.append({
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "NodeStatusUnknown",
            "message": "kubelet is posting ready status" if ready else
                       "Kubelet stopped posting node status.",
            "lastTransitionTime": now_rfc3339(),
            "lastHeartbeatTime": now_rfc3339(),
        })
        return self.patch_status("v1", "Node", name, {"conditions": conditions})

    def apply(self, manifests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Server-side apply of manifests, in order (``List`` objects are unpacked)."""
        results: list[dict[str, Any]] = []
        for manifest in _unpack(manifests):
            results.append(self.call(lambda api, m=manifest: copy.deepcopy(api.apply_object(m))))
        return results

    def apply_file(self, path: str | Path) -> list[dict[str, Any]]:
        """:meth:`apply` every YAML document of a file (like ``kubectl apply -f``)."""
        source = Path(path)
        try:
            documents = [d for d in yaml.safe_load_all(source.read_text()) if d]
        except (OSError, yaml.YAMLError) as exc:
            raise SandboxError(f"{source}: cannot read the manifests: {exc}") from exc
        return self.apply(documents)


def _unpack(manifests: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    for manifest in manifests:
        if str(manifest.get("kind", "")).endswith("List") and "items" in manifest:
            yield from _unpack(manifest.get("items") or [])
        else:
            yield manifest
