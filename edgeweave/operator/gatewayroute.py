"""Telling running gateway pods where stage 0 moved (see :mod:`edgeweave.worker.routing`).

The ConfigMap the gateway mounts is the durable record, but kubelet may take a minute
to refresh it; after a node loss that minute would be an outage. So the operator also
``PUT``\\ s the route to each gateway pod and counts the switch as done only once every
pod answered with the new revision. Old stage pods are kept until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from edgeweave.operator import settings as s
from edgeweave.worker.routing import STAGE0_PATH, RouteError, Stage0Route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PushOutcome:
    """Which gateway pods follow the route now, and why the others do not (yet)."""

    confirmed: tuple[str, ...]
    unreached: Mapping[str, str]

    @property
    def complete(self) -> bool:
        return not self.unreached


def gateway_pod_url(pod: Mapping[str, Any]) -> str | None:
    """The pod's own address (not the Service's: each pod must be told), if it has one."""
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{s.GATEWAY_CONTAINER_PORT}"


async def push_route(pods: Sequence[Mapping[str, Any]], route: Stage0Route, token: str,
                     timeout_s: float = s.ROUTE_PUSH_TIMEOUT_S) -> PushOutcome:
    """PUT ``route`` to every addressed gateway pod, at once.

    A pod with no address yet has not started its container: it will read the
    (already rewritten) ConfigMap when it does, so it needs no push.
    """
    targets = {pod["metadata"]["name"]: url for pod in pods
               if (url := gateway_pod_url(pod)) is not None}
    if not targets:
        return PushOutcome(confirmed=(), unreached={})
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        answers = await asyncio.gather(
            *(_push_one(session, url, route, token, timeout_s) for url in targets.values())
        )
    confirmed = tuple(name for name, why in zip(targets, answers, strict=True) if why is None)
    unreached = {name: why for name, why in zip(targets, answers, strict=True) if why}
    return PushOutcome(confirmed=confirmed, unreached=unreached)


async def _push_one(session: aiohttp.ClientSession, base_url: str, route: Stage0Route,
                    token: str, timeout_s: float) -> str | None:
    """None when the gateway now follows ``route``; else why not, in words."""
    try:
        async with session.put(base_url + STAGE0_PATH, data=route.to_json(),
                               headers={"Authorization": f"Bearer {token}",
                                        "Content-Type": "application/json"}) as response:
            text = await response.text()
            if response.status != 200:
                return f"HTTP {response.status}: {text[:200]}"
    except TimeoutError:
        return f"TimeoutError: no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        now = Stage0Route.from_json(text, f"the answer of {base_url}")
    except RouteError as exc:
        return str(exc)
    if now.revision != route.revision:
        return f"it follows revision {now.revision!r} (serial {now.serial}), newer than ours"
    return None
