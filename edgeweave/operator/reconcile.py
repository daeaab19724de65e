"""The reconcile every operator trigger shares.

One function, :meth:`Runtime.reconcile`, takes a pipeline from whatever state it is in
one step closer to its spec: resolve the model, plan (or keep the running plan, by the
churn policy), store and grant the shards, create or patch every object, advance the
rollout (make-before-break where the nodes have room; the gateway is told where stage 0
moved and the old plan retires once every gateway pod follows), and write a status built
from what it observed. It is idempotent, so every trigger (see
:mod:`edgeweave.operator.handlers`) simply calls it again.

Blocking work (model builds, planning, splitting, API calls through the synchronous
client) runs in threads, so one pipeline's slow model never stalls another's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import kopf

from edgeweave.api.crd import InvalidPipelineError, parse_spec
from edgeweave.api.v1alpha1 import (
    ConditionType,
    InferencePipelineSpec,
    InferencePipelineStatus,
    PlanStatus,
    RolloutStrategy,
    plan_hash,
    utc_now,
)
from edgeweave.errors import EdgeweaveError
from edgeweave.modelstore import (
    ChecksumMismatchError,
    ModelInputError,
    ModelNotFoundError,
    ModelStore,
    ModelUnreachableError,
    StoredModel,
    StoredShard,
    model_metadata,
    plan_pipeline,
)
from edgeweave.operator import resources as r
from edgeweave.operator import settings as s
from edgeweave.operator.churn import (
    Action,
    Decision,
    NodeHistory,
    RunningPlan,
    candidate_nodes,
    decide,
    reprice,
)
from edgeweave.operator.gatewayroute import push_route
from edgeweave.operator.inventory import (
    NoMatchingNodesError,
    PipelineNodes,
    nodes_for_pipeline,
    records_of,
    require_nodes,
)
from edgeweave.operator.shardserver import ShardGrants, ShardServer
from edgeweave.operator.status import Observed, PlanFailure, Reason, compose, status_patch
from edgeweave.partition.costmodel import CostModelError, Node, Plan
from edgeweave.partition.graph import ModelError
from edgeweave.partition.planner import InfeasiblePlanError
from edgeweave.partition.source import ProfiledModel
from edgeweave.worker.routing import Stage0Route

log = logging.getLogger(__name__)

PLAN_CACHE_SIZE = 64

T = TypeVar("T")
NodeIndex = Mapping[str, Any]


# --------------------------------------------------------------------------- outcome


@dataclass(frozen=True)
class Outcome:
    """What one reconcile achieved, for the handler that asked (and the daemon's timer)."""

    failure: PlanFailure | None = None
    next_check_s: float | None = None
    applied: Mapping[str, int] = field(default_factory=dict)
    """How many objects this pass created, patched, replaced or left unchanged."""


@dataclass(frozen=True)
class Prepared:
    """A pipeline's model, ready to plan: the file, its profile, its protocol metadata."""

    model: StoredModel
    profiled: ProfiledModel


@dataclass(frozen=True)
class Chosen:
    """The plan to run and how it was chosen."""

    plan: Plan
    status: PlanStatus
    decision: Decision
    candidate_hash: str
    nodes: Mapping[str, Node]
    next_check_s: float | None


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """The operator's process-wide state; lives in kopf's ``memo`` for one operator run."""

    config: s.OperatorConfig
    kube: r.Kube
    store: ModelStore
    grants: ShardGrants
    server: ShardServer
    history: NodeHistory = field(default_factory=NodeHistory)
    wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    """Per pipeline: the node failure that forced its current plan, until it is Ready."""
    plans: OrderedDict[tuple[Any, ...], Plan] = field(default_factory=OrderedDict)
    judged: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Per pipeline: the last candidate plan passed over, and why (announced once)."""
    route_pushes: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Per pipeline: the stage-0 revision some gateway pod has not confirmed, since when."""

    # ------------------------------------------------------------------ plumbing

    def wake(self, key: str) -> None:
        self.wakeups.setdefault(key, asyncio.Event()).set()

    def wake_all(self) -> None:
        for event in self.wakeups.values():
            event.set()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def forget(self, key: str) -> None:
        self.grants.revoke(key)
        self.wakeups.pop(key, None)
        self.locks.pop(key, None)
        self.lost.pop(key, None)
        self.judged.pop(key, None)
        self.route_pushes.pop(key, None)

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self, namespace: str, name: str, node_index: NodeIndex) -> Outcome:
        key = f"{namespace}/{name}"
        async with self.locks.setdefault(key, asyncio.Lock()):
            body = await self.call(self.kube.get, r.PIPELINES, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return Outcome()
            return await self._reconcile(key, body, node_index)

    async def _reconcile(self, key: str, body: dict[str, Any], node_index: NodeIndex) -> Outcome:
        metadata = body["metadata"]
        ref = r.PipelineRef(metadata["name"], metadata["namespace"], metadata["uid"])
        generation = int(metadata.get("generation") or 1)
        previous = _status_of(body)
        try:
            spec = parse_spec(body.get("spec") or {})
        except InvalidPipelineError as error:
            failure = PlanFailure(Reason.InvalidSpec, str(error))
            await self._write_failure(body, ref, previous, generation, failure)
            return Outcome(failure)
        try:
            prepared = await self._prepare(spec)
            records = records_of(node_index)
            available = nodes_for_pipeline(records, spec.node_selector)
            require_nodes(available, spec.node_selector, len(records))
            planned_for = await self._plan_generation(ref, previous)
            chosen = await self._choose(key, spec, prepared, available, previous, generation,
                                        planned_for)
        except r.KubeError:
            raise  # the API, not the spec: the caller retries
        except EdgeweaveError as error:
            failure = _failure_of(error)
            await self._write_failure(body, ref, previous, generation, failure)
            retry = self.config.resync_interval_s if not failure.permanent else None
            return Outcome(failure, retry)
        applied: Counter[str] = Counter()
        next_check = await self._deploy(key, body, ref, spec, prepared, chosen, previous,
                                        generation, applied)
        return Outcome(None, soonest(chosen.next_check_s, next_check), dict(applied))

    # ------------------------------------------------------------------ model and plan

    async def _prepare(self, spec: InferencePipelineSpec) -> Prepared:
        model = await self.call(self.store.resolve, spec.model.uri, spec.model.sha256)
        profiled = await self.call(
            self.store.profile, model, batch=spec.model.batch, inputs=spec.model.inputs,
            layer_costs=self.config.layer_costs,
        )
        return Prepared(model, profiled)

    async def _choose(
        self,
        key: str,
        spec: InferencePipelineSpec,
        prepared: Prepared,
        available: PipelineNodes,
        previous: InferencePipelineStatus | None,
        generation: int,
        planned_for: int | None,
    ) -> Chosen:
        profile = prepared.profiled.profile
        running, spec_changed = self._running_plan(prepared, available, previous,
                                                   generation != planned_for)
        policy = spec.replan
        next_check = self.history.seconds_until_settled(available.names, policy.cooldown_seconds)
        if running is None or spec_changed:
            candidate = await self._plan(prepared, available.nodes, spec)
        else:
            hosts = [n for stage in previous.plan.stages for n in stage.nodes]  # type: ignore[union-attr]
            nodes = candidate_nodes(available, self.history, policy.cooldown_seconds, hosts)
            try:
                candidate = await self._plan(prepared, nodes, spec)
            except InfeasiblePlanError:
                if not running.broken:
                    raise
                candidate = await self._plan(prepared, available.nodes, spec)
        decision = decide(
            running=running, candidate=candidate, policy=policy, spec_changed=spec_changed,
            seconds_since_last_plan=_seconds_since(previous),
        )
        if decision.action is Action.wait:
            next_check = soonest(next_check, decision.retry_after_s)
        if decision.adopt:
            plan, planned_at = candidate, utc_now()
            if decision.reason == "NodeLost":
                self.lost[key] = decision.message
            status = PlanStatus.from_plan(plan, profile, planned_at=planned_at)
        else:
            assert running is not None and running.plan is not None
            assert previous is not None and previous.plan is not None
            plan = running.plan
            # Re-priced on today's nodes, but still the plan the planner chose then.
            status = PlanStatus.from_plan(plan, profile, planned_at=previous.plan.planned_at)
            status = status.model_copy(update={"method": previous.plan.method})
        return Chosen(plan, status, decision, plan_hash(candidate), available.by_name(),
                      next_check)

    def _running_plan(
        self,
        prepared: Prepared,
        available: PipelineNodes,
        previous: InferencePipelineStatus | None,
        spec_changed: bool,
    ) -> tuple[RunningPlan | None, bool]:
        """The plan in force re-priced today, and whether the spec moved on since it."""
        if previous is None or previous.plan is None:
            return None, False
        if spec_changed:
            return RunningPlan(previous.plan.hash, None, "the spec changed"), True
        layout = [(st.layers[0], st.layers[1], st.nodes) for st in previous.plan.stages]
        known = {name: rec.unusable_reason or "" for name, rec in self.history.records.items()}
        reasons = {name: why for name, why in known.items() if why}
        running = reprice(previous.plan.hash, prepared.profiled.profile, layout, available,
                          reasons)
        return running, False

    async def _plan_generation(
        self, ref: r.PipelineRef, previous: InferencePipelineStatus | None
    ) -> int | None:
        """The generation the plan in force was made for, as its ConfigMap records it.

        The Planned condition cannot tell: after a failed attempt it describes the
        failure's generation, while an earlier generation's plan still runs.
        """
        if previous is None or previous.plan is None:
            return None
        configmap = await self.call(self.kube.get, r.CONFIGMAPS, ref.namespace,
                                    r.plan_configmap_name(ref.name))
        try:
            document = json.loads(((configmap or {}).get("data") or {})[s.PLAN_KEY])
            return int(document["generation"]) if document["hash"] == previous.plan.hash else None
        except (KeyError, TypeError, ValueError):
            return None

    async def _plan(
        self, prepared: Prepared, nodes: tuple[Node, ...], spec: InferencePipelineSpec
    ) -> Plan:
        if not nodes:
            raise NoMatchingNodesError("no settled node to plan on")
        cache_key = (
            prepared.model.sha256, spec.model.batch,
            tuple((i.name, tuple(i.shape)) for i in spec.model.inputs),
            tuple(sorted((node.name, node.capability, node.cpu) for node in nodes)),
            spec.objective, spec.target_period_seconds, spec.max_stages,
            spec.replicas.allow, spec.replicas.max,
        )
        cached = self.plans.get(cache_key)
        if cached is not None:
            self.plans.move_to_end(cache_key)
            return cached
        plan = await self.call(plan_pipeline, prepared.profiled, nodes, spec)
        self.plans[cache_key] = plan
        while len(self.plans) > PLAN_CACHE_SIZE:
            self.plans.popitem(last=False)
        return plan

    # ------------------------------------------------------------------ deploy

    async def _deploy(
        self,
        key: str,
        body: dict[str, Any],
        ref: r.PipelineRef,
        spec: InferencePipelineSpec,
        prepared: Prepared,
        chosen: Chosen,
        previous: InferencePipelineStatus | None,
        generation: int,
        applied: Counter[str],
    ) -> float | None:
        self._announce_judgement(key, body, chosen)
        self._announce_plan(body, chosen, previous)
        shards = await self.call(self.store.shards, prepared.model, prepared.profiled,
                                 chosen.plan)
        token = await self._ensure_token(ref)
        rollout = _rollout(ref, spec, chosen, shards, self.config)
        pods = await self.call(self.kube.list, r.PODS, ref.namespace,
                               {s.LABEL_PIPELINE: ref.name, s.LABEL_COMPONENT: s.COMPONENT_STAGE})
        pods = [pod for pod in pods if r.owned_by(pod, ref.uid)]
        self.grants.grant(key, token, _shards_to_grant(self.store, shards, pods))
        plan_document = {
            **chosen.status.model_dump(mode="json", by_alias=True, exclude_none=True),
            "revision": rollout.revision, "generation": generation,
            "shards": [shard.to_dict() for shard in shards],
        }
        metadata = model_metadata(prepared.profiled, ref.name)
        await self._apply(body, r.plan_configmap(ref, plan_document, metadata), applied)
        await self._apply(body, r.gateway_service(ref, spec, self.config.gateway_service_type),
                          applied)

        old = [pod for pod in pods if _revision(pod) != rollout.revision]
        in_place = bool(old) and not _make_before_break(spec, rollout, old, chosen.nodes)
        if in_place:
            why = ("in place: not enough capacity for both plans at once"
                   if spec.rollout.strategy is RolloutStrategy.Auto
                   else "in place, as spec.rollout asks")
            await self._retire(body, ref, rollout.revision, why)
            old = []
        for obj in r.stage_objects(rollout):
            await self._apply(body, obj, applied)

        current = await self.call(self.kube.list, r.PODS, ref.namespace,
                                  {s.LABEL_PIPELINE: ref.name, s.LABEL_REVISION: rollout.revision})
        observed = _observe(rollout, current, old)
        switched = await self._advance_gateway(body, rollout, observed, in_place, token,
                                               applied)
        if switched and old:
            await self._retire(body, ref, rollout.revision,
                               "make-before-break: the new plan serves")
            old = []
        observed = dataclasses.replace(
            observed, old_revisions=sorted({_revision(pod) or "?" for pod in old}),
            gateway_switched=switched,
        )
        if switched and not observed.pods_waiting and not observed.pods_failing:
            self.lost.pop(key, None)
        endpoint = await self._endpoint(ref, spec)
        new_status = compose(previous, generation=generation, plan=chosen.status, failure=None,
                             observed=observed, endpoint=endpoint, lost_hosts=self.lost.get(key))
        await self._write_status(body, previous, new_status)
        busy = observed.pods_waiting or observed.pods_missing or old or not switched
        return s.ROLLOUT_POLL_S if busy else None

    async def _endpoint(self, ref: r.PipelineRef, spec: InferencePipelineSpec) -> str:
        """The load balancer's address when the gateway Service has one, else its DNS name."""
        service = await self.call(self.kube.get, r.SERVICES, ref.namespace,
                                  r.gateway_name(ref.name))
        ingress = (((service or {}).get("status") or {}).get("loadBalancer") or {}).get(
            "ingress") or []
        host = next((i.get("ip") or i.get("hostname") for i in ingress
                     if i.get("ip") or i.get("hostname")), None)
        if host:
            return f"http://{host}:{spec.gateway.port}"
        return r.gateway_url(ref, spec.gateway.port, self.config)

    async def _advance_gateway(
        self,
        body: Mapping[str, Any],
        rollout: r.Rollout,
        observed: Observed,
        in_place: bool,
        token: str,
        applied: Counter[str],
    ) -> bool:
        """Point the gateway at ``rollout`` once its stage pods are all Ready (at once when
        rolling out in place or when there is no gateway yet); report whether every
        gateway pod follows it and the gateway has rolled out."""
        ref = rollout.ref
        gateway = await self.call(self.kube.get, r.DEPLOYMENTS, ref.namespace,
                                  r.gateway_name(ref.name))
        stages_ready = not (observed.pods_waiting or observed.pods_missing
                            or observed.pods_failing)
        confirmed = _stage0_revision(gateway)
        if gateway is None or in_place or stages_ready:
            route = await self._write_route(body, rollout, applied)
            if gateway is None:
                confirmed = rollout.revision  # its pods read the route file as they start
            elif confirmed != rollout.revision and await self._push_route(body, route, token):
                kopf.info(body, reason="GatewaySwitched",
                          message=f"gateway now sends to plan revision {rollout.revision}")
                confirmed = rollout.revision
            await self._apply(body, r.gateway_deployment(rollout, confirmed or ""), applied)
            gateway = await self.call(self.kube.get, r.DEPLOYMENTS, ref.namespace,
                                      r.gateway_name(ref.name))
        return confirmed == rollout.revision and r.deployment_rolled_out(gateway)

    async def _write_route(self, body: Mapping[str, Any], rollout: r.Rollout,
                           applied: Counter[str]) -> Stage0Route:
        """Rewrite the route ConfigMap, its serial one above the last route it held."""
        ref = rollout.ref
        existing = r.route_of_configmap(await self.call(
            self.kube.get, r.CONFIGMAPS, ref.namespace, r.stage0_configmap_name(ref.name)))
        serial = 0 if existing is None else existing.serial
        if existing is not None and existing.revision != rollout.revision:
            serial += 1
        route = r.stage0_route(rollout, serial)
        await self._apply(body, r.stage0_configmap(rollout, serial), applied)
        return route

    async def _push_route(self, body: Mapping[str, Any], route: Stage0Route,
                          token: str) -> bool:
        """Whether every gateway pod now follows ``route`` (or, past the grace period,
        whether kubelet can be trusted to deliver it through the ConfigMap)."""
        metadata = body["metadata"]
        key = f"{metadata['namespace']}/{metadata['name']}"
        pods = await self.call(self.kube.list, r.PODS, metadata["namespace"],
                               {s.LABEL_PIPELINE: metadata["name"],
                                s.LABEL_COMPONENT: s.COMPONENT_GATEWAY})
        outcome = await push_route(pods, route, token)
        if outcome.complete:
            self.route_pushes.pop(key, None)
            return True
        first_try = self.route_pushes.setdefault(key, (route.revision, time.monotonic()))
        if first_try[0] != route.revision:
            self.route_pushes[key] = first_try = (route.revision, time.monotonic())
        waited = time.monotonic() - first_try[1]
        unreached = "; ".join(f"{pod}: {why}" for pod, why in sorted(outcome.unreached.items()))
        if waited < self.config.route_push_grace_s:
            log.info("%s: gateway pods not switched yet (%s)", key, unreached)
            return False
        kopf.warn(body, reason="GatewayUnreachable",
                  message=f"could not tell gateway pods of plan revision {route.revision} for "
                          f"{waited:.0f}s ({unreached}); relying on their route ConfigMap")
        self.route_pushes.pop(key, None)
        return True

    def _announce_plan(
        self, body: Mapping[str, Any], chosen: Chosen, previous: InferencePipelineStatus | None
    ) -> None:
        if not chosen.decision.adopt:
            return
        before = previous.plan.hash if previous is not None and previous.plan else None
        if before == chosen.status.hash:
            return
        kopf.info(body, reason="Planned" if before is None else "Replanned",
                  message=f"{chosen.decision.reason}: {chosen.decision.message}; plan "
                          f"{chosen.status.hash} with {len(chosen.plan.stages)} stages")

    async def _ensure_token(self, ref: r.PipelineRef) -> str:
        name = r.token_secret_name(ref.name)
        existing = await self.call(self.kube.get, r.SECRETS, ref.namespace, name)
        token = _token_of(existing) if existing is not None else None
        if token is None:
            token = secrets.token_urlsafe(32)
            if existing is not None:
                await self.call(self.kube.delete, r.SECRETS, ref.namespace, name)
        await self.call(r.apply, self.kube, r.token_secret(ref, token))
        return token

    def _announce_judgement(self, key: str, body: Mapping[str, Any], chosen: Chosen) -> None:
        """Say once, as an Event, why a better-looking plan is not (yet) adopted."""
        decision = chosen.decision
        if decision.action is Action.replan or decision.reason == "Unchanged":
            self.judged.pop(key, None)
            return
        judgement = (chosen.candidate_hash, decision.reason)
        if self.judged.get(key) != judgement:
            self.judged[key] = judgement
            reason = "ReplanDeferred" if decision.action is Action.wait else "ReplanSkipped"
            kopf.info(body, reason=reason, message=f"{decision.reason}: {decision.message}")

    async def _apply(
        self, body: Mapping[str, Any], desired: Mapping[str, Any],
        applied: Counter[str] | None = None,
    ) -> None:
        result = await self.call(r.apply, self.kube, desired)
        if applied is not None:
            applied[result.value] += 1
        if result is not r.Applied.unchanged:
            kind, name = desired["kind"], desired["metadata"]["name"]
            log.info("%s %s %s", result.value, kind, name)
            if kind in ("Pod", "Deployment"):
                kopf.info(body, reason=f"{kind}{result.value.capitalize()}",
                          message=f"{kind} {name} {result.value}")

    async def _retire(
        self, body: Mapping[str, Any], ref: r.PipelineRef, keep: str, why: str
    ) -> None:
        """Delete every stage Pod and Service of the pipeline not of revision ``keep``."""
        removed = []
        for kind in (r.PODS, r.SERVICES):
            objects = await self.call(self.kube.list, kind, ref.namespace,
                                      {s.LABEL_PIPELINE: ref.name,
                                       s.LABEL_COMPONENT: s.COMPONENT_STAGE})
            for obj in objects:
                if _revision(obj) != keep and r.owned_by(obj, ref.uid):
                    await self.call(self.kube.delete, kind, ref.namespace,
                                    obj["metadata"]["name"])
                    removed.append(obj["metadata"]["name"])
        if removed:
            kopf.info(body, reason="OldPlanRemoved",
                      message=f"removed {len(removed)} objects of the previous plan ({why})")

    # ------------------------------------------------------------------ status

    async def _write_failure(
        self,
        body: dict[str, Any],
        ref: r.PipelineRef,
        previous: InferencePipelineStatus | None,
        generation: int,
        failure: PlanFailure,
    ) -> None:
        plan = previous.plan if previous else None
        observed = await self._observe_running(ref, plan)
        # The gateway that still runs is the earlier plan's, on its port.
        endpoint = previous.endpoint if previous else None
        new_status = compose(previous, generation=generation, plan=plan, failure=failure,
                             observed=observed, endpoint=endpoint)
        old = previous.condition(ConditionType.Planned.value) if previous else None
        if old is None or old.reason != failure.reason or old.message != failure.message:
            kopf.warn(body, reason=failure.reason.value, message=failure.message)
        await self._write_status(body, previous, new_status)

    async def _observe_running(
        self, ref: r.PipelineRef, plan: PlanStatus | None
    ) -> Observed:
        """What still runs of an earlier plan while the current spec cannot be planned."""
        if plan is None:
            return Observed(revision=None)
        pods = await self.call(self.kube.list, r.PODS, ref.namespace,
                               {s.LABEL_PIPELINE: ref.name, s.LABEL_PLAN_HASH: plan.hash})
        if not pods:
            return Observed(revision=None)
        revision = _revision(pods[0])
        waiting = sorted(p["metadata"]["name"] for p in pods if not r.pod_ready(p))
        failing = {p["metadata"]["name"]: why for p in pods if (why := r.pod_failure(p))}
        gateway = await self.call(self.kube.get, r.DEPLOYMENTS, ref.namespace,
                                  r.gateway_name(ref.name))
        switched = _stage0_revision(gateway) == revision and r.deployment_rolled_out(gateway)
        return Observed(revision=revision, pods_waiting=waiting, pods_failing=failing,
                        gateway_switched=switched)

    async def _write_status(
        self,
        body: Mapping[str, Any],
        previous: InferencePipelineStatus | None,
        new: InferencePipelineStatus,
    ) -> None:
        patch = status_patch(new)
        if previous is not None and status_patch(previous) == patch:
            return
        metadata = body["metadata"]
        await self.call(self.kube.patch, r.PIPELINES, metadata["namespace"], metadata["name"],
                        patch, subresource="status")

    async def cleanup(self, namespace: str, name: str, uid: str) -> int:
        """Delete every object the pipeline owns (owner GC would, but later)."""
        key = f"{namespace}/{name}"
        async with self.locks.setdefault(key, asyncio.Lock()):
            removed = 0
            for kind in (r.DEPLOYMENTS, r.PODS, r.SERVICES, r.CONFIGMAPS, r.SECRETS):
                objects = await self.call(self.kube.list, kind, namespace,
                                          {s.LABEL_PIPELINE: name})
                for obj in objects:
                    if r.owned_by(obj, uid):
                        removed += await self.call(self.kube.delete, kind, namespace,
                                                   obj["metadata"]["name"])
        self.forget(key)
        return removed


# --------------------------------------------------------------------------- helpers


def _status_of(body: Mapping[str, Any]) -> InferencePipelineStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return InferencePipelineStatus.model_validate(raw)
    except ValueError:
        log.warning("ignoring an unreadable status of %s", body["metadata"].get("name"))
        return None


def _failure_of(error: EdgeweaveError) -> PlanFailure:
    reasons: list[tuple[type[BaseException], Reason]] = [
        (ChecksumMismatchError, Reason.ChecksumMismatch),
        (ModelUnreachableError, Reason.ModelUnreachable),
        (ModelNotFoundError, Reason.ModelNotFound),
        (ModelInputError, Reason.InvalidModelInputs),
        (ModelError, Reason.InvalidModel),
        (NoMatchingNodesError, Reason.NoMatchingNodes),
        (InfeasiblePlanError, Reason.Infeasible),
        (CostModelError, Reason.NodeNotPriced),
    ]
    for kind, reason in reasons:
        if isinstance(error, kind):
            return PlanFailure(reason, str(error))
    return PlanFailure(Reason.PlanningFailed, str(error))


def _seconds_since(previous: InferencePipelineStatus | None) -> float | None:
    planned_at: datetime | None = previous.plan.planned_at if previous and previous.plan else None
    if planned_at is None:
        return None
    return (utc_now() - planned_at).total_seconds()


def soonest(*delays: float | None) -> float | None:
    known = [delay for delay in delays if delay is not None]
    return min(known) if known else None


def _revision(obj: Mapping[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(s.LABEL_REVISION)


def _stage0_revision(deployment: Mapping[str, Any] | None) -> str | None:
    if deployment is None:
        return None
    return ((deployment.get("metadata") or {}).get("annotations") or {}).get(s.ANNOTATION_STAGE0)


def _token_of(secret: Mapping[str, Any]) -> str | None:
    import base64

    data = secret.get("data") or {}
    if s.TOKEN_KEY in data:
        try:
            return base64.b64decode(data[s.TOKEN_KEY]).decode() or None
        except ValueError:
            return None
    return (secret.get("stringData") or {}).get(s.TOKEN_KEY) or None


def _shards_to_grant(
    store: ModelStore, shards: list[StoredShard], pods: list[dict[str, Any]]
) -> set[str]:
    """The plan's shards, plus those old pods still run (they may restart mid-rollout)."""
    wanted = {shard.sha256 for shard in shards}
    for pod in pods:
        sha = ((pod.get("metadata") or {}).get("annotations") or {}).get(s.ANNOTATION_SHARD_SHA256)
        if sha and store.shard_path(sha) is not None:
            wanted.add(sha)
    return wanted


def _rollout(
    ref: r.PipelineRef,
    spec: InferencePipelineSpec,
    chosen: Chosen,
    shards: list[StoredShard],
    config: s.OperatorConfig,
) -> r.Rollout:
    """The stage pods' inputs: each stage's nodes, shard, and threads per node's CPUs."""
    stages = tuple(
        r.StageLayout(
            index=index,
            nodes=stage.nodes,
            shard=r.StageShard(shards[index].sha256, stage.memory_bytes),
            threads={name: max(1, int(chosen.nodes[name].cpu))
                     for name in stage.nodes if name in chosen.nodes},
        )
        for index, stage in enumerate(chosen.plan.stages)
    )
    return r.Rollout(ref=ref, spec=spec, plan_hash=chosen.status.hash, stages=stages,
                     config=config)


def _make_before_break(
    spec: InferencePipelineSpec,
    rollout: r.Rollout,
    old: list[dict[str, Any]],
    nodes: Mapping[str, Node],
) -> bool:
    """Whether the old plan's pods may stay until the new ones are Ready."""
    strategy = spec.rollout.strategy
    if strategy is not RolloutStrategy.Auto:
        return strategy is RolloutStrategy.MakeBeforeBreak
    held: dict[str, int] = {}
    for pod in old:
        node = (pod.get("spec") or {}).get("nodeName")
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        held[node] = held.get(node, 0) + int(annotations.get(s.ANNOTATION_MEMORY_BYTES, 0))
    for stage in rollout.stages:
        for name in stage.nodes:
            node = nodes.get(name)
            if node is None or held.get(name, 0) + stage.shard.memory_bytes > node.memory_bytes:
                return False
    return True


def _observe(
    rollout: r.Rollout, pods: list[dict[str, Any]], old: list[dict[str, Any]]
) -> Observed:
    desired = {
        r.stage_pod_name(rollout.ref.name, stage.index, rollout.revision, node)
        for stage in rollout.stages for node in stage.nodes
    }
    by_name = {pod["metadata"]["name"]: pod for pod in pods}
    missing = sorted(desired - set(by_name))
    failing = {n: why for n in sorted(desired & set(by_name))
               if (why := r.pod_failure(by_name[n]))}
    waiting = sorted(n for n in desired & set(by_name)
                     if not r.pod_ready(by_name[n]) and n not in failing)
    return Observed(revision=rollout.revision, pods_waiting=waiting, pods_failing=failing,
                    pods_missing=missing, old_revisions=sorted({_revision(p) or "?" for p in old}))
