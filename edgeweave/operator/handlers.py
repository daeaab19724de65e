"""The kopf handlers of the operator: what triggers a reconcile, and nothing else.

The reconcile itself lives in :mod:`edgeweave.operator.reconcile`; every trigger calls it:

* ``create`` / ``update`` (spec only) / ``resume`` handlers, for spec changes and
  operator restarts; they turn a bad spec into a kopf ``PermanentError`` (after the
  condition says why) and a passing failure into a ``TemporaryError``;
* a per-pipeline daemon that sleeps until a node or pod event wakes it, or until a
  cooldown or resync timer runs out, for node churn and rollouts;
* node events (kopf index plus an event handler), which record changes for the churn
  policy's hysteresis and wake the daemons.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from edgeweave.api.v1alpha1 import GROUP, PLURAL, VERSION
from edgeweave.modelstore import ModelStore
from edgeweave.operator import resources as r
from edgeweave.operator import settings as s
from edgeweave.operator.inventory import NodeRecord
from edgeweave.operator.kubeconfig import client_configuration, connection_info, new_api_client
from edgeweave.operator.reconcile import NodeIndex, Outcome, Runtime, soonest
from edgeweave.operator.shardserver import ShardGrants, ShardServer
from edgeweave.operator.status import Reason

log = logging.getLogger(__name__)

registry = kopf.OperatorRegistry()
"""The operator's handlers; passed to ``kopf.operator(registry=...)``."""

PIPELINE = (GROUP, VERSION, PLURAL)


def _runtime(memo: Any) -> Runtime:
    return memo["runtime"]


async def _sleep(wake: asyncio.Event, stopped: Any, timeout: float) -> None:
    """Until ``wake`` is set, the daemon is stopped, or ``timeout`` passes."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(timeout, 0.05),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    wake.clear()


# --------------------------------------------------------------------------- kopf wiring


@kopf.on.startup(id="edgeweave-startup", registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Apply the settings, connect to the API, and start the shard server."""
    s.configure_kopf(settings)
    config: s.OperatorConfig = memo.get("config") or s.OperatorConfig.from_env()
    api_client = memo.get("api_client") or new_api_client()
    store = ModelStore(config.cache_dir, download_timeout_s=config.download_timeout_s)
    grants = ShardGrants()
    server = ShardServer(grants, store.shard_path, config.shard_listen_host, config.shard_port)
    await server.start()
    memo["runtime"] = Runtime(config=config, kube=r.Kube(api_client), store=store,
                              grants=grants, server=server)


@kopf.on.login(id="edgeweave-login", registry=registry)
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """The service account in a pod, else ``KUBECONFIG``: the same as the client uses."""
    api_client = memo.get("api_client")
    configuration = api_client.configuration if api_client is not None else (
        client_configuration())
    return connection_info(configuration)


@kopf.on.cleanup(id="edgeweave-cleanup", registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get("runtime")
    if runtime is not None:
        await runtime.server.stop()


@kopf.index("v1", "nodes", id="nodes", registry=registry)
def node_index(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeRecord]:
    """The planner's view of every Node, current as of the last watch event."""
    return {name: NodeRecord.from_object(body)}


@kopf.on.event("v1", "nodes", id="node-churn", registry=registry)
async def node_event(type: str | None, name: str, body: kopf.Body, memo: kopf.Memo,
               **_: Any) -> None:
    """Record what changed on a node and wake the pipelines to judge it.

    Async on purpose, as are the other event handlers: kopf runs sync handlers in
    threads, and the history and wake-up events belong to the operator's loop.
    """
    runtime = _runtime(memo)
    record = None if type == "DELETED" else NodeRecord.from_object(body)
    change = runtime.history.observe(name, record, initial=type is None)
    if change is not None:
        log.info("node %s %s", name, change.value)
        runtime.wake_all()


@kopf.on.event("v1", "pods", id="stage-pods", registry=registry,
               labels={s.LABEL_MANAGED_BY: s.MANAGED_BY, s.LABEL_PIPELINE: kopf.PRESENT})
async def pod_event(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    """A stage pod changed (Ready, failed, gone): its pipeline re-checks its rollout."""
    _runtime(memo).wake(f"{namespace}/{labels[s.LABEL_PIPELINE]}")


@kopf.on.event("apps", "v1", "deployments", id="gateways", registry=registry,
               labels={s.LABEL_MANAGED_BY: s.MANAGED_BY, s.LABEL_PIPELINE: kopf.PRESENT})
async def gateway_event(
    namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any
) -> None:
    """The gateway rolled out (or not): its pipeline may now retire the old plan."""
    _runtime(memo).wake(f"{namespace}/{labels[s.LABEL_PIPELINE]}")


@kopf.on.create(*PIPELINE, id="plan-on-create", registry=registry)
@kopf.on.update(*PIPELINE, id="plan-on-update", field="spec", registry=registry)
async def reconcile_handler(
    name: str, namespace: str, memo: kopf.Memo, nodes: kopf.Index[str, NodeRecord], **_: Any
) -> None:
    """Plan and deploy the spec; bad input ends the handler after the condition says why."""
    await _reconcile_from_handler(_runtime(memo), namespace, name, nodes)


@kopf.on.resume(*PIPELINE, id="plan-on-resume", registry=registry)
async def resume_handler(
    name: str, namespace: str, memo: kopf.Memo, nodes: kopf.Index[str, NodeRecord],
    body: kopf.Body, **_: Any,
) -> None:
    """After an operator restart: converge on what runs, creating only what is missing."""
    outcome = await _reconcile_from_handler(_runtime(memo), namespace, name, nodes)
    counts = ", ".join(f"{count} {what}" for what, count in sorted(outcome.applied.items()))
    kopf.info(body, reason="Resumed",
              message=f"operator resumed the pipeline: {counts or 'no objects'}")


async def _reconcile_from_handler(
    runtime: Runtime, namespace: str, name: str, nodes: NodeIndex
) -> Outcome:
    try:
        outcome = await runtime.reconcile(namespace, name, nodes)
    except r.KubeError as error:
        raise kopf.TemporaryError(f"Kubernetes API: {error}", delay=5) from None
    runtime.wake(f"{namespace}/{name}")
    failure = outcome.failure
    if failure is None:
        return outcome
    if failure.permanent:
        raise kopf.PermanentError(f"{failure.reason}: {failure.message}")
    if failure.reason == Reason.ModelUnreachable:
        raise kopf.TemporaryError(f"{failure.reason}: {failure.message}",
                                  delay=s.TEMPORARY_RETRY_DELAY_S)
    # No nodes or an infeasible plan: the watcher re-plans when the nodes change.
    return outcome


@kopf.daemon(*PIPELINE, id="watch", registry=registry,
             cancellation_backoff=s.DAEMON_CANCELLATION_BACKOFF_S,
             cancellation_timeout=s.DAEMON_CANCELLATION_TIMEOUT_S)
async def watch_pipeline(
    name: str, namespace: str, memo: kopf.Memo, nodes: kopf.Index[str, NodeRecord],
    stopped: kopf.DaemonStopped, logger: logging.Logger, **_: Any,
) -> None:
    """Re-reconcile when nodes or pods change, a cooldown ends, or the resync timer fires."""
    runtime = _runtime(memo)
    key = f"{namespace}/{name}"
    wake = runtime.wakeups.setdefault(key, asyncio.Event())
    while not stopped:
        try:
            outcome = await runtime.reconcile(namespace, name, nodes)
            delay = soonest(outcome.next_check_s, runtime.config.resync_interval_s)
        except r.KubeError as error:
            logger.warning("reconcile of %s failed, retrying: %s", key, error)
            delay = 5.0
        await _sleep(wake, stopped, delay or runtime.config.resync_interval_s)


@kopf.on.delete(*PIPELINE, id="cleanup", registry=registry)
async def delete_handler(name: str, namespace: str, uid: str, memo: kopf.Memo,
                         body: kopf.Body, **_: Any) -> None:
    """Remove the pipeline's objects at once and stop serving its shards."""
    removed = await _runtime(memo).cleanup(namespace, name, uid)
    kopf.info(body, reason="Deleted", message=f"removed {removed} objects")

