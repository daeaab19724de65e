"""The sandbox's kubelet: Pods bound to emulated nodes run as local processes.

:class:`PodRunner` watches every Pod whose ``spec.nodeName`` is a node the sandbox
runs, starts its containers' ``edgeweave`` commands as processes (inside the node's
network namespace and CPU cgroup when the sandbox emulates nodes, plain processes
otherwise), and reports what a kubelet reports: phase, the ``Ready`` and
``ContainersReady`` conditions from each container's readiness probe, ``podIP``,
``hostIP`` and container states with restart counts. It restarts containers as
``restartPolicy`` says (with a crash-loop backoff), stops a Pod's processes when the
Pod is deleted, and kills every process of a node that is deleted or goes NotReady
(a machine lost), resuming its Pods if it comes back Ready before they are evicted.

A container is no image here, so the runner maps it onto this machine:

* **Command.** ``edgeweave ...`` (the worker image's entry point; also an empty
  command) runs as ``<this python> -m edgeweave ...``; anything else is refused with
  ``CreateContainerError``. ``$(VAR)`` references are expanded as Kubernetes does.
* **Volumes.** ``secret``, ``configMap``, ``downwardAPI``, ``emptyDir`` and
  ``hostPath`` volumes are directories under the sandbox's run directory; every
  argument and environment value naming a path under a ``mountPath`` is rewritten to
  the directory (``/var/run/edgeweave/token/token`` → ``<run>/pods/<pod>/token/token``),
  and ``TMPDIR`` follows a volume mounted at ``/tmp``. Secret and ConfigMap volumes
  are refreshed when their objects change, as a kubelet does (sooner).
* **Environment.** ``value`` and ``valueFrom`` (``secretKeyRef``,
  ``configMapKeyRef``, ``fieldRef`` such as ``status.podIP``, ``spec.nodeName``,
  ``metadata.name``/``namespace``/``uid``/``labels['k']``, ``resourceFieldRef``) and
  ``envFrom``; on top of the few host variables a Python program needs (``PATH``,
  ``PYTHONPATH``, ``VIRTUAL_ENV``, locale), never the sandbox's whole environment.

**Addressing.** Every Pod gets an address of its own, so that two Pods may listen on
the same port (a Pod of the old plan and one of the new on one node, or two
pipelines): with emulation an extra address of the node's subnet on the node's
interface (traffic leaves through the node's shaped link); without, a loopback
address ``127.B.x.y`` (Linux routes all of 127/8 to ``lo``; ``B`` is random per
sandbox so concurrent sandboxes do not meet). A listen address ``0.0.0.0:PORT``,
``[::]:PORT`` or ``:PORT`` in an argument or variable becomes ``<pod address>:PORT``:
the commands must take their listen address from their arguments or environment,
as ``edgeweave worker`` and ``gateway`` do.

**Names.** There is no cluster DNS on this machine, so cluster names in arguments and
variables are resolved when a container starts, as a resolver would at connect time:
``<hostname>.<subdomain>.<ns>.svc[.<cluster domain>]`` is that Pod's address (the
subdomain's headless Service must exist; unready Pods only with
``publishNotReadyAddresses``), ``<service>.<ns>.svc[...]`` is a Service's sandbox
address (a relay to its endpoints, see
:class:`~edgeweave.sandbox.controllers.ServiceProxy`) or, for a headless Service,
its first endpoint. A container waits (``ContainerCreating``, with the name in the
message) until every name in its arguments, variables and mounted ConfigMap text
resolves; a ConfigMap file a running process re-reads (a list of peers) is updated
once every name in its new version resolves. Addresses are sticky per Pod name and
node, so a recreated Pod keeps the address its peers were given.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import aiohttp

from edgeweave.local.parent import PARENT_PID_ENV
from edgeweave.sandbox.apiserver import now_rfc3339
from edgeweave.sandbox.controllers import (
    PODS,
    ClusterCache,
    KubeApi,
    KubeApiError,
    ServiceProxy,
    container_port,
    is_headless,
    meta,
    node_ready,
    parse_cpu,
    pod_is_ready,
    selector_matches,
    terminating,
)

if TYPE_CHECKING:
    from edgeweave.local.emulate import EdgeEmulator, EmulatedNode

log = logging.getLogger(__name__)

TICK_S: Final = 0.1
BACKOFF_START_S: Final = 1.0
BACKOFF_MAX_S: Final = 16.0
"""Crash-loop backoff: doubling from 1 s to 16 s (a kubelet: 10 s to 5 min)."""
BACKOFF_RESET_AFTER_S: Final = 30.0
VOLUME_REFRESH_S: Final = 1.0
"""Secret and ConfigMap volumes are re-synced this often (and when the runner sees a
change); a kubelet takes up to a minute."""
MAX_GRACE_S: Final = 10.0
"""terminationGracePeriodSeconds is honoured up to this (the default 30 s would only
slow every rollout and shutdown of a sandbox)."""
HOST_ENV: Final = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "LANG", "LC_ALL", "LD_LIBRARY_PATH")
WILDCARD_LISTEN = re.compile(r"(?:0\.0\.0\.0|\[::\])?:(?P<port>\d{1,5})")


class SandboxRunError(Exception):
    """A network or process operation of the runner failed."""


class NotYet(Exception):
    """A container cannot start yet; ``reason``/``message`` go to its waiting state."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- networks


class LoopbackNetwork:
    """Addresses without root: each Pod and Service gets a loopback address of its own."""

    emulated = False

    def __init__(self, block: int | None = None) -> None:
        self.block = block if block is not None else random.randrange(100, 250)
        self._pods = ipaddress.ip_network(f"127.{self.block}.0.0/17")
        self._services = ipaddress.ip_network(f"127.{self.block}.128.0/17")
        self._pool = _Pool([str(a) for a in self._pods.hosts() if not str(a).endswith(".255")])
        self._service_pool = _Pool(
            [str(a) for a in self._services.hosts() if not str(a).endswith(".255")]
        )

    @property
    def host_address(self) -> str:
        """Where a pod reaches a server on the host (the operator's shard server)."""
        return "127.0.0.1"

    def node_address(self, node: str) -> str:
        return "127.0.0.1"

    def reserve_pod_address(self, sticky: str, node: str) -> str:
        return self._pool.take(sticky)

    async def configure_pod_address(self, address: str, node: str) -> None:
        return None

    async def release_pod_address(self, address: str, node: str) -> None:
        self._pool.give_back(address)

    async def allocate_service_address(self, key: str) -> str:
        return self._service_pool.take(key)

    async def release_service_address(self, key: str) -> None:
        self._service_pool.release_key(key)

    def describe(self) -> str:
        return f"plain processes; pods and services on 127.{self.block}.0.0/16 (loopback)"


class EmulatedNetwork:
    """Addresses on an :class:`~edgeweave.local.emulate.EdgeEmulator`'s subnet.

    Node ``i`` is ``S.(i+2)``; Pods take further addresses of ``S`` on their node's
    interface, Services take addresses on the host's bridge (from the top down), so
    that nodes and the host reach both.
    """

    emulated = True

    def __init__(self, emulator: EdgeEmulator) -> None:
        self.emulator = emulator
        subnet = emulator.subnet
        assert subnet is not None, "the emulator must be started"
        used = {emulator.host_address, *(node.address for node in emulator.nodes)}
        free = [str(a) for a in subnet.hosts() if str(a) not in used]
        half = len(free) * 3 // 4
        self._pool = _Pool(free[:half])
        self._service_pool = _Pool(list(reversed(free[half:])))

    @property
    def host_address(self) -> str:
        return self.emulator.host_address

    def node_address(self, node: str) -> str:
        return self.emulator.node(node).address

    def reserve_pod_address(self, sticky: str, node: str) -> str:
        return self._pool.take(sticky)

    async def configure_pod_address(self, address: str, node: str) -> None:
        netns = self.emulator.node(node).netns
        await _ip(["ip", "-n", netns, "addr", "replace", f"{address}/32", "dev", "eth0"])

    async def release_pod_address(self, address: str, node: str) -> None:
        with contextlib.suppress(SandboxRunError, Exception):
            netns = self.emulator.node(node).netns
            await _ip(["ip", "-n", netns, "addr", "del", f"{address}/32", "dev", "eth0"],
                      quiet=True)
        self._pool.give_back(address)

    async def allocate_service_address(self, key: str) -> str:
        address = self._service_pool.take(key)
        await _ip(["ip", "addr", "replace", f"{address}/32", "dev", self.emulator.bridge])
        return address

    async def release_service_address(self, key: str) -> None:
        address = self._service_pool.address_of(key)
        if address is None:
            return
        with contextlib.suppress(SandboxRunError):
            await _ip(["ip", "addr", "del", f"{address}/32", "dev", self.emulator.bridge],
                      quiet=True)
        self._service_pool.release_key(key)

    def describe(self) -> str:
        return (f"emulated nodes on {self.emulator.subnet} (network namespaces, shaped links, "
                f"cgroup CPU quotas); host at {self.host_address}")


class _Pool:
    """Addresses handed out round robin (so a freed one is not reused at once: stale ARP
    entries would point at its old node), sticky per key while free."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._free = list(addresses)
        self._taken: dict[str, str] = {}
        self._last: dict[str, str] = {}

    def take(self, key: str) -> str:
        if key in self._taken:
            return self._taken[key]
        previous = self._last.get(key)
        if previous is not None and previous in self._free:
            self._free.remove(previous)
            address = previous
        elif self._free:
            address = self._free.pop(0)
        else:
            raise SandboxRunError("the sandbox ran out of addresses for pods and services")
        self._taken[key] = address
        self._last[key] = address
        return address

    def address_of(self, key: str) -> str | None:
        return self._taken.get(key)

    def give_back(self, address: str) -> None:
        for key, taken in list(self._taken.items()):
            if taken == address:
                del self._taken[key]
                self._free.append(address)

    def release_key(self, key: str) -> None:
        address = self._taken.pop(key, None)
        if address is not None:
            self._free.append(address)


async def _ip(argv: list[str], quiet: bool = False) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    if process.returncode != 0 and not quiet:
        raise SandboxRunError(f"`{' '.join(argv)}` failed: {stderr.decode().strip()}")


Network = LoopbackNetwork | EmulatedNetwork


# --------------------------------------------------------------------------- name resolution


@dataclass
class Resolver:
    """Cluster DNS names → addresses, from the runner's and the proxy's state."""

    cache: ClusterCache
    proxy: ServiceProxy
    addresses: Mapping[str, str]
    """Pod uid → the address the runner gave it."""
    cluster_domain: str = "cluster.local"

    @property
    def pattern(self) -> re.Pattern[str]:
        domain = re.escape(self.cluster_domain)
        return re.compile(
            rf"(?<![A-Za-z0-9.-])((?:[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.)+svc(?:\.{domain})?)"
            rf"\.?(?![A-Za-z0-9.-])"
        )

    def resolve(self, name: str) -> str:
        """The address of ``name``; raises :class:`NotYet` while it has none."""
        labels = name.rstrip(".").split(".")
        cut = labels.index("svc")
        labels = labels[:cut]
        if len(labels) == 2:
            return self._service(labels[0], labels[1], name)
        if len(labels) == 3:
            return self._pod(labels[0], labels[1], labels[2], name)
        raise NotYet("ContainerCreating", f"cannot resolve {name}: not a Service or Pod name")

    def rewrite(self, text: str) -> str:
        """Every cluster name in ``text`` replaced; :class:`NotYet` if one does not resolve."""
        return self.pattern.sub(lambda match: self.resolve(match.group(1)), text)


    def _service(self, name: str, namespace: str, full: str) -> str:
        service = self.cache.services.get(namespace, name)
        if service is None:
            raise NotYet("ContainerCreating", f"waiting for {full}: no Service {namespace}/{name}")
        if is_headless(service):
            endpoints = self._headless_endpoints(service)
            if not endpoints:
                raise NotYet("ContainerCreating", f"waiting for {full}: no endpoints yet")
            return endpoints[0]
        address = self.proxy.address_of(namespace, name)
        if address is None:
            raise NotYet("ContainerCreating", f"waiting for {full}: the Service is not served yet")
        return address

    def _headless_endpoints(self, service: Mapping[str, Any]) -> list[str]:
        spec = service.get("spec") or {}
        unready = bool(spec.get("publishNotReadyAddresses"))
        namespace = meta(service).get("namespace")
        found = []
        for pod in self.cache.pods.values():
            if meta(pod).get("namespace") != namespace or terminating(pod):
                continue
            if not selector_matches(spec.get("selector"), meta(pod).get("labels") or {}):
                continue
            address = self.addresses.get(str(meta(pod).get("uid")))
            if address and (unready or pod_is_ready(pod)):
                found.append(address)
        return sorted(found)

    def _pod(self, hostname: str, subdomain: str, namespace: str, full: str) -> str:
        service = self.cache.services.get(namespace, subdomain)
        if service is None:
            raise NotYet("ContainerCreating",
                         f"waiting for {full}: no headless Service {namespace}/{subdomain}")
        unready = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
        for pod in self.cache.pods.values():
            spec = pod.get("spec") or {}
            if (meta(pod).get("namespace") == namespace and not terminating(pod)
                    and spec.get("hostname") == hostname and spec.get("subdomain") == subdomain):
                address = self.addresses.get(str(meta(pod).get("uid")))
                if address and (unready or pod_is_ready(pod)):
                    return address
        raise NotYet("ContainerCreating", f"waiting for {full}: no such Pod running yet")


# --------------------------------------------------------------------------- preparing a container


@dataclass(frozen=True)
class Launch:
    """How to start one container here."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass
class PodContext:
    """What preparing a Pod's containers reads."""

    pod: Mapping[str, Any]
    address: str
    host_address: str
    directory: Path
    cache: ClusterCache
    resolver: Resolver
    node: Mapping[str, Any] | None
    python: str

    @property
    def namespace(self) -> str:
        return str(meta(self.pod).get("namespace") or "default")


def _decoded(obj: Mapping[str, Any], key: str, secret: bool) -> bytes | None:
    if secret:
        if key in (obj.get("data") or {}):
            return base64.b64decode(obj["data"][key])
        value = (obj.get("stringData") or {}).get(key)
        return value.encode() if isinstance(value, str) else None
    if key in (obj.get("data") or {}):
        return str(obj["data"][key]).encode()
    if key in (obj.get("binaryData") or {}):
        return base64.b64decode(obj["binaryData"][key])
    return None


def _keys(obj: Mapping[str, Any], secret: bool) -> list[str]:
    if secret:
        return sorted({*(obj.get("data") or {}), *(obj.get("stringData") or {})})
    return sorted({*(obj.get("data") or {}), *(obj.get("binaryData") or {})})


def _source(context: PodContext, secret: bool, name: str, optional: bool,
            what: str) -> Mapping[str, Any] | None:
    informer = context.cache.secrets if secret else context.cache.configmaps
    found = informer.get(context.namespace, name)
    if found is None and not optional:
        kind = "secret" if secret else "configmap"
        raise NotYet("CreateContainerConfigError" if what == "env" else "ContainerCreating",
                      f'{kind} "{name}" not found')
    return found


def field_value(pod: Mapping[str, Any], path: str, address: str, host_address: str) -> str:
    """A downward-API ``fieldRef``: what a kubelet would give for ``path``."""
    metadata = meta(pod)
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": address,
        "status.podIPs": address,
        "status.hostIP": host_address,
        "status.hostIPs": host_address,
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    raise NotYet("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")


def resource_value(container: Mapping[str, Any], node: Mapping[str, Any] | None,
                   ref: Mapping[str, Any]) -> str:
    """A ``resourceFieldRef``: the container's limit/request, else the node's allocatable."""
    resource = str(ref.get("resource", ""))
    kind, _, what = resource.partition(".")
    resources = container.get("resources") or {}
    allocatable = ((node or {}).get("status") or {}).get("allocatable") or {}
    raw = (resources.get(kind) or {}).get(what) or allocatable.get(what)
    if what == "cpu":
        divisor = parse_cpu(ref.get("divisor", "1"), 1.0) or 1.0
        cores = parse_cpu(raw, float(os.cpu_count() or 1))
        return str(max(1, -(-int(cores * 1000) // int(divisor * 1000))))
    if what in ("memory", "ephemeral-storage"):
        divisor_bytes = parse_bytes(ref.get("divisor", "1")) or 1
        return str(-(-parse_bytes(raw or "0") // divisor_bytes))
    raise NotYet("CreateContainerConfigError", f"unsupported resourceFieldRef {resource!r}")


_UNITS: Final = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
                 "G": 10**9, "T": 10**12}


def parse_bytes(value: Any) -> int:
    text = str(value).strip()
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    try:
        return int(float(text))
    except ValueError:
        return 0


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes."""
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", substitute, text)


def container_env(context: PodContext, container: Mapping[str, Any]) -> dict[str, str]:
    """The container's own variables (``envFrom`` first, then ``env``, in order)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        for secret, ref in ((True, source.get("secretRef")), (False, source.get("configMapRef"))):
            if not ref:
                continue
            obj = _source(context, secret, ref.get("name", ""), bool(ref.get("optional")), "env")
            for key in _keys(obj or {}, secret):
                value = _decoded(obj or {}, key, secret)
                if value is not None:
                    env[prefix + key] = value.decode(errors="replace")
    for variable in container.get("env") or []:
        name = str(variable.get("name"))
        if "value" in variable:
            env[name] = expand(str(variable.get("value") or ""), env)
            continue
        value_from = variable.get("valueFrom") or {}
        value = _value_from(context, container, value_from)
        if value is not None:
            env[name] = value
    return env


def _value_from(context: PodContext, container: Mapping[str, Any],
                value_from: Mapping[str, Any]) -> str | None:
    if "fieldRef" in value_from:
        return field_value(context.pod, str(value_from["fieldRef"].get("fieldPath")),
                           context.address, context.host_address)
    if "resourceFieldRef" in value_from:
        return resource_value(container, context.node, value_from["resourceFieldRef"])
    for secret, ref_key in ((True, "secretKeyRef"), (False, "configMapKeyRef")):
        ref = value_from.get(ref_key)
        if not ref:
            continue
        optional = bool(ref.get("optional"))
        obj = _source(context, secret, str(ref.get("name", "")), optional, "env")
        value = _decoded(obj or {}, str(ref.get("key")), secret) if obj else None
        if value is None:
            if optional:
                return None
            kind = "secret" if secret else "configmap"
            raise NotYet("CreateContainerConfigError",
                         f"couldn't find key {ref.get('key')} in {kind} {ref.get('name')}")
        return value.decode(errors="replace")
    raise NotYet("CreateContainerConfigError", f"unsupported valueFrom {sorted(value_from)}")


def volume_files(context: PodContext, volume: Mapping[str, Any]) -> dict[str, tuple[bytes, int]]:
    """The files a secret/configMap/downwardAPI volume holds: relative path → (bytes, mode)."""
    for secret, kind in ((True, "secret"), (False, "configMap")):
        source = volume.get(kind)
        if source is None:
            continue
        name = source.get("secretName" if secret else "name", "")
        obj = _source(context, secret, str(name), bool(source.get("optional")), "volume")
        mode = int(source.get("defaultMode", 0o644))
        files: dict[str, tuple[bytes, int]] = {}
        if obj is None:
            return files
        items = source.get("items") or [{"key": k, "path": k} for k in _keys(obj, secret)]
        for item in items:
            value = _decoded(obj, str(item.get("key")), secret)
            if value is None:
                if source.get("optional"):
                    continue
                raise NotYet("ContainerCreating",
                             f"{kind} {name} has no key {item.get('key')!r}")
            if not secret and str(item.get("key")) in (obj.get("data") or {}):
                value = context.resolver.rewrite(value.decode()).encode()
            files[str(item.get("path"))] = (value, int(item.get("mode", mode)))
        return files
    if "downwardAPI" in volume:
        source = volume["downwardAPI"]
        mode = int(source.get("defaultMode", 0o644))
        files = {}
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = field_value(context.pod, str(item["fieldRef"].get("fieldPath")),
                                    context.address, context.host_address)
            else:
                value = resource_value({}, context.node, item.get("resourceFieldRef") or {})
            files[str(item.get("path"))] = (value.encode(), int(item.get("mode", mode)))
        return files
    return {}


def write_volume(directory: Path, files: Mapping[str, tuple[bytes, int]]) -> bool:
    """Bring ``directory`` to exactly ``files`` (atomically per file); whether it changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    wanted = {directory / path for path in files}
    for path, (data, mode) in files.items():
        target = directory / path
        if target.is_file() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f".{target.name}.tmp")
        scratch.write_bytes(data)
        scratch.chmod(mode & 0o777)
        scratch.replace(target)
        changed = True
    for existing in list(directory.rglob("*")):
        if existing.is_file() and existing not in wanted:
            existing.unlink()
            changed = True
    return changed


def mount_table(context: PodContext, container: Mapping[str, Any]) -> list[tuple[str, Path]]:
    """(mountPath, local directory) for the container's mounts, longest path first."""
    volumes = {v.get("name"): v for v in (context.pod.get("spec") or {}).get("volumes") or []}
    table = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name"))
        if volume is None:
            raise NotYet("CreateContainerConfigError",
                         f"volumeMount {mount.get('name')!r} names no volume of the pod")
        if "hostPath" in volume:
            local = Path(str(volume["hostPath"].get("path")))
        else:
            local = context.directory / "volumes" / str(mount.get("name"))
        sub = str(mount.get("subPath") or "")
        mount_path = str(mount.get("mountPath")).rstrip("/") or "/"
        table.append((mount_path, local / sub if sub else local))
    return sorted(table, key=lambda entry: len(entry[0]), reverse=True)


def rewrite_path(text: str, mounts: Sequence[tuple[str, Path]]) -> str:
    head, sep, tail = text.partition("=")
    if sep and tail.startswith("/"):
        return f"{head}={rewrite_path(tail, mounts)}"
    for mount_path, local in mounts:
        if text == mount_path or text.startswith(mount_path + "/"):
            return str(local) + text[len(mount_path):]
    return text


def rewrite_listen(text: str, address: str) -> str:
    """``0.0.0.0:P``, ``[::]:P``, ``:P`` (also after ``--opt=``) → ``<address>:P``."""
    head, sep, tail = text.partition("=")
    if sep and WILDCARD_LISTEN.fullmatch(tail):
        return f"{head}={rewrite_listen(tail, address)}"
    match = WILDCARD_LISTEN.fullmatch(text)
    return f"{address}:{match.group('port')}" if match else text


def localize(text: str, context: PodContext, mounts: Sequence[tuple[str, Path]]) -> str:
    """One argument or variable as this machine needs it: names, listen address, paths."""
    return rewrite_path(rewrite_listen(context.resolver.rewrite(text), context.address), mounts)


def command_of(context: PodContext, container: Mapping[str, Any]) -> list[str]:
    command = [str(part) for part in container.get("command") or []]
    if not command:
        return [context.python, "-m", "edgeweave"]
    if Path(command[0]).name == "edgeweave":
        return [context.python, "-m", "edgeweave", *command[1:]]
    raise NotYet("CreateContainerError",
                 f"the sandbox runs only edgeweave commands, not {command[0]!r} "
                 f"(image {container.get('image')})")


def prepare(context: PodContext, container: Mapping[str, Any]) -> Launch:
    """Everything needed to start ``container`` now, or :class:`NotYet` saying why not."""
    if (context.pod.get("spec") or {}).get("initContainers"):
        raise NotYet("CreateContainerConfigError", "the sandbox does not run initContainers")
    mounts = mount_table(context, container)
    own = container_env(context, container)
    env = {key: os.environ[key] for key in HOST_ENV if key in os.environ}
    home = context.directory / "home"
    home.mkdir(parents=True, exist_ok=True)
    spec = context.pod.get("spec") or {}
    env.update({
        "HOME": str(home),
        "HOSTNAME": str(spec.get("hostname") or meta(context.pod).get("name")),
        "TMPDIR": str(dict(mounts).get("/tmp", home)),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.update({key: localize(value, context, mounts) for key, value in own.items()})
    argv = command_of(context, container)
    args = [expand(str(arg), own) for arg in container.get("args") or []]
    argv = argv[:3] + [localize(expand(a, own), context, mounts) for a in argv[3:]] + [
        localize(arg, context, mounts) for arg in args]
    workdir = container.get("workingDir")
    cwd = rewrite_path(str(workdir), mounts) if workdir else str(home)
    Path(cwd).mkdir(parents=True, exist_ok=True)
    return Launch(argv=argv, env=env, cwd=cwd)


def materialize_volumes(context: PodContext, *, refresh: bool = False) -> bool:
    """Write every volume of the pod; whether any secret/configMap file changed.

    On a ``refresh`` of a running pod, a volume whose new content cannot be made yet
    (a name in it does not resolve, its ConfigMap is gone) keeps its old content: a
    process that re-reads the file should see the last consistent version, not half
    of the next one.
    """
    changed = False
    for volume in (context.pod.get("spec") or {}).get("volumes") or []:
        name = str(volume.get("name"))
        directory = context.directory / "volumes" / name
        if "emptyDir" in volume:
            directory.mkdir(parents=True, exist_ok=True)
        elif "hostPath" in volume:
            continue
        elif any(k in volume for k in ("secret", "configMap", "downwardAPI")):
            try:
                files = volume_files(context, volume)
            except NotYet:
                if refresh:
                    continue
                raise
            changed |= write_volume(directory, files)
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise NotYet("ContainerCreating", f"the sandbox cannot mount volume {name} "
                                              f"of type {', '.join(kinds)}")
    return changed


# --------------------------------------------------------------------------- processes


def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: str, log_path: Path,
          node: EmulatedNode | None) -> subprocess.Popen[bytes]:
    """Start a container's process in a session of its own that dies with the sandbox.

    The child gets :data:`~edgeweave.local.parent.PARENT_PID_ENV`: ``edgeweave`` asks
    the kernel for SIGKILL when this process goes, after exec (see
    :mod:`edgeweave.local.parent`), so even a sandbox killed with SIGKILL leaves none.
    """
    command = node.command(argv) if node is not None else list(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env={**env, PARENT_PID_ENV: str(os.getpid())}, cwd=cwd, start_new_session=True,
        )


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    """One readiness or liveness probe of a running container."""

    spec: Mapping[str, Any]
    pod: Mapping[str, Any]
    address: str
    started_at: float
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0
    running: bool = False
    last_error: str = ""

    def __post_init__(self) -> None:
        self.next_at = self.started_at + float(self.spec.get("initialDelaySeconds", 0))

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    def due(self, now: float) -> bool:
        return not self.running and now >= self.next_at

    async def run_once(self, env: Mapping[str, str], node: EmulatedNode | None) -> bool:
        self.running = True
        try:
            ok = await self._check(env, node)
        finally:
            self.running = False
            self.next_at = time.monotonic() + self.period
        if ok:
            self.successes, self.failures, self.last_error = self.successes + 1, 0, ""
        else:
            self.successes, self.failures = 0, self.failures + 1
        return ok

    async def _check(self, env: Mapping[str, str], node: EmulatedNode | None) -> bool:
        spec = self.spec
        try:
            if "httpGet" in spec:
                return await self._http(spec["httpGet"])
            if "tcpSocket" in spec:
                port = container_port(self.pod, spec["tcpSocket"].get("port"))
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(spec["tcpSocket"].get("host") or self.address, port),
                    self.timeout)
                writer.close()
                return True
            if "exec" in spec:
                return await self._exec(list(spec["exec"].get("command") or []), env, node)
        except (OSError, TimeoutError, aiohttp.ClientError) as error:
            self.last_error = str(error) or type(error).__name__
            return False
        self.last_error = f"unsupported probe {sorted(spec)}"
        return False

    async def _http(self, get: Mapping[str, Any]) -> bool:
        port = container_port(self.pod, get.get("port"))
        scheme = str(get.get("scheme", "HTTP")).lower()
        host = get.get("host") or self.address
        path = str(get.get("path", "/"))
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        url = f"{scheme}://{host}:{port}{path if path.startswith('/') else '/' + path}"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            url, headers=headers, ssl=False
        ) as response:
            if 200 <= response.status < 400:
                return True
            self.last_error = f"HTTP probe failed with statuscode: {response.status}"
            return False

    async def _exec(self, command: list[str], env: Mapping[str, str],
                    node: EmulatedNode | None) -> bool:
        argv = node.command(command) if node is not None else command
        process = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            return await asyncio.wait_for(process.wait(), self.timeout) == 0
        except TimeoutError:
            process.kill()
            await process.wait()
            self.last_error = "exec probe timed out"
            return False


# --------------------------------------------------------------------------- containers


@dataclass
class ContainerRun:
    """One container of a running Pod: its process, restarts and probes."""

    spec: Mapping[str, Any]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    launch: Launch | None = None
    restarts: int = 0
    ready: bool = False
    started_at: str | None = None
    started_mono: float = 0.0
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: dict[str, Any] | None = None
    last_terminated: dict[str, Any] | None = None
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    done: bool = False
    """Exited for good (restartPolicy Never/OnFailure)."""
    readiness: Probe | None = None
    liveness: Probe | None = None
    probe_tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def name(self) -> str:
        return str(self.spec.get("name"))

    def status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.process is not None and self.process.poll() is None:
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None and (self.done or self.waiting is None):
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        status: dict[str, Any] = {
            "name": self.name,
            "image": str(self.spec.get("image", "")),
            "imageID": "",
            "ready": self.ready,
            "started": "running" in state,
            "restartCount": self.restarts,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }
        if self.process is not None:
            status["containerID"] = f"sandbox://{self.process.pid}"
        return status


# --------------------------------------------------------------------------- pods


@dataclass
class NodeHost:
    """A node the sandbox runs pods on (its emulated namespace and cgroup, if any)."""

    name: str
    emulated: EmulatedNode | None = None


class PodWorker:
    """Runs one Pod on one node until stopped; reports its status to the API."""

    def __init__(self, runner: PodRunner, pod: Mapping[str, Any], host: NodeHost,
                 address: str) -> None:
        self.runner = runner
        self.pod: Mapping[str, Any] = pod
        self.host = host
        self.address = address
        metadata = meta(pod)
        self.uid = str(metadata.get("uid"))
        self.namespace = str(metadata.get("namespace") or "default")
        self.name = str(metadata.get("name"))
        self.directory = runner.run_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.containers = [
            ContainerRun(spec=c, log_path=runner.log_dir / f"{self.namespace}_{self.name}_"
                                                           f"{c.get('name')}.log")
            for c in (pod.get("spec") or {}).get("containers") or []
        ]
        self.start_time = now_rfc3339()
        self.transitions: dict[str, str] = {}
        self.reported: dict[str, Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.stopping = False
        self.volumes_ready = False
        self.volumes_checked = 0.0

    @property
    def restart_policy(self) -> str:
        return str((self.pod.get("spec") or {}).get("restartPolicy", "Always"))

    @property
    def grace_s(self) -> float:
        grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        return min(float(grace if grace is not None else 30), MAX_GRACE_S)

    def context(self) -> PodContext:
        node = self.runner.cache.nodes.get(None, self.host.name)
        return PodContext(pod=self.pod, address=self.address,
                          host_address=self.runner.network.node_address(self.host.name),
                          directory=self.directory, cache=self.runner.cache,
                          resolver=self.runner.resolver, node=node, python=self.runner.python)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod-{self.name}")

    def update(self, pod: Mapping[str, Any]) -> None:
        self.pod = pod
        self.volumes_checked = 0.0
        self.wake.set()

    # -------------------------------------------------------------- life cycle

    async def _run(self) -> None:
        try:
            await self.runner.network.configure_pod_address(self.address, self.host.name)
        except SandboxRunError as error:
            log.error("pod %s: %s", self.name, error)
        while not self.stopping:
            now = time.monotonic()
            if now - self.volumes_checked >= VOLUME_REFRESH_S or not self.volumes_ready:
                self.volumes_checked = now
                self._refresh_volumes()
            for container in self.containers:
                self._step(container, now)
            await self._report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            self.wake.clear()

    def _refresh_volumes(self) -> None:
        try:
            materialize_volumes(self.context(), refresh=self.volumes_ready)
            self.volumes_ready = True
        except NotYet as why:
            if not self.volumes_ready:
                for container in self.containers:
                    if container.process is None:
                        container.waiting = (why.reason, why.message)

    def _step(self, container: ContainerRun, now: float) -> None:
        process = container.process
        if process is not None and process.poll() is not None:
            self._exited(container, process.returncode, now)
        if container.process is None and not container.done:
            if container.restart_at is None or now >= container.restart_at:
                self._try_start(container, now)
            return
        if container.process is not None:
            self._probe(container, now)

    def _try_start(self, container: ContainerRun, now: float) -> None:
        if not self.volumes_ready:
            return
        try:
            launch = prepare(self.context(), container.spec)
        except NotYet as why:
            container.waiting = (why.reason, why.message)
            return
        try:
            container.process = spawn(launch.argv, launch.env, launch.cwd, container.log_path,
                                      self.host.emulated)
        except Exception as error:  # OSError, EmulationError: the reason goes to the status
            container.waiting = ("CreateContainerError", str(error))
            container.restart_at = now + container.backoff_s
            return
        log.info("pod %s: started container %s (pid %d)", self.name, container.name,
                 container.process.pid)
        container.launch = launch
        container.started_at = now_rfc3339()
        container.started_mono = now
        container.waiting = None
        container.terminated = None
        container.restart_at = None
        container.ready = False
        spec = container.spec
        container.readiness = (Probe(spec["readinessProbe"], self.pod, self.address, now)
                               if spec.get("readinessProbe") else None)
        container.liveness = (Probe(spec["livenessProbe"], self.pod, self.address, now)
                              if spec.get("livenessProbe") else None)
        if container.readiness is None:
            container.ready = True

    def _exited(self, container: ContainerRun, code: int, now: float) -> None:
        finished = now_rfc3339()
        reason = "Completed" if code == 0 else ("Error" if code > 0 else "Killed")
        container.terminated = {
            "exitCode": code if code >= 0 else 128 - code, "reason": reason,
            "startedAt": container.started_at, "finishedAt": finished,
            **({"signal": -code} if code < 0 else {}),
        }
        log.info("pod %s: container %s exited with %d", self.name, container.name, code)
        container.process = None
        container.ready = False
        for task in container.probe_tasks:
            task.cancel()
        restart = self.restart_policy == "Always" or (
            self.restart_policy == "OnFailure" and code != 0)
        if not restart:
            container.done = True
            return
        container.last_terminated = container.terminated
        if now - container.started_mono >= BACKOFF_RESET_AFTER_S:
            container.backoff_s = BACKOFF_START_S
        container.restarts += 1
        container.restart_at = now + container.backoff_s
        container.waiting = ("CrashLoopBackOff",
                             f"back-off {container.backoff_s:g}s restarting failed container="
                             f"{container.name} pod={self.name}")
        container.backoff_s = min(container.backoff_s * 2, BACKOFF_MAX_S)

    def _probe(self, container: ContainerRun, now: float) -> None:
        env = container.launch.env if container.launch else {}
        for probe, readiness in ((container.readiness, True), (container.liveness, False)):
            if probe is None or not probe.due(now):
                continue
            task = asyncio.create_task(self._run_probe(container, probe, readiness, env))
            container.probe_tasks.add(task)
            task.add_done_callback(container.probe_tasks.discard)

    async def _run_probe(self, container: ContainerRun, probe: Probe, readiness: bool,
                         env: Mapping[str, str]) -> None:
        process = container.process
        await probe.run_once(env, self.host.emulated)
        if container.process is not process or process is None:
            return
        threshold_ok = int(probe.spec.get("successThreshold", 1))
        threshold_bad = int(probe.spec.get("failureThreshold", 3))
        if readiness:
            if probe.successes >= threshold_ok:
                container.ready = True
            elif probe.failures >= threshold_bad:
                container.ready = False
        elif probe.failures >= threshold_bad:
            log.info("pod %s: liveness probe of %s failed (%s); restarting it", self.name,
                     container.name, probe.last_error)
            signal_group(process, signal.SIGKILL)
        self.wake.set()

    # -------------------------------------------------------------- status

    def phase(self) -> str:
        containers = self.containers
        if all(c.done for c in containers):
            failed = any((c.terminated or {}).get("exitCode", 0) != 0 for c in containers)
            return "Failed" if failed else "Succeeded"
        if any(c.process is not None or c.restarts or c.done for c in containers):
            return "Running"
        return "Pending"

    def status(self) -> dict[str, Any]:
        phase = self.phase()
        ready = phase == "Running" and all(c.ready for c in self.containers)
        started = any(c.started_at for c in self.containers)
        conditions = [
            self._condition("PodScheduled", True),
            self._condition("Initialized", True),
            self._condition("ContainersReady", ready),
            self._condition("Ready", ready),
        ]
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.runner.network.node_address(self.host.name),
            "hostIPs": [{"ip": self.runner.network.node_address(self.host.name)}],
            "podIP": self.address,
            "podIPs": [{"ip": self.address}],
            "startTime": self.start_time,
            "qosClass": "BestEffort",
            "containerStatuses": [c.status() for c in self.containers],
        }
        if not started:
            status.pop("podIP")
            status.pop("podIPs")
        return status

    def _condition(self, kind: str, true: bool) -> dict[str, Any]:
        value = "True" if true else "False"
        key = f"{kind}={value}"
        stamp = self.transitions.setdefault(key, now_rfc3339())
        self.transitions.pop(f"{kind}={'False' if true else 'True'}", None)
        return {"type": kind, "status": value, "lastTransitionTime": stamp}

    async def _report(self) -> None:
        status = self.status()
        if status == self.reported:
            return
        try:
            result = await self.runner.api.patch(PODS, self.namespace, self.name,
                                                 {"status": status}, sub="status")
        except KubeApiError as error:
            if error.status == 404:
                self.stopping = True
                return
            log.debug("pod %s: status not written: %s", self.name, error)
            return
        if meta(result).get("uid") != self.uid:
            return
        self.reported = status
        self.runner.cache.pods.remember(result)

    # -------------------------------------------------------------- stopping

    async def stop(self, *, kill: bool = False) -> None:
        """Stop every container: SIGTERM and the grace period, or SIGKILL (node lost)."""
        self.stopping = True
        self.wake.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        processes = [c.process for c in self.containers if c.process is not None]
        for process in processes:
            signal_group(process, signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + (0.0 if kill else self.grace_s)
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for process in processes:
            signal_group(process, signal.SIGKILL)
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(process.wait, 5.0)
        for container in self.containers:
            for task in container.probe_tasks:
                task.cancel()
            container.process = None
        await self.runner.network.release_pod_address(self.address, self.host.name)
        shutil.rmtree(self.directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [c.process.pid for c in self.containers
                if c.process is not None and c.process.poll() is None]


class PodRunner:
    """The kubelet of every node the sandbox runs (see the module docstring)."""

    def __init__(self, api: KubeApi, cache: ClusterCache, network: Network,
                 hosts: Mapping[str, NodeHost], proxy: ServiceProxy, *, run_dir: Path,
                 cluster_domain: str = "cluster.local", python: str | None = None) -> None:
        self.api = api
        self.cache = cache
        self.network = network
        self.hosts = dict(hosts)
        self.run_dir = run_dir
        self.log_dir = run_dir / "logs"
        self.python = python or sys.executable
        self.workers: dict[str, PodWorker] = {}
        self.addresses: dict[str, str] = {}
        self.resolver = Resolver(cache, proxy, self.addresses, cluster_domain)
        self.down: set[str] = set()
        """Nodes whose processes were killed (deleted or NotReady)."""
        self.closing = False
        self._stopping: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        self.ready = asyncio.Event()
        for informer in cache.informers:
            informer.subscribe(self.wake)

    def has_kubelet(self, node: str) -> bool:
        return node in self.hosts

    def pod_address(self, pod: Mapping[str, Any]) -> str | None:
        """The address of a pod this runner runs (for the Service relay)."""
        return self.addresses.get(str(meta(pod).get("uid")))

    def pids(self) -> list[int]:
        return [pid for worker in self.workers.values() for pid in worker.pids()]

    async def run(self) -> None:
        await self.cache.wait_synced()
        self.ready.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)
            self.wake.clear()
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pod runner pass failed; retrying")

    async def reconcile(self) -> None:
        if self.closing:
            return
        await self._follow_nodes()
        live: dict[str, Mapping[str, Any]] = {}
        for pod in self.cache.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node in self.hosts and node not in self.down and not terminating(pod):
                live[str(meta(pod).get("uid"))] = pod
        for uid in [u for u in self.workers if u not in live]:
            # In the background: a process's grace period must not hold up new pods.
            task = asyncio.create_task(self._stop(uid))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        for uid, pod in live.items():
            worker = self.workers.get(uid)
            if worker is not None:
                if worker.pod is not pod:
                    worker.update(pod)
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue  # finished before (or evicted): a kubelet does not run it again
            self._start(pod)

    async def _follow_nodes(self) -> None:
        for name in self.hosts:
            node = self.cache.nodes.get(None, name)
            lost = node is None or not node_ready(node)
            if lost and name not in self.down:
                self.down.add(name)
                await self._kill_node(name, "deleted" if node is None else "NotReady")
            elif not lost and name in self.down:
                self.down.discard(name)
                log.info("node %s is Ready again: its pods run again", name)

    async def _kill_node(self, name: str, why: str) -> None:
        victims = [uid for uid, worker in self.workers.items() if worker.host.name == name]
        log.info("node %s is %s: killing its %d pods' processes", name, why, len(victims))
        await asyncio.gather(*(self._stop(uid, kill=True) for uid in victims))
        emulated = self.hosts[name].emulated
        if emulated is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(emulated.kill_all, 0.0)

    def _start(self, pod: Mapping[str, Any]) -> None:
        metadata = meta(pod)
        node = str((pod.get("spec") or {}).get("nodeName"))
        uid = str(metadata.get("uid"))
        sticky = f"{metadata.get('namespace')}/{metadata.get('name')}@{node}"
        try:
            address = self.network.reserve_pod_address(sticky, node)
        except SandboxRunError as error:
            log.error("pod %s: %s", metadata.get("name"), error)
            return
        self.addresses[uid] = address
        worker = PodWorker(self, pod, self.hosts[node], address)
        self.workers[uid] = worker
        worker.start()
        log.info("pod %s/%s on %s at %s", metadata.get("namespace"), metadata.get("name"),
                 node, address)

    async def _stop(self, uid: str, *, kill: bool = False) -> None:
        worker = self.workers.pop(uid, None)
        if worker is None:
            return
        self.addresses.pop(uid, None)
        await worker.stop(kill=kill)
        log.info("pod %s stopped%s", worker.name, " (killed with its node)" if kill else "")

    async def shutdown(self) -> None:
        """Stop every pod (SIGTERM, grace, SIGKILL), as when a machine shuts down."""
        self.closing = True
        await asyncio.gather(*(self._stop(uid) for uid in list(self.workers)),
                             *list(self._stopping))
