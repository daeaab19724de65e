"""The ``InferencePipeline`` API, ``edgeweave.io/v1alpha1``: spec and status as pydantic models.

These models are the one source of truth for the resource: the CRD's OpenAPI schema
is generated from them (:mod:`edgeweave.api.crd`), ``edgeweave run`` validates a
manifest with them, and the operator reads spec and writes status through them. So
they import neither kopf nor kubernetes.

Python uses snake_case names; manifests use the camelCase aliases. Constructing a
model in Python accepts either, but the manifest loaders (:mod:`edgeweave.api.crd`)
accept only the aliases, because the API server would drop a snake_case key.

Every field a spec carries is known: unknown spec fields are errors here (and pruned
by the API server), so a typo never silently falls back to a default. Status models
ignore fields they do not know, because kopf keeps its own bookkeeping in
``status`` and an older client must still read a newer operator's status.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from edgeweave.partition.costmodel import ModelProfile, Plan

GROUP = "edgeweave.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferencePipeline"
LIST_KIND = f"{KIND}List"
PLURAL = "inferencepipelines"
SINGULAR = "inferencepipeline"
SHORT_NAMES = ("ipl",)
CRD_NAME = f"{PLURAL}.{GROUP}"

MAX_NAME_LENGTH = 40
"""Longest pipeline name: objects derived from it (``NAME-gateway``, per-stage Services
with a plan hash) must stay within the 63 characters of a Service name."""

NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
"""A DNS-1035 label, because the pipeline's name prefixes its Services' names."""

MODEL_URI_PATTERN = r"^(zoo:[A-Za-z0-9][A-Za-z0-9_.-]*|file://.+|https?://.+)$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""Kubernetes' resource.Quantity syntax, as controller-gen writes it into CRDs."""
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
"""metav1.Condition's rule for ``reason``: CamelCase, machine-readable."""


# --------------------------------------------------------------------------- types


def _matching(pattern: str, expected: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if re.fullmatch(pattern, value) is None:
            raise ValueError(f"must be {expected} (got {value!r})")
        return value

    return check


def _pattern_string(pattern: str, expected: str) -> Any:
    """A string held to ``pattern`` with a message a user can act on.

    pydantic's own ``pattern=`` would report the raw regex; this keeps the regex in the
    JSON schema (hence in the CRD, where the API server checks it too) and says in
    words what is expected.
    """
    return Annotated[
        str,
        AfterValidator(_matching(pattern, expected)),
        Field(json_schema_extra={"pattern": pattern}),
    ]


ModelUri = _pattern_string(
    MODEL_URI_PATTERN, "zoo:NAME, file:///PATH or an http(s):// URL"
)
Sha256Hex = Annotated[
    _pattern_string(SHA256_PATTERN, "64 hexadecimal digits"),
    AfterValidator(str.lower),
]
PipelineName = _pattern_string(
    NAME_PATTERN,
    "lowercase letters, digits and '-', starting with a letter and ending with a "
    "letter or digit",
)
ConditionReason = _pattern_string(
    CONDITION_REASON_PATTERN, "a CamelCase word such as ModelNotFound"
)


def _quantity(value: object) -> str:
    # bool is an int in Python, but `cpu: true` is a mistake, not a quantity.
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(
            f"must be a quantity such as 500m, 2 or 1Gi, written as a string or a whole "
            f"number (got {value!r})"
        )
    text = str(value)
    if re.fullmatch(QUANTITY_PATTERN, text) is None:
        raise ValueError(f"must be a quantity such as 500m, 2 or 1Gi (got {text!r})")
    return text


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
"""A resource quantity; kept as the string Kubernetes would print (``2``, ``500m``)."""


def _whole_utc_second(moment: datetime) -> datetime:
    # Held as the API server stores it, so a status reads back equal to what was written.
    return moment.astimezone(UTC).replace(microsecond=0)


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Timestamp = Annotated[
    AwareDatetime,
    AfterValidator(_whole_utc_second),
    PlainSerializer(_rfc3339, when_used="json"),
]
"""A time in metav1.Time's form: RFC 3339, UTC, whole seconds."""


def utc_now() -> datetime:
    """The current time, truncated to the whole second a status can hold."""
    return datetime.now(UTC).replace(microsecond=0)


# --------------------------------------------------------------------------- base


class ApiModel(BaseModel):
    """Base of every spec model: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        allow_inf_nan=False,
        use_enum_values=False,
    )

    def to_dict(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, JSON values, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class SpecModel(ApiModel):
    """Base of every spec model: immutable, since nothing may ever write to a spec."""

    model_config = ConfigDict(frozen=True)


class StatusModel(ApiModel):
    """Base of every status model: fields it does not know (kopf's) are ignored."""

    model_config = ConfigDict(extra="ignore")


def _defaults_to(factory: Callable[[], Any], description: str) -> Any:
    """A field whose default is an empty object, map or list.

    The CRD carries the same empty default, so that the API server fills in the nested
    defaults exactly as pydantic does and a stored object reads back unchanged.
    """
    empty: Any = [] if factory is list else {}
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": empty}
    )


# --------------------------------------------------------------------------- spec


class Objective(StrEnum):
    """What the planner optimises."""

    throughput = "throughput"
    latency = "latency"


class RolloutStrategy(StrEnum):
    """How a new plan replaces the running one."""

    Auto = "Auto"
    MakeBeforeBreak = "MakeBeforeBreak"
    InPlace = "InPlace"


class ModelInput(SpecModel):
    """A concrete shape for one of the model's inputs."""

    name: str = Field(
        min_length=1, description="Name of the model input (an ONNX graph input) to override."
    )
    shape: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1,
        description=(
            "Full shape of this input, batch dimension included; every dimension a "
            "positive integer. Overrides `batch` for this input and fixes symbolic "
            "dimensions the model leaves open."
        ),
    )


class ModelSource(SpecModel):
    """Where the model comes from and how its inputs are shaped."""

    uri: ModelUri = Field(
        description=(
            "The ONNX model: `zoo:NAME` for a built-in architecture (see `edgeweave zoo "
            "list`), `file:///PATH` for a file the operator can read, or an `http://` or "
            "`https://` URL it downloads."
        )
    )
    sha256: Sha256Hex | None = Field(
        default=None,
        description=(
            "Expected sha256 of the model file, 64 hex digits. A model whose checksum "
            "differs is refused; stage shards are verified the same way."
        ),
    )
    inputs: list[ModelInput] = Field(
        default_factory=list,
        description="Per-input shape overrides, by input name; inputs not named keep the "
        "model's shape with `batch` as the batch dimension.",
        json_schema_extra={
            "default": [],
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    batch: int = Field(
        default=1,
        ge=1,
        description=(
            "Samples per inference call: the size given to a symbolic (open) batch "
            "dimension of the model's inputs. Plans price one batch as one sample."
        ),
    )

    @model_validator(mode="after")
    def _input_names_unique(self) -> Self:
        names = [item.name for item in self.inputs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"inputs: {', '.join(map(repr, repeated))} listed more than once")
        return self


class ReplicaPolicy(SpecModel):
    """Whether a stage may run on several nodes at once."""

    allow: bool = Field(
        default=True,
        description=(
            "Let the planner give one stage several replica nodes that share its traffic, "
            "when that raises throughput. False gives every stage exactly one node."
        ),
    )
    max: int | None = Field(
        default=None,
        ge=1,
        description="Most replicas any one stage may have. Unset: as many as pay off.",
    )

    @model_validator(mode="after")
    def _max_needs_allow(self) -> Self:
        if not self.allow and self.max is not None and self.max > 1:
            raise ValueError(f"max {self.max} needs allow: true (or drop max)")
        return self


class ResourceRequirements(SpecModel):
    """Requests and limits, as in a container's `resources`."""

    requests: dict[str, Quantity] = _defaults_to(
        dict, "Minimum resources reserved for the container, e.g. `cpu: 500m`, `memory: 256Mi`."
    )
    limits: dict[str, Quantity] = _defaults_to(
        dict, "Most the container may use, e.g. `memory: 1Gi`."
    )


class ReplanPolicy(SpecModel):
    """When the operator computes a new plan for a running pipeline."""

    on_node_churn: bool = Field(
        default=True,
        description=(
            "Re-plan when nodes join or change labels. A node that hosts a stage and "
            "fails or goes away always triggers a re-plan, whatever this says."
        ),
    )
    min_improvement: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description=(
            "Smallest predicted gain, as a fraction of the current plan's throughput "
            "(0.1 = 10 % more), that justifies moving to a new plan when nodes join or "
            "change."
        ),
    )
    cooldown_seconds: int = Field(
        default=60,
        ge=0,
        description=(
            "Seconds to wait after a change in the node set, and between two optional "
            "re-plans, so that a flapping node does not cause a re-plan storm."
        ),
    )


class RolloutPolicy(SpecModel):
    """How a new plan replaces the running one."""

    strategy: RolloutStrategy = Field(
        default=RolloutStrategy.Auto,
        description=(
            "`MakeBeforeBreak` starts the new plan's stage pods and switches the gateway "
            "once they are Ready, then removes the old ones; `InPlace` replaces pods "
            "directly (needs no spare capacity, but pauses serving); `Auto` makes before "
            "breaking when the nodes have room for both plans, else goes in place."
        ),
    )


class SecretKeyRef(SpecModel):
    """One key of a Secret in the pipeline's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret.")
    key: str = Field(min_length=1, description="Key within the Secret.")


class AuthPolicy(SpecModel):
    """Who may call the pipeline's inference endpoint."""

    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding the API key clients must send (`Authorization: Bearer "
            "KEY`) to the gateway. Unset: the gateway accepts every client. Traffic "
            "between stages always requires the pipeline's own token."
        ),
    )


class GatewaySpec(SpecModel):
    """The pipeline's front door (Open Inference Protocol)."""

    port: int = Field(
        default=8080, ge=1, le=65535, description="Port of the gateway's Service."
    )
    replicas: int = Field(
        default=1,
        ge=1,
        description=(
            "Gateway pods behind the Service. Each pod advertises its own address, and the "
            "last stage sends every result to the pod that holds its request."
        ),
    )


class InferencePipelineSpec(SpecModel):
    """The desired pipeline: one model served across the selected nodes."""

    model: ModelSource = Field(description="The model to serve.")
    node_selector: dict[str, str] = _defaults_to(
        dict,
        "Node labels a node must carry to host stages (all must match). Empty: every "
        "Ready, schedulable node.",
    )
    objective: Objective = Field(
        default=Objective.throughput,
        description=(
            "`throughput` minimises the pipeline period (most samples per second); "
            "`latency` minimises the time of one sample, keeping the period within "
            "`targetPeriodSeconds` when that is set."
        ),
    )
    target_period_seconds: float | None = Field(
        default=None,
        gt=0,
        description=(
            "With objective `latency`: the longest acceptable pipeline period in seconds "
            "(1 / the throughput to sustain)."
        ),
    )
    max_stages: int | None = Field(
        default=None, ge=1, description="Most stages the model may be split into."
    )
    replicas: ReplicaPolicy = _defaults_to(ReplicaPolicy, "Replication of stages.")
    worker_image: str | None = Field(
        default=None,
        min_length=1,
        description="Container image of the stage workers and gateway. Unset: the "
        "operator's default worker image.",
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="Resource requests and limits for every stage worker container.",
    )
    replan: ReplanPolicy = _defaults_to(ReplanPolicy, "When to re-plan a running pipeline.")
    rollout: RolloutPolicy = _defaults_to(RolloutPolicy, "How a new plan is rolled out.")
    auth: AuthPolicy = _defaults_to(AuthPolicy, "Access to the inference endpoint.")
    gateway: GatewaySpec = _defaults_to(GatewaySpec, "The gateway in front of the stages.")

    @model_validator(mode="after")
    def _target_period_needs_latency(self) -> Self:
        if self.target_period_seconds is not None and self.objective is not Objective.latency:
            raise ValueError(
                "targetPeriodSeconds applies only to objective: latency "
                f"(objective is {self.objective.value})"
            )
        return self


# --------------------------------------------------------------------------- status


class Phase(StrEnum):
    """Where the pipeline is in its life."""

    Pending = "Pending"
    Planning = "Planning"
    Deploying = "Deploying"
    Ready = "Ready"
    Degraded = "Degraded"
    Failed = "Failed"


class ConditionStatus(StrEnum):
    true = "True"
    false = "False"
    unknown = "Unknown"


class ConditionType(StrEnum):
    """The conditions the operator maintains."""

    Planned = "Planned"
    Ready = "Ready"
    Degraded = "Degraded"


class Condition(StatusModel):
    """One aspect of the pipeline's state, in metav1.Condition's form."""

    type: str = Field(
        min_length=1, description="`Planned`, `Ready` or `Degraded`."
    )
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    reason: ConditionReason = Field(
        description="Why, as one CamelCase word (e.g. `NoMatchingNodes`)."
    )
    message: str = Field(default="", description="Why, in words, naming what to fix.")
    last_transition_time: Timestamp = Field(
        default_factory=utc_now, description="When `status` last changed."
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The `metadata.generation` this condition describes."
    )


def set_condition(conditions: Iterable[Condition], new: Condition) -> list[Condition]:
    """``conditions`` with ``new`` in place of the condition of its type.

    ``lastTransitionTime`` moves only when the status changes, as Kubernetes clients
    expect; a changed reason or message alone keeps the old time.
    """
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            new = new.model_copy(update={"last_transition_time": old.last_transition_time})
        result.append(new)
    if not replaced:
        result.append(new)
    return result


class StageStatus(StatusModel):
    """One planned stage and what the cost model predicts for it."""

    index: int = Field(ge=0, description="Position of the stage, from 0 (takes the input).")
    layers: list[Annotated[int, Field(ge=0)]] = Field(
        min_length=2,
        max_length=2,
        description="First and last layer of the stage: inclusive indices into the chain.",
    )
    layer_names: list[str] | None = Field(
        default=None, description="Names of the first and last layer."
    )
    nodes: list[str] = Field(min_length=1, description="Nodes running a replica of the stage.")
    replicas: int = Field(ge=1, description="Number of replicas (the length of `nodes`).")
    period_seconds: float = Field(
        ge=0, description="Predicted seconds between two samples leaving the stage."
    )
    compute_seconds: list[Annotated[float, Field(ge=0)]] | None = Field(
        default=None, description="Predicted compute seconds per sample, per node in `nodes`."
    )
    in_bytes: int = Field(ge=0, description="Bytes the stage receives per sample.")
    out_bytes: int = Field(ge=0, description="Bytes the stage sends on per sample.")
    memory_bytes: int = Field(ge=0, description="Memory the stage needs on each node.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        first, last = self.layers
        if first > last:
            raise ValueError(f"layers: first {first} is after last {last}")
        if self.replicas != len(self.nodes):
            raise ValueError(f"replicas is {self.replicas} but {len(self.nodes)} nodes are listed")
        return self


class PlanStatus(StatusModel):
    """The plan in force, with the cost model's predictions."""

    stages: list[StageStatus] = Field(min_length=1, description="The stages, in order.")
    stage_count: int = Field(
        default=0, ge=0, description="Number of stages (always the length of `stages`)."
    )
    node_count: int = Field(
        default=0, ge=0, description="Number of nodes serving stages, replicas included."
    )
    period_seconds: float = Field(
        ge=0, description="Predicted pipeline period: seconds per sample at the bottleneck."
    )
    throughput_per_second: float | None = Field(
        default=None, ge=0, description="Predicted samples per second (1 / period)."
    )
    latency_seconds: float = Field(
        ge=0, description="Predicted seconds for one sample through an idle pipeline."
    )
    bottleneck_stage: int = Field(ge=0, description="Index of the slowest stage.")
    hash: str = Field(
        min_length=1,
        description="Identifies the layout (model, layer ranges, nodes): equal hashes "
        "deploy the same pods.",
    )
    method: str = Field(default="", description="How the planner found the plan.")
    planned_at: Timestamp | None = Field(default=None, description="When the plan was made.")

    @model_validator(mode="after")
    def _derive_counts(self) -> Self:
        # Printer columns cannot count a list, so the counts are fields; derive them
        # here so that they can never disagree with `stages`.
        self.stage_count = len(self.stages)
        self.node_count = sum(len(stage.nodes) for stage in self.stages)
        if self.bottleneck_stage >= len(self.stages):
            raise ValueError(
                f"bottleneckStage {self.bottleneck_stage} is not one of the "
                f"{len(self.stages)} stages"
            )
        return self

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        profile: ModelProfile | None = None,
        planned_at: datetime | None = None,
    ) -> PlanStatus:
        """The status form of a priced plan; ``profile`` adds the layer names."""
        stages = [
            StageStatus(
                index=index,
                layers=[stage.first, stage.last],
                layer_names=(
                    [profile.layers[stage.first].name, profile.layers[stage.last].name]
                    if profile is not None
                    else None
                ),
                nodes=list(stage.nodes),
                replicas=len(stage.nodes),
                period_seconds=stage.period_s,
                compute_seconds=list(stage.compute_s),
                in_bytes=stage.in_bytes,
                out_bytes=stage.out_bytes,
                memory_bytes=stage.memory_bytes,
            )
            for index, stage in enumerate(plan.stages)
        ]
        throughput = plan.throughput_per_s
        return cls(
            stages=stages,
            period_seconds=plan.period_s,
            # Four significant figures: a prediction, shown as is by `kubectl get ipl`.
            throughput_per_second=float(f"{throughput:.4g}") if math.isfinite(throughput)
            else None,
            latency_seconds=plan.latency_s,
            bottleneck_stage=plan.bottleneck_stage,
            hash=plan_hash(plan),
            method=plan.method,
            planned_at=planned_at,
        )


def plan_hash(plan: Plan) -> str:
    """16 hex digits naming a plan's layout: the model, each stage's layers and nodes.

    Predicted times are left out, so a re-plan that lands on the same layout keeps the
    hash and the pods it names.
    """
    layout = {
        "model": plan.model,
        "stages": [[stage.first, stage.last, sorted(stage.nodes)] for stage in plan.stages],
    }
    canonical = json.dumps(layout, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class MeasuredStatus(StatusModel):
    """What the running pipeline actually achieves, from the gateway's metrics."""

    throughput_per_second: float | None = Field(
        default=None, ge=0, description="Completed samples per second over the window."
    )
    latency_p50_ms: float | None = Field(
        default=None, ge=0, description="Median end-to-end request latency, milliseconds."
    )
    latency_p95_ms: float | None = Field(
        default=None, ge=0, description="95th percentile request latency, milliseconds."
    )
    latency_p99_ms: float | None = Field(
        default=None, ge=0, description="99th percentile request latency, milliseconds."
    )
    requests: int | None = Field(default=None, ge=0, description="Requests in the window.")
    errors: int | None = Field(
        default=None, ge=0, description="Requests in the window that failed."
    )
    stage_busy_fraction: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(
        default=None,
        description="Fraction of the window each stage spent computing, by stage index.",
    )
    window_seconds: float | None = Field(
        default=None, gt=0, description="Length of the window the figures cover."
    )
    sampled_at: Timestamp | None = Field(
        default=None, description="When the figures were taken."
    )


class InferencePipelineStatus(StatusModel):
    """What the operator observed and did; written only by the operator."""

    phase: Phase | None = Field(
        default=None,
        description="Pending, Planning, Deploying, Ready, Degraded or Failed.",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The `metadata.generation` the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="`Planned`, `Ready` and `Degraded`, each with a reason and message.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    plan: PlanStatus | None = Field(default=None, description="The plan in force.")
    endpoint: str | None = Field(
        default=None, description="URL of the gateway (Open Inference Protocol, KServe v2)."
    )
    measured: MeasuredStatus | None = Field(
        default=None, description="Figures measured on the running pipeline."
    )

    def condition(self, kind: str) -> Condition | None:
        """The condition of type ``kind``, if the operator has set it."""
        return next((item for item in self.conditions if item.type == kind), None)


# --------------------------------------------------------------------------- object


class ObjectMeta(ApiModel):
    """The parts of Kubernetes object metadata edgeweave reads; the rest is kept."""

    model_config = ConfigDict(extra="allow")

    name: PipelineName = Field(max_length=MAX_NAME_LENGTH)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None


class InferencePipeline(ApiModel):
    """A whole ``InferencePipeline`` object, as in a manifest or from the API server."""

    api_version: Literal["edgeweave.io/v1alpha1"] = API_VERSION
    kind: Literal["InferencePipeline"] = KIND
    metadata: ObjectMeta
    spec: InferencePipelineSpec
    status: InferencePipelineStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
