"""Models and their shards on disk, content-addressed, for the operator and ``edgeweave run``.

A pipeline's ``spec.model.uri`` is resolved once into a file keyed by its sha256:

* ``zoo:NAME`` is built with seeded weights (the same bytes on every machine);
* ``file:///PATH`` is read in place (hashed, not copied: it may be large);
* ``http://`` / ``https://`` is downloaded once into the cache; a later resolve of the
  same uri, or of any uri with the same ``sha256``, reuses the file.

When the spec gives ``sha256`` the file must match it, whatever its source. The model
is then profiled (cached per model, batch and input shapes), planned by
:func:`plan_pipeline`, and split into shards that are stored under their own sha256,
so a stage pod can be handed ``/shards/<sha256>`` and check what it receives.

Layers are priced by FLOPs, or with ``layer_costs="measured"`` by FLOPs redistributed
by each layer's time in onnxruntime on this machine (:mod:`edgeweave.layertiming`,
:func:`edgeweave.partition.calibrate.calibrate_flops`): the whole model's FLOPs stay
what the nodes' GFLOPS labels were measured against, each layer carries its measured
share. The times are measured once per model and kept on disk.

Layout of the cache directory::

    models/<sha256>/<name>.onnx   # plus <name>.onnx.data for models over 2 GiB
    refs/<sha256 of the uri>.json # uri -> sha256, for zoo builds and downloads
    shards/<sha256>.onnx
    splits/<key>.json             # (model, batch, shapes, layer ranges) -> shard list
    timings/<key>.json            # (model, batch, shapes, chain, threads, onnxruntime,
                                  #  CPU) -> measured seconds per layer

Every write goes to a temporary file first and is renamed into place, so a crash or
two operators sharing the directory never leave a truncated model or shard behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from edgeweave import zoo
from edgeweave.errors import EdgeweaveError
from edgeweave.partition.calibrate import LayerCosts

if TYPE_CHECKING:
    import onnx

    from edgeweave.api.v1alpha1 import InferencePipelineSpec, ModelInput
    from edgeweave.layertiming import LayerTimes
    from edgeweave.partition.costmodel import Node, Plan
    from edgeweave.partition.source import ProfiledModel

CHUNK_BYTES = 1 << 20
ZOO_SEED = 0
"""Seed of the zoo's weights: fixed, so that every replica and every rebuild agree."""
SINGLE_FILE_LIMIT = 2**31 - 2**24
"""Protobuf cannot serialize 2 GiB; larger zoo models keep their weights beside the file."""
PROFILE_CACHE_SIZE = 4
"""Profiled models kept in memory; each holds its weights, so keep few."""
LAYER_COSTS = tuple(costs.value for costs in LayerCosts)
"""How :meth:`ModelStore.profile` prices layers: by FLOP count, or by FLOPs
redistributed by measured time (see the module's docstring)."""
TIMING_THREADS = 1
"""Layer times are taken on one onnxruntime thread, like the GFLOPS labels per core."""

Opener = Callable[[str, float], IO[bytes]]
"""Opens a URL for reading (``urllib.request.urlopen``'s shape); injectable for tests."""


class ModelStoreError(EdgeweaveError):
    """A model that cannot be resolved; subclasses say why."""


class ModelNotFoundError(ModelStoreError, LookupError):
    """An unknown zoo model, a missing file, or an HTTP 404: fix ``spec.model.uri``."""


class ModelUnreachableError(ModelStoreError):
    """A download that failed for a reason that may pass (network, server error)."""


class ChecksumMismatchError(ModelStoreError):
    """The model's sha256 differs from ``spec.model.sha256``."""


class ModelInputError(ModelStoreError, ValueError):
    """``spec.model.inputs`` names an input the model lacks or gives a shape it cannot take."""


class LayerCostsError(ModelStoreError, ValueError):
    """An unknown way of pricing layers (``layer_costs``)."""


@dataclass(frozen=True)
class StoredModel:
    """A resolved model file and its content address."""

    uri: str
    name: str
    sha256: str
    path: Path

    @property
    def size(self) -> int:
        return sum(part.stat().st_size for part in self.files())

    def files(self) -> list[Path]:
        data = self.path.with_name(self.path.name + ".data")
        return [self.path, data] if data.exists() else [self.path]


@dataclass(frozen=True)
class StoredShard:
    """One stage's shard, stored under its sha256."""

    index: int
    first: int
    last: int
    sha256: str
    path: Path
    size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "layers": [self.first, self.last],
            "sha256": self.sha256,
            "size": self.size,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
        }


# --------------------------------------------------------------------------- the store


class ModelStore:
    """Resolves model uris to files, profiles them, and keeps their shards on disk."""

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        download_timeout_s: float = 60.0,
        opener: Opener | None = None,
    ) -> None:
        self.root = Path(cache_dir)
        self.download_timeout_s = download_timeout_s
        self._open_url: Opener = opener or _urlopen
        for folder in ("models", "refs", "shards", "splits", "timings", "tmp"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file_hashes: dict[tuple[str, int, int], str] = {}
        self._profiles: OrderedDict[tuple[Any, ...], ProfiledModel] = OrderedDict()

    # ------------------------------------------------------------------ resolve

    def resolve(self, uri: str, sha256: str | None = None) -> StoredModel:
        """The model file behind ``uri``, checked against ``sha256`` when given."""
        expected = sha256.lower() if sha256 else None
        if uri.startswith(zoo.ZOO_SCHEME):
            stored = self._resolve_zoo(uri)
        elif uri.startswith("file://"):
            stored = self._resolve_file(uri)
        elif uri.startswith(("http://", "https://")):
            stored = self._resolve_http(uri, expected)
        else:
            raise ModelNotFoundError(
                f"spec.model.uri {uri!r}: use zoo:NAME, file:///PATH or an http(s):// URL"
            )
        if expected is not None and stored.sha256 != expected:
            raise ChecksumMismatchError(
                f"model {uri} has sha256 {stored.sha256}, but spec.model.sha256 is {expected}: "
                "fix the checksum or the uri"
            )
        return stored

    def _resolve_zoo(self, uri: str) -> StoredModel:
        try:
            name = zoo.entry(uri).name
        except zoo.UnknownModelError as error:
            raise ModelNotFoundError(f"spec.model.uri {uri!r}: {error}") from None
        ref_key = f"{zoo.ZOO_SCHEME}{name}@seed{ZOO_SEED}"
        cached = self._from_ref(ref_key, uri)
        if cached is not None:
            return cached
        model = zoo.build(name, materialize=True, seed=ZOO_SEED)
        stored = self._store_model_proto(model, name, uri)
        self._write_ref(ref_key, stored)
        return stored

    def _resolve_file(self, uri: str) -> StoredModel:
        path = file_uri_path(uri)
        if not path.is_file():
            raise ModelNotFoundError(
                f"model file {path} (spec.model.uri {uri}) does not exist on the operator's "
                "machine"
            )
        return StoredModel(uri=uri, name=_safe_name(path.stem), sha256=self._hash_file(path),
                           path=path)

    def _resolve_http(self, uri: str, expected: str | None) -> StoredModel:
        name = _name_from_url(uri)
        if expected is not None:
            known = self._model_by_sha(expected, uri)
            if known is not None:
                return known
        cached = self._from_ref(uri, uri)
        if cached is not None and (expected is None or cached.sha256 == expected):
            return cached
        stored = self._download(uri, name)
        self._write_ref(uri, stored)
        return stored

    def _download(self, uri: str, name: str) -> StoredModel:
        digest = hashlib.sha256()
        with self._temp_file(suffix=".onnx") as (handle, temp):
            try:
                with self._open_url(uri, self.download_timeout_s) as response:
                    while chunk := response.read(CHUNK_BYTES):
                        digest.update(chunk)
                        handle.write(chunk)
            except urllib.error.HTTPError as error:
                if error.code in (404, 410):
                    raise ModelNotFoundError(
                        f"spec.model.uri {uri}: the server answered HTTP {error.code} "
                        f"{error.reason}: check the URL"
                    ) from None
                raise ModelUnreachableError(
                    f"cannot download spec.model.uri {uri}: HTTP {error.code} {error.reason}"
                ) from None
            except (urllib.error.URLError, OSError, ValueError) as error:
                reason = getattr(error, "reason", None) or error
                raise ModelUnreachableError(
                    f"cannot download spec.model.uri {uri}: {reason}"
                ) from None
            handle.flush()
            sha = digest.hexdigest()
            return self._adopt_file(temp, sha, name, uri)

    # ------------------------------------------------------------------ profile

    def profile(
        self,
        model: StoredModel,
        *,
        batch: int = 1,
        inputs: Sequence[ModelInput] = (),
        layer_costs: str = "flops",
    ) -> ProfiledModel:
        """The model's layer chain at ``batch``, with ``spec.model.inputs`` applied.

        ``layer_costs="measured"`` prices each layer by its measured share of the
        model's time (:meth:`layer_times`, measured here on first use and then read from
        disk); the chain, names and shards are the same either way.
        """
        if layer_costs not in LAYER_COSTS:
            raise LayerCostsError(
                f"layer costs {layer_costs!r}: use one of {', '.join(LAYER_COSTS)}"
            )
        profiled = self._flop_profile(model, batch=batch, inputs=inputs)
        if layer_costs == "flops":
            return profiled
        key = (model.sha256, profiled.analysis.batch, _dims_key(inputs), layer_costs)
        with self._lock:
            cached = self._profiles.get(key)
            if cached is not None:
                self._profiles.move_to_end(key)
                return cached
        from edgeweave.partition.calibrate import calibrate_flops

        times = self.layer_times(model, profiled)
        calibrated = dataclasses.replace(
            profiled, profile=calibrate_flops(profiled.profile, times.seconds)
        )
        self._remember(key, calibrated)
        return calibrated

    def layer_times(self, model: StoredModel, profiled: ProfiledModel) -> LayerTimes:
        """Seconds per layer of ``profiled``'s chain on this machine, measured once.

        Kept on disk per model file, batch and input shapes, chain of pieces,
        onnxruntime version and CPU, so that a restarted operator does not measure
        again while a pipeline runs on the same machine.
        """
        from edgeweave.layertiming import LayerTimes, measure_layer_times

        path = self._timing_path(model, profiled)
        try:
            cached = LayerTimes.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            cached = None
        if cached is not None and cached.layers == _layer_names(profiled):
            return cached
        times = measure_layer_times(
            profiled.model, profiled.profile, profiled.analysis, threads=TIMING_THREADS,
            external_data_dir=model.path.parent,
        )
        self._atomic_write(path, json.dumps(times.to_dict()).encode())
        return times

    def _timing_path(self, model: StoredModel, profiled: ProfiledModel) -> Path:
        try:
            from onnxruntime import __version__ as runtime
        except ImportError:
            runtime = "none"
        key = _digest(json.dumps(
            [model.sha256, profiled.analysis.batch,
             sorted((name, list(t.shape)) for name, t in profiled.analysis.tensors.items()
                    if name in profiled.analysis.inputs),
             _layer_names(profiled), TIMING_THREADS, runtime, platform.machine(),
             _cpu_name()],
            separators=(",", ":"),
        ))
        return self.root / "timings" / f"{key}.json"

    def _flop_profile(
        self, model: StoredModel, *, batch: int, inputs: Sequence[ModelInput]
    ) -> ProfiledModel:
        key = (model.sha256, batch, _dims_key(inputs))
        with self._lock:
            cached = self._profiles.get(key)
            if cached is not None:
                self._profiles.move_to_end(key)
                return cached
        from edgeweave.partition.chain import DEFAULT_MAX_PIECES, build_chain
        from edgeweave.partition.graph import analyze, load_onnx
        from edgeweave.partition.source import ProfiledModel

        onnx_model = load_onnx(model.path)
        dims, batch = input_dims(onnx_model, inputs, batch)
        analysis = analyze(onnx_model, batch=batch, dims=dims)
        chain = build_chain(analysis, max_pieces=DEFAULT_MAX_PIECES, name=model.name)
        profiled = ProfiledModel(ref=model.uri, profile=chain, analysis=analysis, model=onnx_model)
        self._remember(key, profiled)
        return profiled

    def _remember(self, key: tuple[Any, ...], profiled: ProfiledModel) -> None:
        with self._lock:
            self._profiles[key] = profiled
            while len(self._profiles) > PROFILE_CACHE_SIZE:
                self._profiles.popitem(last=False)

    # ------------------------------------------------------------------ shards

    def shards(
        self, model: StoredModel, profiled: ProfiledModel, plan: Plan
    ) -> list[StoredShard]:
        """One stored shard per stage of ``plan``; splits only what is not on disk yet."""
        ranges = [(stage.first, stage.last) for stage in plan.stages]
        key = _digest(
            json.dumps(
                [model.sha256, profiled.analysis.batch, profiled.profile.name,
                 [layer.name for layer in profiled.profile.layers], ranges],
                separators=(",", ":"),
            )
        )
        index_path = self.root / "splits" / f"{key}.json"
        known = self._read_split(index_path)
        if known is not None:
            return known
        from edgeweave.partition.split import split_by_layers

        pieces = split_by_layers(
            profiled.model, profiled.profile, ranges, external_data_dir=model.path.parent
        )
        stored = [
            self._store_shard(shard.to_bytes(), shard.sha256, shard.index, first, last,
                              shard.inputs, shard.outputs)
            for shard, (first, last) in zip(pieces, ranges, strict=True)
        ]
        self._atomic_write(index_path, json.dumps([s.to_dict() for s in stored]).encode())
        return stored

    def shard_path(self, sha256: str) -> Path | None:
        """The stored shard with this sha256, if any (what the shard server serves)."""
        if re.fullmatch(r"[0-9a-f]{64}", sha256) is None:
            return None
        path = self.root / "shards" / f"{sha256}.onnx"
        return path if path.is_file() else None

    def _store_shard(
        self, data: bytes, sha: str, index: int, first: int, last: int,
        inputs: Sequence[str], outputs: Sequence[str],
    ) -> StoredShard:
        path = self.root / "shards" / f"{sha}.onnx"
        if not path.is_file():
            self._atomic_write(path, data)
        return StoredShard(index, first, last, sha, path, len(data), tuple(inputs), tuple(outputs))

    def _read_split(self, index_path: Path) -> list[StoredShard] | None:
        try:
            entries = json.loads(index_path.read_text())
        except (OSError, ValueError):
            return None
        shards = []
        for entry in entries:
            path = self.shard_path(entry["sha256"])
            if path is None:
                return None  # a shard was removed from the cache: split again
            first, last = entry["layers"]
            shards.append(StoredShard(entry["index"], first, last, entry["sha256"], path,
                                      entry["size"], tuple(entry["inputs"]),
                                      tuple(entry["outputs"])))
        return shards

    # ------------------------------------------------------------------ files

    def _hash_file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._file_hashes.get(key)
        if known is not None:
            return known
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
        sha = digest.hexdigest()
        with self._lock:
            self._file_hashes[key] = sha
        return sha

    def _store_model_proto(self, model: onnx.ModelProto, name: str, uri: str) -> StoredModel:
        import onnx

        if model.ByteSize() < SINGLE_FILE_LIMIT:
            data = model.SerializeToString(deterministic=True)
            with self._temp_file(suffix=".onnx") as (handle, temp):
                handle.write(data)
                handle.flush()
                return self._adopt_file(temp, _digest_bytes(data), name, uri)
        # Too large for one protobuf: weights go to NAME.onnx.data; the address covers both.
        staging = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        target = staging / f"{name}.onnx"
        onnx.save(model, target, save_as_external_data=True,
                  location=f"{name}.onnx.data", size_threshold=1024)
        digest = hashlib.sha256()
        for part in (target, target.with_name(target.name + ".data")):
            with part.open("rb") as handle:
                while chunk := handle.read(CHUNK_BYTES):
                    digest.update(chunk)
        sha = digest.hexdigest()
        final = self.root / "models" / sha
        if not final.exists():
            with contextlib.suppress(OSError):
                os.replace(staging, final)
        return StoredModel(uri=uri, name=name, sha256=sha, path=final / f"{name}.onnx")

    def _adopt_file(self, temp: Path, sha: str, name: str, uri: str) -> StoredModel:
        folder = self.root / "models" / sha
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{name}.onnx"
        if not final.is_file():
            os.replace(temp, final)
        return StoredModel(uri=uri, name=name, sha256=sha, path=final)

    def _model_by_sha(self, sha: str, uri: str) -> StoredModel | None:
        folder = self.root / "models" / sha
        candidates = sorted(folder.glob("*.onnx")) if folder.is_dir() else []
        if not candidates:
            return None
        path = candidates[0]
        return StoredModel(uri=uri, name=path.stem, sha256=sha, path=path)

    def _from_ref(self, key: str, uri: str) -> StoredModel | None:
        try:
            ref = json.loads(self._ref_path(key).read_text())
        except (OSError, ValueError):
            return None
        path = self.root / "models" / ref["sha256"] / f"{ref['name']}.onnx"
        if not path.is_file():
            return None
        return StoredModel(uri=uri, name=ref["name"], sha256=ref["sha256"], path=path)

    def _write_ref(self, key: str, stored: StoredModel) -> None:
        body = json.dumps({"uri": key, "sha256": stored.sha256, "name": stored.name})
        self._atomic_write(self._ref_path(key), body.encode())

    def _ref_path(self, key: str) -> Path:
        return self.root / "refs" / f"{_digest(key)}.json"

    @contextlib.contextmanager
    def _temp_file(self, suffix: str) -> Iterator[tuple[IO[bytes], Path]]:
        descriptor, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        temp = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                yield handle, temp
        finally:
            temp.unlink(missing_ok=True)

    def _atomic_write(self, path: Path, data: bytes) -> None:
        with self._temp_file(suffix=path.suffix) as (handle, temp):
            handle.write(data)
            handle.flush()
            os.replace(temp, path)


# --------------------------------------------------------------------------- planning


def plan_pipeline(
    profiled: ProfiledModel, nodes: Sequence[Node], spec: InferencePipelineSpec
) -> Plan:
    """The planner's best plan for ``spec``'s objective and limits on ``nodes``."""
    from edgeweave.partition.planner import plan

    return plan(
        profiled.profile,
        nodes,
        objective=spec.objective.value,
        target_period_s=spec.target_period_seconds,
        max_stages=spec.max_stages,
        replicas=spec.replicas.allow,
        max_replicas=spec.replicas.max,
    )


def model_metadata(profiled: ProfiledModel, name: str) -> dict[str, Any]:
    """What the gateway answers to ``GET /v2/models/{name}`` (Open Inference Protocol).

    Shapes are the model's declared ones, ``-1`` for a symbolic axis, since every
    shard keeps the model's symbolic dimensions.
    """
    import numpy as np
    from onnx import helper

    from edgeweave.worker.protocol import datatype_of

    graph = profiled.model.graph
    weights = {init.name for init in graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
        return {"name": value.name, "datatype": datatype_of(dtype), "shape": shape}

    return {
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [describe(v) for v in graph.input if v.name not in weights],
        "outputs": [describe(v) for v in graph.output],
    }


def input_dims(
    model: onnx.ModelProto, inputs: Sequence[ModelInput], batch: int
) -> tuple[dict[str, int], int]:
    """``spec.model.inputs`` as the profiler's named dimensions (and the batch they imply).

    Each override gives an input's full shape; its symbolic axes become named sizes, its
    fixed axes must agree with the model, and an unnamed symbolic first axis is the batch.
    """
    declared = {v.name: v for v in model.graph.input}
    dims: dict[str, int] = {}
    for position, override in enumerate(inputs):
        where = f"spec.model.inputs[{position}]"
        value = declared.get(override.name)
        if value is None:
            names = ", ".join(sorted(declared)) or "none"
            raise ModelInputError(
                f"{where}.name: the model has no input {override.name!r} (its inputs: {names})"
            )
        axes = list(value.type.tensor_type.shape.dim)
        if len(axes) != len(override.shape):
            raise ModelInputError(
                f"{where}.shape: input {override.name!r} has {len(axes)} dimensions, "
                f"the override gives {len(override.shape)}"
            )
        for axis, (dim, size) in enumerate(zip(axes, override.shape, strict=True)):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                if dim.dim_value != size:
                    raise ModelInputError(
                        f"{where}.shape[{axis}]: input {override.name!r} fixes this dimension "
                        f"to {dim.dim_value}, the override says {size}"
                    )
            elif dim.dim_param:
                dims[dim.dim_param] = size
            elif axis == 0:
                batch = size
            else:
                raise ModelInputError(
                    f"{where}.shape[{axis}]: input {override.name!r} has an unnamed dynamic "
                    "dimension here that only the batch may fill"
                )
    return dims, batch


# --------------------------------------------------------------------------- helpers


def model_uri(ref: str) -> str:
    """A command line's model argument (``zoo:NAME``, a URI or a path) as a model uri."""
    if ref.startswith((zoo.ZOO_SCHEME, "file://", "http://", "https://")):
        return ref
    return Path(ref).resolve().as_uri()


def file_uri_path(uri: str) -> Path:
    """``file:///abs/model.onnx`` → ``/abs/model.onnx`` (``file://rel`` is relative)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc and parsed.netloc != "localhost":
        return Path(urllib.parse.unquote(parsed.netloc + parsed.path))
    return Path(urllib.parse.unquote(parsed.path))


def _urlopen(url: str, timeout: float) -> IO[bytes]:
    request = urllib.request.Request(url, headers={"User-Agent": "edgeweave-modelstore"})
    return urllib.request.urlopen(request, timeout=timeout)


def _name_from_url(uri: str) -> str:
    stem = Path(urllib.parse.urlparse(uri).path).stem
    return _safe_name(stem) if stem else "model"


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return cleaned or "model"


def _dims_key(inputs: Sequence[ModelInput]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((item.name, tuple(item.shape)) for item in inputs)


def _layer_names(profiled: ProfiledModel) -> tuple[str, ...]:
    return tuple(layer.name for layer in profiled.profile.layers)


def _cpu_name() -> str:
    """The processor's name: layer times from another CPU would give other shares."""
    from edgeweave.nodeprofile import cpu_model

    return cpu_model() or "unknown"


def _digest(text: str) -> str:
    return _digest_bytes(text.encode())


def _digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

