"""``edgeweave run``: serve a pipeline on this machine, from the manifests a cluster would get."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from edgeweave.cli import app
from edgeweave.cli.output import OutputFormat, console, emit_data, err_console
from edgeweave.local.run import (
    CACHE_ENV,
    DEFAULT_STARTUP_TIMEOUT_S,
    ChildState,
    LocalPipeline,
    PipelineDown,
    RunError,
    RunOptions,
    StartupError,
    StopRequested,
    free_port,
    read_manifests,
    stop_on_signals,
)
from edgeweave.partition.calibrate import LayerCosts

SMOKE_CONCURRENCY = 4

RUN_HELP = f"""
Serve an InferencePipeline on this machine: plan the model over the Node objects, split
it, start one stage-worker process per planned replica and the gateway, and serve the
Open Inference Protocol v2 on 127.0.0.1:PORT until Ctrl-C or SIGTERM, which stop
every process.

`-f` takes the pipeline manifest and the nodes (repeat it; one file may hold both). The
model is `spec.model.uri` (`zoo:NAME`, `file:///PATH`, `http(s)://`, cached under
${CACHE_ENV} or ~/.cache/edgeweave); its name in the protocol is the manifest's
`metadata.name`. Each stage uses as many onnxruntime threads as its node's
`status.allocatable.cpu` (at most this machine's cores).

`--emulate` (root) also holds every node to its CPU share (a cgroup quota) and its
link to its `edgeweave.io/bandwidth-mbps` (a network namespace with a shaped veth), so
that the measured throughput is the planner's prediction; without root it says so and
runs plain processes.

`--smoke N` is the one-line check for CI: serve (on a free port unless --port is
given), send N requests through the endpoint with `edgeweave bench`, print the
results, stop; the exit code is 0 only if every request succeeded.

A process that dies is reported and not restarted: the pipeline serves on while its
stage has another replica, and stops with an error otherwise.

Examples:

    edgeweave run -f examples/pipelines/resnet50-pi4.yaml -f examples/nodes-pi4-mixed.yaml

    edgeweave run -f examples/pipelines/resnet50-pi4.yaml -f examples/nodes-pi4-mixed.yaml --smoke 8

    edgeweave bench http://127.0.0.1:8080 --model resnet50 --duration 30
"""


@app.command("run", help=RUN_HELP)
def run_command(
    files: list[Path] = typer.Option(
        ..., "--filename", "-f", metavar="FILE",
        help="InferencePipeline and Node manifests (YAML); repeat for several files.",
        show_default=False,
    ),
    port: int | None = typer.Option(
        None, "--port", "-p", min=1, max=65535,
        help="Gateway port on 127.0.0.1 (default: the manifest's spec.gateway.port, 8080).",
        show_default=False,
    ),
    emulate: bool = typer.Option(
        False, "--emulate",
        help="Hold each node to its CPU and bandwidth (root: namespaces, tc, cgroups).",
    ),
    run_dir: Path | None = typer.Option(
        None, "--run-dir",
        help="Keep the token, metadata, plan, shards and logs here (default: a temporary "
        "directory, removed after a clean stop).",
        show_default=False,
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", envvar=CACHE_ENV,
        help="Where models and shards are cached (default ~/.cache/edgeweave).",
        show_default=False,
    ),
    smoke: int | None = typer.Option(
        None, "--smoke", min=1, metavar="N",
        help="Send N requests once ready, print the results and stop; exit 0 only if all "
        "succeeded.",
        show_default=False,
    ),
    startup_timeout: float = typer.Option(
        DEFAULT_STARTUP_TIMEOUT_S, "--startup-timeout", min=0.01,
        help="Seconds every process may take to become ready.",
    ),
    output: OutputFormat = typer.Option(
        OutputFormat.table, "--output", "-o",
        help="table for people; json/yaml (endpoint, plan, processes; with --smoke also the "
        "bench result) for scripts.",
    ),
    layer_costs: LayerCosts = typer.Option(
        LayerCosts.measured, "--layer-costs",
        help="measured: price layers by their time in onnxruntime on this machine (timed "
        "once per model, cached); flops: by FLOP count.",
    ),
) -> None:
    """Serve a pipeline locally; see the help text above."""
    manifests = read_manifests(files)
    if smoke is not None and port is None:
        port = free_port()  # nobody else needs the endpoint: never collide with a server
    options = RunOptions(port=port, emulate=emulate, run_dir=run_dir, cache_dir=cache_dir,
                         startup_timeout_s=startup_timeout, layer_costs=layer_costs)
    stop = threading.Event()
    smoke_run = SmokeRun(smoke) if smoke is not None else None
    display = StatusDisplay()
    with LocalPipeline(manifests, options, on_change=display.update, on_event=_warn) as pipeline:
        # Before any process exists, Ctrl-C simply interrupts (a large model builds slowly).
        with err_console.status(f"preparing {manifests.name}") as status:
            pipeline.prepare(step=lambda text: status.update(text))
        with stop_on_signals(stop, also=smoke_run.stop if smoke_run else None):
            try:
                _start_and_serve(pipeline, stop, display, output, smoke_run)
            except BaseException:
                if pipeline.children:
                    pipeline.keep_run_dir()
                raise
            finally:
                # Still inside the signal handlers: a second Ctrl-C cannot cut the stop short.
                pipeline.stop()


def _start_and_serve(
    pipeline: LocalPipeline,
    stop: threading.Event,
    display: StatusDisplay,
    output: OutputFormat,
    smoke_run: SmokeRun | None,
) -> None:
    try:
        with display.live():
            pipeline.start(stop)
    except StopRequested:
        err_console.print("stopped before the pipeline was ready")
        return
    except StartupError as error:
        _print_tail(error.log_tail)
        raise
    _announce(pipeline, output, smoke_run is not None)
    if smoke_run is None:
        _serve(pipeline, stop)
        err_console.print(f"stopping {pipeline.model_name}")
        return
    smoke_run.start(pipeline, stop)
    _serve(pipeline, stop, on_down=smoke_run.stop)
    smoke_run.finish(pipeline, output)


def _serve(
    pipeline: LocalPipeline,
    stop: threading.Event,
    on_down: Callable[[], None] | None = None,
) -> None:
    try:
        pipeline.watch(stop)
    except PipelineDown as error:
        if on_down is not None:
            on_down()
        _print_tail(error.log_tail)
        raise


# --------------------------------------------------------------------------- smoke


class SmokeRun:
    """``--smoke N``: a bench on its own thread while the main thread watches processes."""

    def __init__(self, requests: int) -> None:
        from edgeweave.bench import Bench

        self.requests = requests
        self.bench: Bench | None = None
        self.result: object = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, pipeline: LocalPipeline, stop: threading.Event) -> None:
        from edgeweave.bench import Bench, BenchOptions

        options = BenchOptions(
            url=pipeline.endpoint, model=pipeline.model_name,
            concurrency=min(self.requests, SMOKE_CONCURRENCY), requests=self.requests,
        )
        self.bench = Bench(options)

        def drive() -> None:
            try:
                assert self.bench is not None
                self.result = self.bench.run()
            except BaseException as error:  # handed to the main thread
                self.error = error
            finally:
                stop.set()

        err_console.print(f"smoke test: sending {self.requests} requests to {pipeline.endpoint}")
        self._thread = threading.Thread(target=drive, name="edgeweave-smoke", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.bench is not None:
            self.bench.stop()

    def finish(self, pipeline: LocalPipeline, output: OutputFormat) -> None:
        from edgeweave.bench import BenchResult
        from edgeweave.cli.bench import result_table

        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise self.error
        result = self.result
        if not isinstance(result, BenchResult):
            raise RunError("smoke test: the bench did not run")
        if output is OutputFormat.table:
            console.print(result_table(result))
        else:
            emit_data({**pipeline.describe(), "smoke": result.to_dict()}, output)
        if result.requests < self.requests:
            raise RunError(
                f"smoke test stopped after {result.requests} of {self.requests} requests"
            )
        if result.errors:
            statuses = ", ".join(f"{k}: {v}" for k, v in result.errors_by_status.items())
            raise RunError(
                f"smoke test: {result.errors} of {result.requests} requests failed ({statuses})"
                f"; first error: {result.first_error} (logs: {pipeline.run_dir / 'logs'})"
            )
        err_console.print(
            f"[green]smoke test passed:[/] {result.requests} requests, "
            f"{result.throughput_per_s:.2f}/s", highlight=False,
        )


# --------------------------------------------------------------------------- display


class StatusDisplay:
    """A live table of the pipeline's processes on stderr while they start."""

    STYLES: ClassVar[dict[ChildState, str]] = {
        ChildState.starting: "yellow",
        ChildState.loading: "yellow",
        ChildState.ready: "green",
        ChildState.exited: "bold red",
        ChildState.stopped: "dim",
    }

    def __init__(self) -> None:
        self._live: Live | None = None

    def live(self) -> Live:
        # No refresh thread: children are forked from the main thread with preexec_fn,
        # which must not run while other threads may hold locks.
        self._live = Live(Text("starting"), console=err_console, auto_refresh=False,
                          transient=not err_console.is_terminal)
        return self._live

    def update(self, pipeline: LocalPipeline) -> None:
        if self._live is None or not self._live.is_started:
            return
        self._live.update(self.render(pipeline), refresh=True)

    @classmethod
    def render(cls, pipeline: LocalPipeline) -> Group:
        table = Table(title=f"{pipeline.model_name}: starting "
                      f"{'emulated ' if pipeline.emulated else ''}processes",
                      title_justify="left")
        for column in ("process", "node", "threads", "pid", "address", "state"):
            table.add_column(column)
        for child in pipeline.children:
            state = Text(child.state.value, style=cls.STYLES[child.state])
            if child.detail and child.state is not ChildState.ready:
                state.append(f"  {child.detail[:70]}", style="dim")
            table.add_row(
                child.name, child.node or "(host)",
                str(child.threads) if child.threads else "", str(child.pid or ""),
                child.url, state,
            )
        return Group(table)


def _announce(pipeline: LocalPipeline, output: OutputFormat, smoke: bool) -> None:
    """The plan, the endpoint and how to use it (or the JSON description)."""
    if output is not OutputFormat.table:
        if not smoke:
            emit_data(pipeline.describe(), output)
        return
    from edgeweave.cli.plan import stage_table

    prepared = pipeline.prepared
    assert prepared is not None
    plan = prepared.plan
    console.print(stage_table(plan, prepared.profiled.profile))
    console.print(
        f"predicted: period {plan.period_s * 1e3:.1f} ms · throughput "
        f"{plan.throughput_per_s:.3g}/s · latency {plan.latency_s * 1e3:.1f} ms · "
        f"{len(pipeline.children) - 1} stage processes"
        f"{' on emulated nodes' if pipeline.emulated else ''}",
        highlight=False,
    )
    if plan.unused_nodes:
        console.print(f"unused nodes: {', '.join(plan.unused_nodes)}", highlight=False)
    for skipped in pipeline.manifests.inventory.skipped:
        console.print(f"skipped node {skipped.name}: {skipped.reason}", highlight=False)
    for line in pipeline.manifests.inventory.assumptions:
        err_console.print(f"warning: {line}", highlight=False)
    console.print(
        f"[bold green]serving[/] [bold]{pipeline.model_name}[/] at {pipeline.endpoint} "
        f"(POST {pipeline.infer_url})", highlight=False,
    )
    if not smoke:
        console.print(
            f"try: edgeweave bench {pipeline.endpoint} --model {pipeline.model_name} "
            f"--duration 10   ·   logs: {pipeline.run_dir / 'logs'}   ·   Ctrl-C stops",
            highlight=False, soft_wrap=True,
        )


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _print_tail(lines: list[str]) -> None:
    for line in lines:
        err_console.print(Text(f"  | {line}", style="dim"), soft_wrap=True)

