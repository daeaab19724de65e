"""``edgeweave worker``: serve one stage of a pipeline (what a stage pod runs)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgeweave.cli import app
from edgeweave.cli.serving import TOKEN_ENV, configure_logging, parse_listen, read_token

if TYPE_CHECKING:
    from edgeweave.worker.stage import StageConfig

# aiohttp, onnxruntime and prometheus-client (the worker extra) are imported inside the
# command: every CLI invocation imports this module, and `edgeweave plan` needs none.

WORKER_HELP = f"""
Serve one stage of a pipeline: receive frames from upstream, run the shard, stream
the results to the next stage's replicas (or to the gateway after the last stage:
to the gateway replica that sent the request when it named itself, else to
--downstream, the gateway Service).

Endpoints: `POST /v1/stream` (frames; bearer token), `PUT /v1/downstream`
(`{{"urls": [...]}}`; bearer token), `GET /healthz`, `GET /readyz` (200 once the shard
is loaded and warm), `GET /metrics` (Prometheus).

The token comes from --token-file or the {TOKEN_ENV} environment variable. A shard
given by URL is fetched with that token; with --shard-sha256 its bytes must match.

Example (token in $EDGEWEAVE_TOKEN; results go to the next stage at 10.0.0.7):

    edgeweave worker --shard s0.onnx --listen :8100 --downstream http://10.0.0.7:8100
"""


@app.command("worker", help=WORKER_HELP)
def worker_command(
    shard: str = typer.Option(
        ..., "--shard", metavar="PATH|URL", help="The stage's ONNX shard.", show_default=False
    ),
    shard_sha256: str | None = typer.Option(
        None, "--shard-sha256", metavar="HEX", help="Refuse a shard whose sha256 differs."
    ),
    listen: str = typer.Option(
        ..., "--listen", metavar="HOST:PORT", help="Address to serve on (port 0: any free).",
        show_default=False,
    ),
    downstream: list[str] = typer.Option(
        ..., "--downstream", metavar="URL",
        help="Base URL of a next-stage replica (or the gateway); repeat for replicas.",
        show_default=False,
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", metavar="FILE", help=f"The pipeline token (else ${TOKEN_ENV})."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="onnxruntime intra-op threads."),
    name: str = typer.Option("stage", "--name", help="This replica's name in logs and metrics."),
    queue_size: int = typer.Option(
        2, "--queue-size", min=1, help="Frames queued before compute, and after it."
    ),
    max_outstanding: int = typer.Option(
        16, "--max-outstanding", min=1, help="Unacked frames per downstream replica."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Serve one pipeline stage; see the help text above."""
    from edgeweave.worker.stage import StageConfig

    configure_logging(log_level, f"worker[{name}]")
    host, port = parse_listen(listen)
    config = StageConfig(
        shard=shard,
        downstream=tuple(downstream),
        token=read_token(token_file, needed_by="a stage"),
        name=name,
        shard_sha256=shard_sha256,
        threads=threads,
        queue_size=queue_size,
        max_outstanding=max_outstanding,
    )
    asyncio.run(_serve(config, host, port))


async def _serve(config: StageConfig, host: str, port: int) -> None:
    from edgeweave.worker.stage import start_stage

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stage = await start_stage(config, host, port)
    # One line on stdout with the bound address: `edgeweave run` and the tests read it
    # (port 0 picks a free port, so the caller cannot know it otherwise).
    print(f"edgeweave worker {config.name} listening on {stage.url}", flush=True)
    try:
        loading = asyncio.ensure_future(stage.worker.wait_loaded())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a load error ends the worker with its message
            print(f"edgeweave worker {config.name} ready", flush=True)
            await stopping
        else:
            loading.cancel()
    finally:
        await stage.stop()
