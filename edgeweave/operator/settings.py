"""Every knob of the operator, in one place: names, ports, images, timeouts.

Kubernetes-facing names (finalizer, annotation prefixes, labels) are part of the
contract with objects already in a cluster: changing one orphans what an older
operator wrote, so they are constants here and nowhere else. Deployment-specific
values (ports, images, the URL pods use to reach the shard server) come from
:class:`OperatorConfig`, which reads the environment the Helm chart sets.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeweave import __version__
from edgeweave.errors import EdgeweaveError
from edgeweave.partition.calibrate import LayerCosts

if TYPE_CHECKING:
    import kopf

# --------------------------------------------------------------------- kopf persistence

FINALIZER = "edgeweave.io/finalizer"
"""Held on every InferencePipeline so that deletion waits for the operator's cleanup."""

PERSISTENCE_PREFIX = "edgeweave.io"
"""Prefix of the annotations where kopf keeps handler progress (``edgeweave.io/<id>``)."""

DIFFBASE_KEY = "last-handled-configuration"
"""Annotation (under :data:`PERSISTENCE_PREFIX`) holding the last handled spec."""

# --------------------------------------------------------------------- labels

LABEL_PIPELINE = "edgeweave.io/pipeline"
LABEL_STAGE = "edgeweave.io/stage"
LABEL_PLAN_HASH = "edgeweave.io/plan-hash"
LABEL_REVISION = "edgeweave.io/revision"
"""Plan hash plus everything else a stage pod is made from (image, resources):
objects of one revision are created together and retired together."""
LABEL_COMPONENT = "edgeweave.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "edgeweave"

COMPONENT_STAGE = "stage"
COMPONENT_GATEWAY = "gateway"

ANNOTATION_SHARD_SHA256 = "edgeweave.io/shard-sha256"
ANNOTATION_MEMORY_BYTES = "edgeweave.io/memory-bytes"
ANNOTATION_TEMPLATE_HASH = "edgeweave.io/template-hash"
ANNOTATION_STAGE0 = "edgeweave.io/stage0-revision"

# --------------------------------------------------------------------- data plane

WORKER_PORT = 9000
"""Port every stage worker listens on (``/v1/stream``, ``/healthz``, ``/readyz``)."""
GATEWAY_CONTAINER_PORT = 8080
SHARD_SERVER_PORT = 8081
TOKEN_KEY = "token"
"""Key of the pipeline token in its Secret."""
TOKEN_MOUNT = "/var/run/edgeweave/token"
PLAN_MOUNT = "/etc/edgeweave/plan"
STAGE0_MOUNT = "/etc/edgeweave/stage0"
STAGE0_KEY = "stage0.json"
ROUTE_PUSH_TIMEOUT_S = 2.0
"""How long the operator waits for a gateway pod to confirm a new stage-0 route."""
ROUTE_PUSH_GRACE_S = 90.0
"""How long the operator keeps trying to reach a gateway pod before it trusts kubelet
to deliver the rewritten route ConfigMap instead (its sync period is about a minute)."""
API_KEY_MOUNT = "/var/run/edgeweave/api-key"
METADATA_KEY = "metadata.json"
PLAN_KEY = "plan.json"
RUN_AS_USER = 65532
"""The images' unprivileged user (uid 65532, created in the Dockerfile's shared runtime
stage): no pod needs root."""
DEFAULT_WORKER_IMAGE = f"ghcr.io/edgeweave/worker:{__version__}"

# --------------------------------------------------------------------- timing

WATCH_SERVER_TIMEOUT_S = 300.0
"""Longest single watch request; the API server closes it earlier if it likes."""
WATCH_CLIENT_TIMEOUT_S = 330.0
WATCH_CONNECT_TIMEOUT_S = 10.0
RESYNC_INTERVAL_S = 30.0
"""How often a pipeline's watcher re-checks its objects when nothing wakes it."""
ROLLOUT_POLL_S = 5.0
"""Re-check interval while a rollout waits on pods, in case a pod event was missed."""
TEMPORARY_RETRY_DELAY_S = 30.0
"""Delay before kopf retries a reconcile that failed for a passing reason."""
DAEMON_CANCELLATION_BACKOFF_S = 2.0
"""How long a pipeline's watcher may take to finish its pass when asked to stop."""
DAEMON_CANCELLATION_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class OperatorConfig:
    """Deployment-specific settings, read from the environment by :meth:`from_env`."""

    cache_dir: Path
    shard_listen_host: str = "0.0.0.0"
    shard_port: int = SHARD_SERVER_PORT
    shard_base_url: str = f"http://edgeweave-operator.edgeweave-system.svc:{SHARD_SERVER_PORT}"
    """How stage pods reach this operator's shard server (a Service in front of it)."""
    worker_image: str = DEFAULT_WORKER_IMAGE
    image_pull_policy: str = "IfNotPresent"
    resync_interval_s: float = RESYNC_INTERVAL_S
    download_timeout_s: float = 60.0
    cluster_domain: str = "cluster.local"
    route_push_grace_s: float = ROUTE_PUSH_GRACE_S
    layer_costs: LayerCosts = LayerCosts.measured
    """How layers are priced: ``measured`` (each layer's share of the model's time in
    onnxruntime on the operator's CPU, measured once per model and cached) or ``flops``."""
    gateway_service_type: str = "ClusterIP"
    """``LoadBalancer`` where one exists (K3s ServiceLB, MetalLB, the sandbox): then
    ``status.endpoint`` is the load balancer's address."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        """The configuration the Helm chart sets through ``EDGEWEAVE_*`` variables."""
        env = os.environ if environ is None else environ
        namespace = env.get("POD_NAMESPACE", "edgeweave-system")
        port = int(env.get("EDGEWEAVE_SHARD_PORT", SHARD_SERVER_PORT))
        service = env.get("EDGEWEAVE_SERVICE_NAME", "edgeweave-operator")
        cache = env.get("EDGEWEAVE_CACHE_DIR") or str(
            Path(env.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeweave"
        )
        return cls(
            cache_dir=Path(cache),
            shard_listen_host=env.get("EDGEWEAVE_SHARD_HOST", "0.0.0.0"),
            shard_port=port,
            shard_base_url=env.get(
                "EDGEWEAVE_SHARD_URL", f"http://{service}.{namespace}.svc:{port}"
            ).rstrip("/"),
            worker_image=env.get("EDGEWEAVE_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
            image_pull_policy=env.get("EDGEWEAVE_IMAGE_PULL_POLICY", "IfNotPresent"),
            resync_interval_s=float(env.get("EDGEWEAVE_RESYNC_SECONDS", RESYNC_INTERVAL_S)),
            download_timeout_s=float(env.get("EDGEWEAVE_DOWNLOAD_TIMEOUT_SECONDS", 60.0)),
            cluster_domain=env.get("EDGEWEAVE_CLUSTER_DOMAIN", "cluster.local"),
            route_push_grace_s=float(env.get("EDGEWEAVE_ROUTE_PUSH_GRACE_SECONDS",
                                             ROUTE_PUSH_GRACE_S)),
            layer_costs=_layer_costs(env.get("EDGEWEAVE_LAYER_COSTS", LayerCosts.measured)),
            gateway_service_type=env.get("EDGEWEAVE_GATEWAY_SERVICE_TYPE", "ClusterIP"),
        )


def configure_kopf(settings: kopf.OperatorSettings) -> None:
    """Apply edgeweave's persistence names and watch timeouts to kopf's settings."""
    import kopf

    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=PERSISTENCE_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PERSISTENCE_PREFIX, key=DIFFBASE_KEY
    )
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT_S
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT_S
    settings.watching.connect_timeout = WATCH_CONNECT_TIMEOUT_S
    settings.background.cancellation_polling = 1.0


def _layer_costs(value: str) -> LayerCosts:
    try:
        return LayerCosts(value)
    except ValueError:
        raise EdgeweaveError(
            f"EDGEWEAVE_LAYER_COSTS={value!r}: use one of "
            f"{', '.join(costs.value for costs in LayerCosts)}"
        ) from None
