"""Seconds per layer of a model on this CPU, from onnxruntime's own profiler.

:func:`edgeweave.partition.calibrate.calibrate_flops` needs each piece's share of the
model's time. Timing each piece as its own shard would take one session per piece;
instead one session runs the whole model with ``enable_profiling`` and the same
session options as a stage worker, and each kernel's ``dur`` is summed into the piece
its ONNX nodes belong to.

onnxruntime optimizes the graph first, so the kernels are not the ONNX nodes:

* a fused kernel carries the name of one node it absorbed, often with a suffix
  (``layer1.0.relu_nchwc`` is Conv + BatchNormalization + Relu, named after the Relu;
  ``...scores/MatMulScaleFusion/``). Such a name resolves to the longest node name it
  starts with: the kernel's *anchor*.
* nodes that no kernel names were folded into an anchor: each is given to the
  nearest anchor among its consumers (fusions are named after their last node), else
  among its producers. An anchor's time is split over itself and the nodes folded
  into it in proportion to their FLOPs, so a convolution cut from its BatchNorm
  still lands in the convolution's piece.
* kernels that name no node at all (``ReorderInput``, ``BiasGelu_token_12``) are
  layout changes or fusions onnxruntime named itself; their time goes with the
  kernel that ran just before them (the one that made their input), and
  :attr:`LayerTimes.by_order_s` says how much time was placed this way.

Only the shares matter downstream, so the small executor overhead between kernels
(1 - :attr:`LayerTimes.kernel_share` of a run) is reported, not spread.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeweave.errors import EdgeweaveError
from edgeweave.partition.costmodel import ModelProfile
from edgeweave.partition.graph import GraphAnalysis

WARMUP_RUNS = 2
"""The first run allocates arenas and picks kernels; the second settles caches."""
DEFAULT_RUNS = 10
"""Timed runs: each layer's figure is its median over these, so that a neighbour's
burst of load in one run moves no layer's figure."""
MIN_LAYER_SECONDS = 1e-6
"""The profiler's resolution (1 µs): a piece whose nodes onnxruntime folded away
entirely costs less than this, and the calibration needs every time positive."""
KERNEL_SUFFIX = "_kernel_time"
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class LayerTimingError(EdgeweaveError):
    """A model that cannot be timed here: no onnxruntime, no weights, a foreign profile."""


@dataclass(frozen=True)
class LayerTimes:
    """Measured seconds per layer of one model's chain, on one CPU."""

    model: str
    layers: tuple[str, ...]
    """The chain's layer names, in order (what the figures belong to)."""
    seconds: tuple[float, ...]
    """Per layer: median seconds per inference over the timed runs."""
    run_s: float
    """Median seconds of a whole inference as the profiler saw it."""
    kernel_share: float
    """Median over runs of the run's kernel time over its whole time: how much of an
    inference the per-layer figures account for (the rest is the executor's own)."""
    runs: int
    threads: int
    by_order_s: float
    """Seconds per inference of kernels that named no node, placed by execution order."""
    onnxruntime: str
    """The onnxruntime version that ran the kernels."""

    @property
    def kernel_s(self) -> float:
        return sum(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerTimes:
        return cls(
            model=str(data["model"]),
            layers=tuple(str(name) for name in data["layers"]),
            seconds=tuple(float(value) for value in data["seconds"]),
            run_s=float(data["run_s"]),
            kernel_share=float(data["kernel_share"]),
            runs=int(data["runs"]),
            threads=int(data["threads"]),
            by_order_s=float(data["by_order_s"]),
            onnxruntime=str(data["onnxruntime"]),
        )


def measure_layer_times(
    model: onnx.ModelProto,
    profile: ModelProfile,
    analysis: GraphAnalysis,
    *,
    threads: int = 1,
    runs: int = DEFAULT_RUNS,
    warmup_runs: int = WARMUP_RUNS,
    external_data_dir: Path | None = None,
) -> LayerTimes:
    """Time every layer of ``profile`` (a chain built from ``model`` and ``analysis``).

    ``model`` must carry its weights (inline, or external in ``external_data_dir``);
    it runs at the batch and input shapes ``analysis`` was made for, on ``threads``
    onnxruntime threads with a stage worker's session options.
    """
    if threads < 1 or runs < 1 or warmup_runs < 0:
        raise LayerTimingError(
            f"threads and runs must be at least 1 and warm-up runs at least 0, not "
            f"{threads}, {runs} and {warmup_runs}"
        )
    attribution = _Attribution(profile, analysis)
    feed = _zero_feed(analysis)
    kernels, run_seconds, version = _profiled_runs(
        model, feed, threads=threads, runs=runs, warmup_runs=warmup_runs,
        external_data_dir=external_data_dir, label=profile.name,
    )
    attribution.learn_anchors(kernels)
    per_run = [attribution.layer_seconds(run) for run in kernels]
    seconds = tuple(
        max(statistics.median(run[layer] for run in per_run), MIN_LAYER_SECONDS)
        for layer in range(len(profile.layers))
    )
    by_order = statistics.median(attribution.by_order_seconds(run) for run in kernels)
    share = statistics.median(
        sum(duration for _, duration in run) / max(whole, MIN_LAYER_SECONDS)
        for run, whole in zip(kernels, run_seconds, strict=True)
    )
    return LayerTimes(
        model=profile.name,
        layers=tuple(layer.name for layer in profile.layers),
        seconds=seconds,
        run_s=statistics.median(run_seconds),
        kernel_share=share,
        runs=runs,
        threads=threads,
        by_order_s=by_order,
        onnxruntime=version,
    )


# --------------------------------------------------------------------------- running


Kernel = tuple[str, float]
"""A kernel's name as the profiler writes it (without ``_kernel_time``) and its seconds."""


def _profiled_runs(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    threads: int,
    runs: int,
    warmup_runs: int,
    external_data_dir: Path | None,
    label: str,
) -> tuple[list[list[Kernel]], list[float], str]:
    """The kernels of each timed run in execution order, each run's seconds, the version."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LayerTimingError(
            "timing layers needs onnxruntime: pip install 'edgeweave[worker]'"
        ) from None
    with tempfile.TemporaryDirectory(prefix="edgeweave-layertiming-") as folder:
        from edgeweave.worker.stage import session_options  # the stage's own settings

        options = session_options(ort, threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        if external_data_dir is not None:
            options.add_session_config_entry(EXTERNAL_DATA_FOLDER_KEY, str(external_data_dir))
        try:
            session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for _ in range(warmup_runs + runs):
                session.run(None, dict(feed))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else repr(exc)
            raise LayerTimingError(
                f"model {label!r} cannot run in onnxruntime to time its layers (does it "
                f"carry its weights?): {first_line}"
            ) from None
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels, seconds = _split_runs(events)
    if len(kernels) < warmup_runs + runs:
        raise LayerTimingError(
            f"onnxruntime's profile of {label!r} holds {len(kernels)} runs, not "
            f"{warmup_runs + runs}: this onnxruntime writes a profile edgeweave cannot read"
        )
    return kernels[warmup_runs:], seconds[warmup_runs:], str(ort.__version__)


def _split_runs(events: Sequence[Mapping[str, Any]]) -> tuple[list[list[Kernel]], list[float]]:
    """Kernel events grouped by the ``model_run`` event whose time span holds them."""
    windows = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    kernels: list[list[Kernel]] = [[] for _ in windows]
    starts = [start for start, _ in windows]
    nodes = sorted(
        (e for e in events
         if e.get("cat") == "Node" and str(e.get("name", "")).endswith(KERNEL_SUFFIX)),
        key=lambda e: float(e["ts"]),
    )
    run = 0
    for event in nodes:
        ts = float(event["ts"])
        while run + 1 < len(starts) and ts >= starts[run + 1]:
            run += 1
        if windows and starts[run] <= ts <= windows[run][1]:
            kernels[run].append((str(event["name"])[: -len(KERNEL_SUFFIX)],
                                 float(event["dur"]) / 1e6))
    return kernels, [(end - start) / 1e6 for start, end in windows]


def _zero_feed(analysis: GraphAnalysis) -> dict[str, np.ndarray]:
    """Zeros at the analysed shapes: convolution and matmul kernels do not look at values."""
    from onnx import helper

    feed = {}
    for name in analysis.inputs:
        tensor = analysis.tensors[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        feed[name] = np.zeros(tensor.shape, dtype=dtype)
    return feed


# --------------------------------------------------------------------------- attribution


class _Attribution:
    """Which layers a kernel's time belongs to, and in what shares."""

    def __init__(self, profile: ModelProfile, analysis: GraphAnalysis) -> None:
        self.n_layers = len(profile.layers)
        self.layer_of: dict[str, int] = {}
        for index, layer in enumerate(profile.layers):
            if not layer.onnx_nodes:
                raise LayerTimingError(
                    f"model {profile.name!r}: layer {index} ({layer.name!r}) lists no ONNX "
                    "nodes: only a profile built from an ONNX model can be timed"
                )
            for node in layer.onnx_nodes:
                self.layer_of[node] = index
        self.nodes = {node.name: node for node in analysis.nodes}
        unknown = sorted(set(self.layer_of) - set(self.nodes))
        if unknown:
            raise LayerTimingError(
                f"model {profile.name!r}: layer node {unknown[0]!r} is not in the analysed "
                "graph: the profile and the model do not belong together"
            )
        self._anchor_cache: dict[str, str | None] = {}
        self._shares: dict[str, dict[int, float]] = {}

    def learn_anchors(self, runs: Sequence[Sequence[Kernel]]) -> None:
        """Fold every node no kernel names into an anchor that some kernel names."""
        anchors = {a for run in runs for name, _ in run if (a := self.anchor(name)) is not None}
        self._shares = self._split_by_flops(self._groups(anchors))

    # ------------------------------------------------------------------ per run

    def layer_seconds(self, run: Sequence[Kernel]) -> list[float]:
        """Seconds per layer in one run."""
        seconds = [0.0] * self.n_layers
        for anchor, duration in self._anchored(run):
            for layer, share in self._shares[anchor].items():
                seconds[layer] += duration * share
        return seconds

    def by_order_seconds(self, run: Sequence[Kernel]) -> float:
        return sum(duration for name, duration in run if self.anchor(name) is None)

    def _anchored(self, run: Sequence[Kernel]) -> list[tuple[str, float]]:
        """Each kernel with its anchor; unnamed kernels take the previous kernel's."""
        anchors = [self.anchor(name) for name, _ in run]
        known = [a for a in anchors if a is not None]
        if not known:
            raise LayerTimingError(
                "no kernel in onnxruntime's profile names a node of the model: cannot "
                "tell which layer ran when"
            )
        placed: list[tuple[str, float]] = []
        current = known[0]
        for anchor, (_, duration) in zip(anchors, run, strict=True):
            current = anchor if anchor is not None else current
            placed.append((current, duration))
        return placed

    # ------------------------------------------------------------------ kernel names

    def anchor(self, kernel: str) -> str | None:
        """The node a kernel's name stands for: itself, or the longest node name it extends."""
        if kernel not in self._anchor_cache:
            self._anchor_cache[kernel] = self._resolve(kernel)
        return self._anchor_cache[kernel]

    def _resolve(self, kernel: str) -> str | None:
        if kernel in self.layer_of:
            return kernel
        for end in range(len(kernel) - 1, 0, -1):
            if kernel[end] in "_/" and kernel[:end] in self.layer_of:
                return kernel[:end]
        return None

    # ------------------------------------------------------------------ folded nodes

    def _groups(self, anchors: set[str]) -> dict[str, list[str]]:
        """Each anchor with the nodes folded into it (itself first)."""
        consumers: dict[str, list[str]] = {}
        producer: dict[str, str] = {}
        for node in self.nodes.values():
            for tensor in node.outputs:
                producer[tensor] = node.name
        for node in self.nodes.values():
            for tensor in node.inputs:
                if tensor in producer:
                    consumers.setdefault(producer[tensor], []).append(node.name)
        producers = {
            name: [producer[t] for t in node.inputs if t in producer]
            for name, node in self.nodes.items()
        }
        groups: dict[str, list[str]] = {anchor: [anchor] for anchor in sorted(anchors)}
        for name in self.layer_of:
            if name in anchors:
                continue
            target = _nearest(name, consumers, anchors) or _nearest(name, producers, anchors)
            if target is not None:
                groups[target].append(name)
        return groups

    def _split_by_flops(self, groups: Mapping[str, list[str]]) -> dict[str, dict[int, float]]:
        shares: dict[str, dict[int, float]] = {}
        for anchor, members in groups.items():
            flops = [self.nodes[m].flops for m in members]
            total = sum(flops)
            weights = flops if total > 0 else [1.0] * len(members)
            whole = sum(weights)
            split: dict[int, float] = {}
            for member, weight in zip(members, weights, strict=True):
                layer = self.layer_of[member]
                split[layer] = split.get(layer, 0.0) + weight / whole
            shares[anchor] = split
        return shares


def _nearest(start: str, edges: Mapping[str, list[str]], anchors: set[str]) -> str | None:
    """The first anchor a breadth-first walk along ``edges`` from ``start`` reaches."""
    seen = {start}
    queue = deque(edges.get(start, ()))
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        if name in anchors:
            return name
        seen.add(name)
        queue.extend(edges.get(name, ()))
    return None
