"""``edgeweave gateway``: serve a pipeline's Open Inference Protocol v2 front door."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgeweave.cli import app
from edgeweave.cli.serving import TOKEN_ENV, configure_logging, parse_listen, read_token

if TYPE_CHECKING:
    from edgeweave.worker.gateway import GatewayConfig
    from edgeweave.worker.routing import Stage0Route

# aiohttp and prometheus-client (the worker extra) are imported inside the command:
# every CLI invocation imports this module, and `edgeweave plan` needs neither.

GATEWAY_HELP = f"""
Serve one pipeline's front door: the Open Inference Protocol v2 (KServe, Triton) for
clients, frames to the stage-0 replicas, and `POST /v1/stream` for the last stage's
results (start the last stage with this gateway's URL as its --downstream).

Endpoints: `GET /v2/health/live`, `GET /v2/health/ready` (200 once a request has made
the round trip), `GET /v2`, `GET /v2/models/NAME`, `GET /v2/models/NAME/ready`,
`POST /v2/models/NAME/infer` (JSON or binary tensors), `GET /metrics` (Prometheus),
`POST /v1/stream` (frames; bearer token), `GET`/`PUT /v1/stage0` (where stage 0 is:
the operator moves it after a re-plan without restarting the gateway; bearer token).

With several gateway replicas behind one Service, start each with --advertise-url
set to its own address (in Kubernetes `http://$(POD_IP):PORT`): the last stage then
sends each result to the replica that holds its request, not to the Service.

The metadata file is `{{"inputs": [...], "outputs": [...]}}`, each tensor
`{{"name": ..., "datatype": "FP32", "shape": [-1, 3, 224, 224]}}` with -1 for the batch.
The token comes from --token-file or the {TOKEN_ENV} environment variable. A client
may shorten its deadline with the `Timeout: SECONDS` header or the `timeout` request
parameter (microseconds); --timeout-s is the default and the maximum.

Example:

    edgeweave gateway --model-name resnet50 --metadata resnet50.json --listen 0.0.0.0:8000
    --stage0 http://10.0.0.5:8100 --stage0 http://10.0.0.6:8100 --token-file /run/secrets/token
"""


@app.command("gateway", help=GATEWAY_HELP)
def gateway_command(
    model_name: str = typer.Option(
        ..., "--model-name", metavar="NAME", help="The model's name in the protocol.",
        show_default=False,
    ),
    metadata: Path = typer.Option(
        ..., "--metadata", metavar="FILE.json", help="The model's inputs and outputs.",
        show_default=False,
    ),
    listen: str = typer.Option(
        ..., "--listen", metavar="HOST:PORT", help="Address to serve on (port 0: any free).",
        show_default=False,
    ),
    stage0: list[str] = typer.Option(
        [], "--stage0", metavar="URL", help="Base URL of a stage-0 replica; repeat for replicas.",
        show_default=False,
    ),
    stage0_file: Path | None = typer.Option(
        None, "--stage0-file", metavar="FILE",
        help='The stage-0 route ({"revision", "urls", "serial"}, the operator\'s ConfigMap), '
        "re-read as it changes.",
    ),
    token_file: Path | None = typer.Option(
        None, "--token-file", metavar="FILE", help=f"The pipeline token (else ${TOKEN_ENV})."
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", metavar="FILE",
        help="Require `Authorization: Bearer KEY` from clients; one key a line.",
    ),
    max_body_mb: float = typer.Option(
        64.0, "--max-body-mb", min=0.001, help="Largest request body (MiB); larger: 413."
    ),
    timeout_s: float = typer.Option(
        30.0, "--timeout-s", min=0.001, help="Default and maximum seconds per request."
    ),
    max_inflight: int = typer.Option(
        1024, "--max-inflight", min=1, help="Requests held at once; more get 429."
    ),
    advertise_url: str | None = typer.Option(
        None, "--advertise-url", metavar="URL",
        help="This replica's own base URL (http://HOST:PORT): results come back to it "
        "directly. Needed with more than one gateway replica.",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Serve a pipeline's gateway; see the help text above."""
    from edgeweave.worker.gateway import (
        GatewayConfig,
        limits_for_body,
        load_metadata,
        read_api_keys,
    )

    configure_logging(log_level, "gateway")
    host, port = parse_listen(listen)
    route = _initial_route(stage0, stage0_file)
    config = GatewayConfig(
        metadata=load_metadata(metadata, model_name),
        stage0_urls=route.urls,
        stage0_revision=route.revision,
        stage0_serial=route.serial,
        stage0_file=stage0_file,
        token=read_token(token_file, needed_by="the gateway"),
        api_keys=read_api_keys(api_key_file) if api_key_file is not None else frozenset(),
        limits=limits_for_body(int(max_body_mb * 2**20)),
        timeout_s=timeout_s,
        max_inflight=max_inflight,
        advertise_url=bracketed_ipv6(advertise_url) if advertise_url is not None else None,
    )
    asyncio.run(_serve(config, host, port))


def bracketed_ipv6(url: str) -> str:
    """``url`` with an IPv6 host in brackets: Kubernetes substitutes ``$(POD_IP)`` as is,
    so ``http://$(POD_IP):8080`` reads ``http://fd00::5:8080`` on an IPv6 cluster. The
    part after the last colon is then the port (the URL is a bare ``scheme://host:port``)."""
    import ipaddress

    scheme, separator, rest = url.partition("://")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not separator or ":" not in host or not port.isdigit():
        return url
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return url
    return f"{scheme}://[{host}]{colon}{port}"


def _initial_route(stage0: list[str], stage0_file: Path | None) -> Stage0Route:
    from edgeweave.errors import EdgeweaveError
    from edgeweave.worker.routing import read_route_file, route_of_urls

    if stage0 and stage0_file is not None:
        raise EdgeweaveError("give stage 0 by --stage0 or by --stage0-file, not both")
    if stage0_file is not None:
        return read_route_file(stage0_file)
    if not stage0:
        raise EdgeweaveError("the gateway needs stage 0: --stage0 URL (repeat) or --stage0-file")
    return route_of_urls(stage0)


async def _serve(config: GatewayConfig, host: str, port: int) -> None:
    from edgeweave.worker.gateway import start_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    running = await start_gateway(config, host, port)
    # One line on stdout with the bound address: `edgeweave run` and the tests read it.
    print(
        f"edgeweave gateway {config.metadata.name} listening on {running.url}", flush=True
    )
    try:
        await stop.wait()
    finally:
        await running.stop()
