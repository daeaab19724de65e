"""``edgeweave sandbox up``: an emulated edge cluster with the operator, in the foreground."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import typer

from edgeweave.cli import app
from edgeweave.cli.output import console, err_console
from edgeweave.errors import EdgeweaveError

SANDBOX_HELP = """
An emulated Kubernetes cluster of edge nodes on this machine, for trying the
operator without a cluster (and for edgeweave's end-to-end tests): a Kubernetes
API that kubectl talks to, the real operator, and a pod runner that starts each
pod's edgeweave command as a local process on its node.
"""

UP_HELP = """
Start the sandbox and keep it running until Ctrl-C or SIGTERM, which stop every
process it started.

Each Node of NODES.yaml is registered with the API. With root, each node is also
emulated: a network namespace whose link is shaped to its
`edgeweave.io/bandwidth-mbps` label and a cgroup CPU quota of its
`status.allocatable.cpu` (--no-emulate: plain processes). The kubeconfig is
written to PATH once the API is up:

    edgeweave sandbox up --nodes examples/nodes-local-2x1cpu.yaml --kubeconfig /tmp/kc &
    KUBECONFIG=/tmp/kc kubectl apply -f examples/pipelines/resnet50-local.yaml
    KUBECONFIG=/tmp/kc kubectl get ipl -w

Every Service gets an address this machine reaches (printed as it appears): send
requests to the gateway Service's line, e.g.
`edgeweave bench http://127.131.128.2:8080 --model resnet50 --duration 20`.
"""

sandbox_app = typer.Typer(name="sandbox", help=SANDBOX_HELP, no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")


@sandbox_app.command("up", help=UP_HELP)
def up_command(
    nodes: Path = typer.Option(
        ..., "--nodes", metavar="NODES.yaml", help="The cluster's Node objects.",
        show_default=False,
    ),
    kubeconfig: Path = typer.Option(
        ..., "--kubeconfig", metavar="PATH", help="Where to write the kubeconfig.",
        show_default=False,
    ),
    emulate: bool | None = typer.Option(
        None, "--emulate/--no-emulate",
        help="Emulate nodes (namespaces, shaped links, CPU quotas; needs root). "
        "Default: when possible.", show_default=False,
    ),
    run_dir: Path | None = typer.Option(
        None, "--run-dir", metavar="DIR",
        help="Keep logs and pod files here (default: a temporary directory, removed).",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", metavar="DIR", help="The operator's model and shard cache.",
    ),
    api_port: int = typer.Option(0, "--api-port", help="The API server's port (0: any free)."),
    pod_eviction: float = typer.Option(
        2.0, "--pod-eviction-seconds", min=0.0,
        help="How long pods stay on a NotReady or deleted node before they are deleted.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what every part does."),
) -> None:
    """Run the sandbox in the foreground; see the help text above."""
    try:
        import kmock  # noqa: F401
        import kopf  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as missing:
        raise EdgeweaveError(
            f"edgeweave sandbox needs {missing.name}: pip install 'edgeweave[sandbox]'"
        ) from None
    from edgeweave.sandbox.sandbox import Sandbox, SandboxOptions, read_nodes_file

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = SandboxOptions(nodes=read_nodes_file(nodes), emulate=emulate, run_dir=run_dir,
                             cache_dir=cache_dir, pod_eviction_s=pod_eviction,
                             api_port=api_port)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    sandbox = Sandbox(options)
    try:
        sandbox.start()
        written = sandbox.api.write_kubeconfig(kubeconfig)
        for line in sandbox.describe():
            console.print(line, highlight=False, soft_wrap=True)
        console.print(f"kubeconfig       {written}", highlight=False, soft_wrap=True)
        console.print("ready; Ctrl-C stops the sandbox", highlight=False)
        _announce_services(sandbox, stop)
    finally:
        try:
            sandbox.stop()
        except EdgeweaveError as error:
            err_console.print(f"[bold red]error:[/] stopping the sandbox: {error}")
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    console.print("sandbox stopped", highlight=False)


def _announce_services(sandbox: Any, stop: threading.Event) -> None:
    """Print each Service's reachable address as it appears, until asked to stop."""
    shown: dict[str, str] = {}
    while not stop.is_set():
        try:
            current = sandbox.services()
        except EdgeweaveError:
            current = {}
        for name, where in sorted(current.items()):
            if shown.get(name) != where:
                console.print(f"service {name} at {where}", highlight=False, soft_wrap=True)
        shown = current
        stop.wait(1.0)
