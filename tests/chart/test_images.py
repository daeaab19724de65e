"""The container images: the Dockerfile's ``operator`` target (the operator and the node
profiler) and its ``worker`` target (stage worker and gateway), built from one shared
build stage.

No Docker engine runs here, so the images are checked by what decides whether they
build and run: the Dockerfile is parsed (each target with what it inherits from its
parent stages), every file it copies must exist and survive .dockerignore, both
targets install from one build stage on python:3.11-slim and run as the user the pods
run as, the worker image carries no Kubernetes client, the install guide builds each
image from its own target, and the commands the chart and the operator give each image
resolve in an environment installed the same way (fast: with kopf and kubernetes made
unimportable; slow: a fresh virtualenv built from the emulated build context exactly
as the Dockerfile's RUN lines do).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_render import CHART_DIR, REPO, objects, of_kind, pod_spec_of
from packaging.requirements import Requirement

from edgeweave.api.v1alpha1 import InferencePipelineSpec
from edgeweave.operator import resources as r
from edgeweave.operator import settings as s

DOCKERFILE = REPO / "Dockerfile"
TARGETS = ["operator", "worker"]
INSTALL_GUIDE = REPO / "docs" / "install.md"
BASE_IMAGE = "python:3.11-slim"
KUBERNETES_CLIENTS = {"kopf", "kubernetes"}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]["name"]


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    parent: Stage | None = None
    """The earlier stage this one is built ``FROM``, whose instructions it inherits."""
    instructions: list[Instruction] = field(default_factory=list)

    def lineage(self) -> list[Stage]:
        """This stage and the stages it is built on, the first-built first."""
        return [*(self.parent.lineage() if self.parent else []), self]

    @property
    def image(self) -> str:
        """The image the whole lineage starts from."""
        return self.lineage()[0].base

    def all(self, keyword: str) -> list[Instruction]:
        """What the image holds: inherited instructions first, in build order."""
        return [i for stage in self.lineage() for i in stage.instructions
                if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The instruction in effect (USER, ENTRYPOINT, CMD: the last one wins)."""
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def instructions(path: Path) -> Iterator[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        yield Instruction(keyword.upper(), arguments.strip())


def stages(path: Path) -> list[Stage]:
    """The build stages, with global ARG defaults substituted into each FROM and each
    stage built on an earlier one linked to it."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions(path):
        if instruction.keyword == "ARG" and not found:
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
        elif instruction.keyword == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)],
                           instruction.arguments).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            parent = next((stage for stage in found if stage.name == words[0]), None)
            found.append(Stage(base=words[0], name=name, parent=parent))
        elif found:
            found[-1].instructions.append(instruction)
    return found


def target(name: str) -> Stage:
    """The stage ``docker build --target name`` makes."""
    (stage,) = [stage for stage in stages(DOCKERFILE) if stage.name == name]
    return stage


def install_run(image: Stage) -> Instruction:
    (install,) = [run for run in image.all("RUN") if "pip install" in run.arguments]
    return install


def build_stage_of(image: Stage) -> Stage:
    """The stage whose wheels the image installs (its ``--mount=...,from=`` stage)."""
    match = re.search(r"--mount=type=bind,from=([\w-]+)", install_run(image).arguments)
    assert match, f"{image.name} does not install from a bind mount of a build stage"
    return target(match.group(1))


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.arguments)
    assert isinstance(value, list), f"{instruction.keyword} must use the exec (JSON) form"
    return value


def copy_sources(instruction: Instruction) -> list[str]:
    """The build-context sources of a COPY (none when it copies from another stage)."""
    words = shlex.split(instruction.arguments)
    flags = [w for w in words if w.startswith("--")]
    if any(flag.startswith("--from=") for flag in flags):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1]


def pip_spec(stage: Stage, command: str) -> str:
    """The requirement a stage's RUN hands to ``pip <command>`` (e.g. ``.[worker]``)."""
    for run in stage.all("RUN"):
        match = re.search(rf"pip {command}\b[^\"]*\"([^\"]+)\"", run.arguments)
        if match:
            return match.group(1)
    raise AssertionError(f"stage {stage.name} has no `pip {command}`")


def extras_of(spec: str) -> set[str]:
    match = re.fullmatch(r"(?:\.|[\w-]+)\[([\w,-]+)\]", spec)
    assert match, f"unexpected requirement {spec!r}"
    return set(match.group(1).split(","))


# --------------------------------------------------------------------------- .dockerignore


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool


def ignore_patterns(path: Path) -> list[IgnorePattern]:
    """.dockerignore as BuildKit reads it (moby's patternmatcher): comments dropped,
    patterns cleaned and made relative; ``!`` re-includes; the last match wins."""
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        text = os.path.normpath(line[1:] if exclusion else line).lstrip("/")
        patterns.append(IgnorePattern(re.compile(_glob_regex(text)), exclusion))
    return patterns


def _glob_regex(pattern: str) -> str:
    out, i = "^", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(char), i + 1
    return out + "$"


def in_context(relative: str, patterns: list[IgnorePattern]) -> bool:
    """Whether the build context holds ``relative`` (moby's MatchesOrParentMatches)."""
    parents = relative.split("/")[:-1]
    candidates = [relative, *("/".join(parents[: i + 1]) for i in range(len(parents)))]
    excluded = False
    for pattern in patterns:
        if pattern.exclusion != excluded:
            continue
        if any(pattern.regex.match(candidate) for candidate in candidates):
            excluded = not pattern.exclusion
    return not excluded


def context_files(patterns: list[IgnorePattern]) -> Iterator[str]:
    """Every file of the repository the build context holds (.git and .venv unvisited)."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in {".git", ".venv"})
        for name in sorted(files):
            relative = (Path(root) / name).relative_to(REPO).as_posix()
            if in_context(relative, patterns):
                yield relative


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", TARGETS)
def test_images_are_multi_stage_on_slim_python(name: str) -> None:
    image = target(name)
    build = build_stage_of(image)
    assert image.image == build.image == BASE_IMAGE
    assert build not in image.lineage(), "the build stage's tools stay out of the image"
    # The build stage makes wheels; the image installs them from a bind mount of the
    # build stage, offline, so no compiler, wheel or cache reaches the final image.
    assert "--no-index" in install_run(image).arguments
    assert extras_of(pip_spec(image, "install")) <= extras_of(pip_spec(build, "wheel"))


def test_both_images_share_the_build_stage_and_the_runtime_base() -> None:
    images = [target(name) for name in TARGETS]
    assert len({build_stage_of(image).name for image in images}) == 1
    bases = {image.lineage()[0].name for image in images}
    assert len(bases) == 1 and None not in bases
    # `docker build .` without --target makes the last stage: the operator, as before.
    assert stages(DOCKERFILE)[-1].name == "operator"


@pytest.mark.parametrize("name", TARGETS)
def test_images_run_as_the_user_the_pods_run_as(name: str) -> None:
    image = target(name)
    user = image.last("USER")
    assert user.arguments == f"{s.RUN_AS_USER}:{s.RUN_AS_USER}", "numeric, for runAsNonRoot"
    (creates_user,) = [run for run in image.all("RUN") if "useradd" in run.arguments]
    assert f"--uid {s.RUN_AS_USER} --gid {s.RUN_AS_USER}" in creates_user.arguments
    # pip installs into the system site-packages, which only root may write.
    built = [i for stage in image.lineage() for i in stage.instructions]
    assert built.index(install_run(image)) < built.index(user)
    chart_users = {pod_spec_of(w)["securityContext"]["runAsUser"]
                   for w in objects({"nodeProfiler": {"enabled": True}})
                   if w["kind"] in {"Deployment", "DaemonSet"}}
    assert chart_users == {s.RUN_AS_USER}


@pytest.mark.parametrize("name", TARGETS)
def test_entrypoint_is_the_edgeweave_console_script(name: str) -> None:
    assert exec_form(target(name).last("ENTRYPOINT")) == ["edgeweave"]
    assert "edgeweave" in PYPROJECT["project"]["scripts"]


def test_the_install_guide_builds_each_image_from_its_target() -> None:
    """The buildx commands users copy: the chart's operator image from ``--target
    operator``, its worker image from ``--target worker``, both from the Dockerfile."""
    text = re.sub(r"\\\n\s*", " ", INSTALL_GUIDE.read_text())
    builds = [shlex.split(line) for line in text.splitlines()
              if line.startswith("docker buildx build ")]
    built = {}
    for argv in builds:
        assert "-f" not in argv and "--file" not in argv, "one Dockerfile, at the root"
        target_name = argv[argv.index("--target") + 1]
        repository = argv[argv.index("-t") + 1].rpartition(":")[0]
        built[repository] = target(target_name).name
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert built == {values["image"]["repository"]: "operator",
                     values["workerImage"]["repository"]: "worker"}


def test_every_copied_file_exists_and_is_in_the_build_context() -> None:
    patterns = ignore_patterns(REPO / ".dockerignore")
    copied = [src for stage in stages(DOCKERFILE) for copy in stage.instructions
              if copy.keyword == "COPY" for src in copy_sources(copy)]
    assert copied
    for source in copied:
        path = REPO / source
        assert path.exists(), f"the Dockerfile copies {source}, which does not exist"
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            assert in_context(relative, patterns), f".dockerignore leaves out {relative}"

def test_the_build_context_is_only_what_the_images_copy() -> None:
    patterns = ignore_patterns(REPO / ".dockerignore")
    context = list(context_files(patterns))
    assert "pyproject.toml" in context and "edgeweave/cli/__init__.py" in context
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "edgeweave"}, tops
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]


def test_dockerignore_matching_follows_docker() -> None:
    """The matcher above, on the cases that decide what our .dockerignore means."""
    patterns = [IgnorePattern(re.compile(_glob_regex(p)), ex) for p, ex in (
        ("*", False), ("edgeweave", True), ("**/__pycache__", False))]
    assert in_context("edgeweave/cli/x.py", patterns)
    assert not in_context("edgeweave/cli/__pycache__/x.pyc", patterns)
    assert not in_context("tests/chart/test_images.py", patterns)
    assert not in_context("edgeweave.egg-info/PKG-INFO", patterns)


# --------------------------------------------------------------------------- dependencies


def _requirements(extras: set[str]) -> list[Requirement]:
    """The project's requirements with ``extras``, self-references (edgeweave[...]) expanded."""
    wanted, seen, found = set(extras), set(), list[Requirement]()
    found += [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    while wanted - seen:
        extra = (wanted - seen).pop()
        seen.add(extra)
        for text in PYPROJECT["project"]["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if requirement.name == PROJECT:
                wanted |= requirement.extras
            else:
                found.append(requirement)
    return found


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution those requirements pull in, as installed in this environment."""
    names: set[str] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        if name in names:
            continue
        names.add(name)
        extras = {"", *requirement.extras}
        for text in metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(dependency)
    return names


def _image_extras(name: str) -> set[str]:
    return extras_of(pip_spec(target(name), "install"))


def test_the_worker_image_carries_no_kubernetes_client() -> None:
    extras = _image_extras("worker")
    assert extras == {"worker"}
    closure = _closure(_requirements(extras))
    assert {"onnxruntime", "aiohttp", "prometheus-client", "onnx", "numpy"} <= closure
    assert closure & KUBERNETES_CLIENTS == set(), "nothing pulls in kopf or kubernetes"


def test_the_operator_image_carries_what_the_operator_and_profiler_need() -> None:
    closure = _closure(_requirements(_image_extras("operator")))
    # kopf and the client for the operator; onnx and numpy to plan and split; onnxruntime
    # and the client for `profile-node --apply`, which the chart's DaemonSet runs.
    assert {"kopf", "kubernetes", "aiohttp", "onnx", "numpy", "onnxruntime"} <= closure


# --------------------------------------------------------------------------- commands


def _worker_rollout() -> r.Rollout:
    spec = InferencePipelineSpec.model_validate({"model": {"uri": "zoo:resnet50"}})
    stages_ = (r.StageLayout(index=0, nodes=("pi-0",), shard=r.StageShard("0" * 64, 2**20)),)
    return r.Rollout(ref=r.PipelineRef("p", "default", "uid"), spec=spec, plan_hash="0" * 16,
                     stages=stages_, config=s.OperatorConfig(cache_dir=Path("/cache")))


def worker_image_commands() -> list[list[str]]:
    """What runs in the worker image: the operator's stage and gateway containers, and
    the image's own default command."""
    rollout = _worker_rollout()
    objects = (*r.stage_objects(rollout), r.gateway_deployment(rollout, rollout.revision))
    containers = [pod_spec_of(o)["containers"][0]
                  for o in objects
                  if o["kind"] in {"Pod", "Deployment"}]
    commands = [[*c["command"], c["args"][0], "--help"] for c in containers]
    image = target("worker")
    commands.append(exec_form(image.last("ENTRYPOINT")) + exec_form(image.last("CMD")))
    return commands


def operator_image_commands() -> list[list[str]]:
    """What runs in the operator image: the chart's operator and profiler containers."""
    rendered = objects({"nodeProfiler": {"enabled": True}})
    image = target("operator")
    entrypoint = exec_form(image.last("ENTRYPOINT"))
    commands = [[*entrypoint, pod_spec_of(w)["containers"][0]["args"][0], "--help"]
                for w in [*of_kind(rendered, "Deployment"), *of_kind(rendered, "DaemonSet")]]
    commands.append([*entrypoint, *exec_form(image.last("CMD")), "--help"])
    return commands


BLOCK_KUBERNETES = """
import importlib.abc, sys

class WorkerImage(importlib.abc.MetaPathFinder):
    # The worker image has neither package: importing one must fail here as it would there.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"kopf", "kubernetes"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, WorkerImage())
for module in list(sys.modules):
    if module.partition(".")[0] in {"kopf", "kubernetes"}:
        del sys.modules[module]
"""


def _console_script(argv: list[str], *, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (``edgeweave ...``) through the console script's entry point."""
    module, _, function = PYPROJECT["project"]["scripts"][argv[0]].partition(":")
    code = (f"{prelude}\nimport sys\nsys.argv = {argv!r}\n"
            f"from {module} import {function}\n{function}()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_worker_commands_run_without_a_kubernetes_client() -> None:
    commands = worker_image_commands()
    assert {c[1] for c in commands} >= {"worker", "gateway"}
    for argv in commands:
        done = _console_script(argv, prelude=BLOCK_KUBERNETES)
        assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"
    modules = "edgeweave.worker.stage, edgeweave.worker.gateway, edgeweave.cli.worker"
    done = _console_script(["edgeweave", "--help"],
                           prelude=BLOCK_KUBERNETES + f"\nimport {modules}\n")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_kubernetes_client_blocker_works() -> None:
    """The control for the test above: the operator needs kopf, so it must fail here."""
    done = _console_script(["edgeweave", "operator"], prelude=BLOCK_KUBERNETES)
    assert done.returncode == 1
    assert "needs kopf and kubernetes" in done.stderr


def test_operator_image_commands_resolve() -> None:
    commands = operator_image_commands()
    assert {c[1] for c in commands} == {"operator", "profile-node"}
    for argv in commands:
        done = _console_script(argv)
        assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"


# --------------------------------------------------------------------------- fresh install


def _build_context(destination: Path) -> Path:
    """What `docker build .` sends: the repository through .dockerignore."""
    patterns = ignore_patterns(REPO / ".dockerignore")
    for relative in context_files(patterns):
        copied = destination / relative
        copied.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, copied)
    return destination


def _copy_into_workdir(stage: Stage, context: Path, workdir: Path) -> None:
    """The stage's COPY lines, from the emulated context into its WORKDIR (Docker's rules:
    a directory's contents go into the destination; several sources, or a destination
    ending in /, make the destination a directory)."""
    for copy in stage.all("COPY"):
        *sources, dest = [w for w in shlex.split(copy.arguments) if not w.startswith("--")]
        into = workdir / dest
        for source in sources:
            origin = context / source
            if origin.is_dir():
                shutil.copytree(origin, into, dirs_exist_ok=True)
            elif dest.endswith("/") or len(sources) > 1:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into / origin.name)
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, **kwargs)
    assert done.returncode == 0, f"{argv}: {done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", TARGETS)
def test_image_installs_and_its_commands_run_in_a_fresh_environment(
    name: str, tmp_path: Path
) -> None:
    """A target replayed: wheels built from the build context as the shared build stage
    builds them, installed offline into an empty virtualenv as the target installs
    them, then every command the image is given, run."""
    image = target(name)
    build = build_stage_of(image)
    workdir = tmp_path / "src"
    workdir.mkdir()
    _copy_into_workdir(build, _build_context(tmp_path / "context"), workdir)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels),
          pip_spec(build, "wheel")], cwd=workdir)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
          str(wheels), pip_spec(image, "install")])

    is_worker = name == "worker"
    commands = worker_image_commands() if is_worker else operator_image_commands()
    for argv in commands:
        _run([str(env_dir / "bin" / argv[0]), *argv[1:]])
    probe = "import importlib.util as u, json; print(json.dumps(" \
            "{m: u.find_spec(m) is not None for m in ['kopf', 'kubernetes', 'onnxruntime']}))"
    found = json.loads(_run([str(python), "-c", probe]).stdout)
    assert found == {"kopf": not is_worker, "kubernetes": not is_worker, "onnxruntime": True}
