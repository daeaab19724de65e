"""End to end: a pipeline with two gateway replicas behind its Service.

Every request enters through ``status.endpoint``; the Service spreads connections over
both gateway pods, and each pod must get back the results of the requests it sent,
although the last stage has one link to the Service (so to one pod). Each pod's own
``/metrics`` shows that both served.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from e2e_helpers import NS, PIPELINE, PIPELINE_FILE, Cluster, kubectl_apply, wait_for

from edgeweave.operator.resources import pod_ready
from edgeweave.operator.settings import GATEWAY_CONTAINER_PORT
from edgeweave.worker.protocol import decode_infer_response, encode_infer_request

pytest.importorskip("kopf")
pytest.importorskip("onnxruntime")

REQUESTS = 40
GATEWAYS = f"edgeweave.io/pipeline={PIPELINE},edgeweave.io/component=gateway"


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def _served(pod: dict[str, Any]) -> float:
    """Client requests a gateway pod answered with 200, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(f"http://{pod['status']['podIP']}:{GATEWAY_CONTAINER_PORT}/metrics").decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "edgeweave_gateway_requests_total"
               and sample.labels.get("code") == "200")


def _with_two_gateways(tmp_path: Path) -> Path:
    manifest = yaml.safe_load(PIPELINE_FILE.read_text())
    manifest["spec"]["gateway"] = {**manifest["spec"].get("gateway", {}), "replicas": 2}
    path = tmp_path / "mobilenet-two-gateways.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_two_gateway_replicas_each_answer_the_requests_they_receive(
    cluster: Cluster, tmp_path: Path
) -> None:
    started = time.monotonic()
    kubectl_apply(cluster.kubeconfig, _with_two_gateways(tmp_path))
    status = cluster.wait_ready()
    pods = wait_for("two Ready gateway pods", lambda: (
        found if len(found := cluster.pods(GATEWAYS)) == 2 and all(map(pod_ready, found))
        else None))
    print(f"\nFIGURE apply -> Ready with 2 gateway replicas: {time.monotonic() - started:.2f} s")
    assert len({pod["status"]["podIP"] for pod in pods}) == 2
    assert {pod["metadata"]["namespace"] for pod in pods} == {NS}

    endpoint = status["endpoint"]
    metadata = json.loads(_get(f"{endpoint}/v2/models/{PIPELINE}"))
    spec = metadata["inputs"][0]
    shape = [1 if dim == -1 else dim for dim in spec["shape"]]
    output = metadata["outputs"][0]["name"]
    rng = np.random.default_rng(11)
    before = {pod["metadata"]["name"]: _served(pod) for pod in pods}
    answered = 0
    for _ in range(REQUESTS):
        # One connection per request (urllib): the Service picks a pod for each.
        inputs = {spec["name"]: rng.standard_normal(shape).astype(np.float32)}
        body, headers = encode_infer_request(inputs)
        code, payload, reply_headers = _post(
            f"{endpoint}/v2/models/{PIPELINE}/infer", body, headers)
        assert code == 200, payload[:300]
        length = next((v for k, v in reply_headers.items()
                       if k.lower() == "inference-header-content-length"), None)
        assert decode_infer_response(payload, length).outputs[output].shape[0] == 1
        answered += 1

    served = {pod["metadata"]["name"]: _served(pod) - before[pod["metadata"]["name"]]
              for pod in pods}
    print(f"FIGURE requests served per gateway replica: {sorted(served.values())}")
    assert answered == REQUESTS
    assert sum(served.values()) == REQUESTS, served
    assert all(count > 0 for count in served.values()), served
