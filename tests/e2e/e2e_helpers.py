"""What the end-to-end tests do to a sandbox: apply, wait, load, inspect processes.

Every wait polls for a condition with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeweave.sandbox.sandbox import Sandbox
from edgeweave.sandbox.waiting import wait_until as wait_for

MANIFESTS = Path(__file__).resolve().parent / "manifests"
NODES_FILE = MANIFESTS / "nodes-3x1cpu.yaml"
PIPELINE_FILE = MANIFESTS / "mobilenet.yaml"
PIPELINE = "mobilenet"
NS = "default"
API = "edgeweave.io/v1alpha1"
KIND = "InferencePipeline"
READY_TIMEOUT_S = 120.0
"""Generous: the first test builds the zoo model into the shared cache."""




def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` in the process tree, now."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kubectl_apply(kubeconfig: Path, manifest: Path) -> None:
    """``kubectl apply -f`` when kubectl is installed, else the same through the client."""
    if shutil.which("kubectl"):
        subprocess.run(["kubectl", "apply", "-f", str(manifest)], check=True, timeout=60,
                       capture_output=True, env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        return
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        for document in yaml.safe_load_all(manifest.read_text()):
            if not document:
                continue
            group, version = document["apiVersion"].split("/")
            kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
                group, version, document["metadata"].get("namespace", NS),
                "inferencepipelines", document)
    finally:
        client.close()


def kubectl_delete_pipeline(kubeconfig: Path, name: str) -> None:
    """``kubectl delete ipl NAME`` (without waiting), or the same through the client."""
    if shutil.which("kubectl"):
        subprocess.run(["kubectl", "delete", "ipl", name, "--wait=false"], check=True,
                       timeout=60, capture_output=True,
                       env={**os.environ, "KUBECONFIG": str(kubeconfig)})
        return
    import kubernetes

    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    try:
        group, version = API.split("/")
        kubernetes.client.CustomObjectsApi(client).delete_namespaced_custom_object(
            group, version, NS, "inferencepipelines", name)
    finally:
        client.close()


@dataclass
class Load:
    """``edgeweave bench`` at a fixed concurrency in a thread, with answer timestamps."""

    url: str
    model: str
    concurrency: int = 4
    answers: list[tuple[float, int, int]] = field(default_factory=list)
    """(monotonic time, answers so far, errors so far) after every answer."""
    result: Any = None
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        from edgeweave.bench import Bench, BenchOptions

        self.bench = Bench(
            BenchOptions(url=self.url, model=self.model, concurrency=self.concurrency,
                         duration_s=3600.0, timeout_s=60.0),
            progress=lambda answered, errors: self.answers.append(
                (time.monotonic(), answered, errors)),
        )
        self.thread = threading.Thread(target=self._run, name="bench", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.bench.run()
        except BaseException as error:  # reported by stop()
            self.failure = error

    def start(self) -> Load:
        self.thread.start()
        return self

    @property
    def count(self) -> int:
        return self.answers[-1][1] if self.answers else 0

    def wait_answers(self, more: int, timeout: float = 60.0) -> None:
        """Until ``more`` answers beyond the current count have come back."""
        target = self.count + more
        wait_for(f"{more} more answers", lambda: self.count >= target or self.failure,
                 timeout)
        assert self.failure is None, f"the load client failed: {self.failure!r}"

    def stop(self) -> Any:
        self.bench.stop()
        self.thread.join(120)
        assert not self.thread.is_alive(), "the load client did not stop"
        assert self.failure is None, f"the load client failed: {self.failure!r}"
        return self.result

    def first_answer_sent_after(self, moment: float, answered_then: int) -> float:
        """Seconds from ``moment`` to the first answer of a request sent after it.

        At most ``concurrency`` requests were outstanding at ``moment``, and each
        worker sends its next request only after its answer, so the answer numbered
        ``answered_then + concurrency + 1`` is to a request sent after ``moment``.
        """
        wanted = answered_then + self.concurrency + 1
        stamp = next(t for t, answered, _ in self.answers if answered >= wanted)
        return stamp - moment


@dataclass
class Cluster:
    """One running sandbox and what the tests ask of it."""

    sandbox: Sandbox

    @property
    def kubeconfig(self) -> Path:
        return self.sandbox.kubeconfig

    def pipeline(self, name: str = PIPELINE) -> dict[str, Any] | None:
        return self.sandbox.api.get(API, KIND, name, NS)

    def status(self, name: str = PIPELINE) -> dict[str, Any]:
        return (self.pipeline(name) or {}).get("status") or {}

    def condition(self, kind: str, name: str = PIPELINE) -> dict[str, Any]:
        conditions = self.status(name).get("conditions") or []
        return next((c for c in conditions if c["type"] == kind), {})

    def wait_ready(self, name: str = PIPELINE, timeout: float = READY_TIMEOUT_S,
                   other_than: str | None = None) -> dict[str, Any]:
        """The status once the pipeline is Ready (on a plan other than ``other_than``)."""
        def ready() -> dict[str, Any] | None:
            status = self.status(name)
            plan_hash = (status.get("plan") or {}).get("hash")
            ok = self.condition("Ready", name).get("status") == "True"
            return status if ok and plan_hash != other_than else None

        try:
            return wait_for(f"{name} to be Ready", ready, timeout)
        except AssertionError as error:
            condition = self.condition("Ready", name)
            pods = {p["metadata"]["name"]: (p.get("status") or {}).get("phase")
                    for p in self.pods()}
            raise AssertionError(f"{error}\nReady condition: {condition.get('reason')}: "
                                 f"{condition.get('message')}\npods: {pods}") from None

    def pods(self, selector: str | None = None) -> list[dict[str, Any]]:
        return self.sandbox.api.list("v1", "Pod", NS, selector)

    def owned(self, api_version: str, kind: str, name: str = PIPELINE) -> list[dict[str, Any]]:
        return self.sandbox.api.list(api_version, kind, NS, f"edgeweave.io/pipeline={name}")

    def events(self, reason: str, name: str = PIPELINE) -> list[dict[str, Any]]:
        return [e for e in self.sandbox.api.list("v1", "Event", NS)
                if e.get("involvedObject", {}).get("name") == name and e.get("reason") == reason]

    def gateway_node(self, name: str = PIPELINE) -> str:
        pods = self.pods(f"edgeweave.io/pipeline={name},edgeweave.io/component=gateway")
        nodes = {p["spec"].get("nodeName") for p in pods}
        assert len(nodes) == 1, f"expected one gateway pod, got {pods}"
        return str(nodes.pop())
