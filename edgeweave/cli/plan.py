"""``edgeweave plan``: which layers run on which nodes, and how fast that will be.

The command reads a model (an ONNX file, a ``zoo:`` name, or a measured
PROFILE.yaml) and the cluster's Node objects, asks the planner for the plan the
cost model of DESIGN.md §1 rates best, and prints it as a table, JSON or YAML
(the JSON is ``Plan.to_dict()``, DESIGN.md §6), optionally with a picture.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from edgeweave.cli import app
from edgeweave.cli.output import (
    OutputFormat,
    console,
    emit_data,
    err_console,
    human_bytes,
    human_seconds,
)
from edgeweave.errors import EdgeweaveError
from edgeweave.partition.calibrate import LayerCosts
from edgeweave.partition.costmodel import ModelProfile, Node, Plan
from edgeweave.partition.nodes import Inventory, load_inventory


class Objective(StrEnum):
    throughput = "throughput"
    latency = "latency"


class PlanUsageError(EdgeweaveError):
    """Options of ``edgeweave plan`` that contradict each other."""


@dataclass(frozen=True)
class Comparison:
    """The best single node and, with ``--compare``, each baseline's plan (or why none)."""

    single: Plan | None
    baselines: dict[str, Plan | str]


PLAN_HELP = """
Split a model into pipeline stages and map them onto nodes.

MODEL is an ONNX file or a built-in `zoo:NAME` (see `edgeweave zoo list`); layers
are then priced by their FLOPs and each node's `edgeweave.io/gflops` label.
Alternatively `--profile PROFILE.yaml` gives measured seconds per layer and device
class (e.g. `examples/profiles/profile-vit-base-patch16-224.yaml`).

NODES.yaml holds Kubernetes Node objects (`kubectl get nodes -o yaml` works) with
the labels `edgeweave.io/device-class`, `edgeweave.io/gflops`,
`edgeweave.io/memory-mb` and `edgeweave.io/bandwidth-mbps`. NotReady and cordoned
nodes are skipped.

The planner minimises the pipeline **period** (seconds between finished samples;
throughput = 1/period). A stage may run on several nodes (replicas), which share
its samples. The table marks the **bottleneck** stage, the one that sets the period.

Examples:

    edgeweave plan zoo:resnet50 --nodes examples/nodes-pi4-mixed.yaml --plot plan.png

""" + (
    "    edgeweave plan --profile examples/profiles/profile-vit-large-patch16-224.yaml "
    "--nodes examples/nodes-pipeedge-16.yaml --compare\n\n"
    "    edgeweave plan model.onnx --nodes nodes.yaml --objective latency "
    "--target-period 0.5 -o json\n"
)


@app.command("plan", help=PLAN_HELP)
def plan_command(
    model: str | None = typer.Argument(
        None,
        metavar="MODEL",
        help="ONNX file or zoo:NAME to plan. Leave out when --profile is given.",
        show_default=False,
    ),
    profile: Path | None = typer.Option(
        None,
        "--profile",
        "-p",
        help="Measured PROFILE.yaml (seconds per layer and device class) instead of MODEL.",
        show_default=False,
    ),
    nodes: Path = typer.Option(
        ...,
        "--nodes",
        "-n",
        help="NODES.yaml: Kubernetes Node objects (a List or several documents).",
        show_default=False,
    ),
    output: OutputFormat = typer.Option(
        OutputFormat.table, "--output", "-o",
        help="table for people; json/yaml (Plan.to_dict(), DESIGN §6) for scripts.",
    ),
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="Also write a PNG: what limits each stage (compute, receiving, sending) and "
        "a timeline of samples flowing through every replica; the bottleneck is red.",
        show_default=False,
    ),
    objective: Objective = typer.Option(
        Objective.throughput,
        "--objective",
        help="throughput: smallest period. latency: quickest single sample, keeping the "
        "period within --target-period if given.",
    ),
    target_period: float | None = typer.Option(
        None,
        "--target-period",
        min=0.0,
        help="Longest acceptable period in seconds (1/target throughput); for --objective "
        "latency.",
        show_default=False,
    ),
    max_stages: int | None = typer.Option(
        None, "--max-stages", min=1,
        help="At most this many stages (fewer hops, fewer shards).", show_default=False,
    ),
    no_replicas: bool = typer.Option(
        False, "--no-replicas",
        help="One node per stage, as PipeEdge plans (no stage shared by several nodes).",
    ),
    max_replicas: int | None = typer.Option(
        None, "--max-replicas", min=1, help="At most this many nodes per stage.",
        show_default=False,
    ),
    batch: int = typer.Option(
        1, "--batch", min=1,
        help="Samples per request for MODEL (scales FLOPs and tensor sizes). A measured "
        "profile is fixed to the batch it was timed with.",
    ),
    layer_costs: LayerCosts = typer.Option(
        LayerCosts.flops, "--layer-costs",
        help="flops: price layers by FLOP count (weights not needed). measured: by each "
        "layer's share of the model's time in onnxruntime on this machine (builds the model "
        "with weights, times it once, caches the result), what `run` and the operator use.",
    ),
    compare: bool = typer.Option(
        False, "--compare",
        help="Also show the baselines' periods: equal layers, exo's memory-proportional "
        "split, PipeEdge's DP, PICO's greedy mapping.",
    ),
) -> None:
    """Plan MODEL (or --profile) on the nodes of --nodes; see the help text above."""
    _check_usage(model, profile, batch, target_period, layer_costs)
    inventory = load_inventory(nodes)
    model_profile = _load_model(model, profile, batch, layer_costs)

    from edgeweave.partition.measured import check_profile_covers

    check_profile_covers(model_profile, inventory.nodes)
    started = time.perf_counter()
    plan = _make_plan(
        model_profile, inventory.nodes, objective=objective, target_period=target_period,
        max_stages=max_stages, replicas=not no_replicas, max_replicas=max_replicas,
    )
    planner_s = time.perf_counter() - started

    if plot is not None:
        from edgeweave.cli.plot import plot_plan

        plot_plan(plan, inventory.nodes, plot)
    if output is not OutputFormat.table:
        emit_data(plan.to_dict(), output)
        return
    comparison = _compare(model_profile, inventory.nodes, with_baselines=compare)
    print_plan(plan, model_profile, inventory, comparison, planner_s)
    if plot is not None:
        console.print(f"plot written to {plot}")


def _check_usage(
    model: str | None,
    profile: Path | None,
    batch: int,
    target_period: float | None,
    layer_costs: LayerCosts = LayerCosts.flops,
) -> None:
    if (model is None) == (profile is None):
        raise PlanUsageError(
            "give either MODEL (an .onnx file or zoo:NAME) or --profile PROFILE.yaml, not "
            + ("both" if model is not None else "neither")
        )
    if profile is not None and batch != 1:
        raise PlanUsageError(
            "--batch applies to MODEL; a measured --profile is timed at its own batch size"
        )
    if profile is not None and layer_costs is LayerCosts.measured:
        raise PlanUsageError(
            "--layer-costs measured applies to MODEL; a --profile already holds measured times"
        )
    if target_period is not None and target_period <= 0:
        raise PlanUsageError("--target-period must be a positive number of seconds")


def _load_model(model: str | None, profile: Path | None, batch: int,
                layer_costs: LayerCosts = LayerCosts.flops) -> ModelProfile:
    if profile is not None:
        from edgeweave.partition.measured import load_profile_yaml

        return load_profile_yaml(profile)
    if layer_costs is LayerCosts.measured:
        from edgeweave.local.run import default_cache_dir
        from edgeweave.modelstore import ModelStore, model_uri

        store = ModelStore(default_cache_dir())
        stored = store.resolve(model_uri(str(model)))
        return store.profile(stored, batch=batch, layer_costs=layer_costs).profile
    from edgeweave.partition.source import load_model_profile

    loaded = load_model_profile(str(model), batch=batch)
    return loaded if isinstance(loaded, ModelProfile) else loaded.profile


def _make_plan(
    model: ModelProfile,
    nodes: Sequence[Node],
    *,
    objective: Objective,
    target_period: float | None,
    max_stages: int | None,
    replicas: bool,
    max_replicas: int | None,
) -> Plan:
    from edgeweave.partition.planner import plan

    return plan(
        model, nodes, objective=objective.value, target_period_s=target_period,
        max_stages=max_stages, replicas=replicas, max_replicas=max_replicas,
    )


def _compare(model: ModelProfile, nodes: Sequence[Node], *, with_baselines: bool) -> Comparison:
    from edgeweave.partition.baselines import BASELINES, single_device

    try:
        single: Plan | None = single_device(model, nodes)
    except EdgeweaveError:
        single = None
    baselines: dict[str, Plan | str] = {}
    if with_baselines:
        for name, baseline in BASELINES.items():
            try:
                baselines[name] = baseline(model, nodes)
            except EdgeweaveError as error:
                baselines[name] = str(error)
    return Comparison(single, baselines)


# ------------------------------------------------------------------ the table


def print_plan(
    plan: Plan,
    model: ModelProfile,
    inventory: Inventory,
    comparison: Comparison,
    planner_s: float,
) -> None:
    """The human view: one row per stage, the bottleneck marked, then the summary."""
    console.print(stage_table(plan, model))
    console.print(summary_line(plan, comparison, planner_s))
    if plan.unused_nodes:
        console.print(f"unused nodes: {', '.join(plan.unused_nodes)}")
    for skip in inventory.skipped:
        console.print(f"skipped node {skip.name}: {skip.reason}")
    for line in plan.notes:
        console.print(f"[dim]note: {line}[/]", highlight=False)
    for line in inventory.assumptions:
        err_console.print(f"warning: {line}", highlight=False)
    if comparison.baselines:
        console.print(baseline_table(plan, comparison))


def stage_table(plan: Plan, model: ModelProfile) -> Table:
    table = Table(title=f"{plan.model}: {len(plan.stages)} stages on {plan.nodes_used} nodes")
    for column, justify in (
        ("stage", "right"), ("layers", "left"), ("nodes", "left"), ("compute", "right"),
        ("in", "right"), ("out", "right"), ("memory", "right"), ("period", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for index, stage in enumerate(plan.stages):
        is_bottleneck = index == plan.bottleneck_stage
        names = _layer_names(model, stage.first, stage.last)
        period = Text(human_seconds(stage.period_s))
        if is_bottleneck:
            period.append("  ◀ bottleneck", style="bold red")
        table.add_row(
            str(index),
            f"{stage.first}..{stage.last} ({names})",
            ", ".join(stage.nodes),
            _compute_range(stage.compute_s),
            human_bytes(stage.in_bytes),
            human_bytes(stage.out_bytes),
            human_bytes(stage.memory_bytes),
            period,
            style="bold" if is_bottleneck else None,
        )
    return table


def _layer_names(model: ModelProfile, first: int, last: int) -> str:
    """``conv1 … logits``: pieces are named ``start .. end`` already, so keep the ends."""
    head = model.layers[first].name.split(" .. ")[0]
    tail = model.layers[last].name.split(" .. ")[-1]
    return head if head == tail else f"{head} … {tail}"


def _compute_range(times: Sequence[float]) -> str:
    """Seconds of compute per sample on each replica (a range when they differ)."""
    low, high = min(times), max(times)
    text = human_seconds(low) if high - low <= 1e-12 else (
        f"{human_seconds(low)}..{human_seconds(high)}"
    )
    return text if len(times) == 1 else f"{text} ({len(times)} replicas)"


def summary_line(plan: Plan, comparison: Comparison, planner_s: float) -> str:
    parts = [
        f"period {human_seconds(plan.period_s)}",
        f"throughput {plan.throughput_per_s:.3g}/s",
        f"latency {human_seconds(plan.latency_s)}",
    ]
    single = comparison.single
    if single is not None and plan.period_s > 0:
        parts.append(
            f"{single.period_s / plan.period_s:.2f}x the best single node "
            f"({single.stages[0].nodes[0]}, period {human_seconds(single.period_s)})"
        )
    else:
        parts.append("no single node holds the whole model")
    parts.append(f"bottleneck stage {plan.bottleneck_stage}")
    parts.append(f"method {plan.method}")
    if plan.lower_bound_s is not None and plan.method != "exact":
        parts.append(f"optimum ≥ {human_seconds(plan.lower_bound_s)}")
    parts.append(f"planned in {human_seconds(planner_s)}")
    return " · ".join(parts)


def baseline_table(plan: Plan, comparison: Comparison) -> Table:
    table = Table(title="the same model and nodes, planned by the baselines")
    for column in ("method", "stages", "nodes", "period", "vs edgeweave"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row("edgeweave", str(len(plan.stages)), str(plan.nodes_used),
                  human_seconds(plan.period_s), "1.00x", style="bold")
    for name, result in comparison.baselines.items():
        if isinstance(result, Plan):
            table.add_row(name, str(len(result.stages)), str(result.nodes_used),
                          human_seconds(result.period_s),
                          f"{result.period_s / plan.period_s:.2f}x slower"
                          if result.period_s > plan.period_s * (1 + 1e-9) else "1.00x")
        else:
            table.add_row(name, "—", "—", "—", Text(result, style="dim"))
    return table
