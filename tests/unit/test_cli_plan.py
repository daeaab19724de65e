"""``edgeweave plan`` as a user runs it: outputs, the plot, and one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from edgeweave.cli import main
from edgeweave.cli.output import console, err_console

PIPEEDGE_NODES = "examples/nodes-pipeedge-16.yaml"
VIT_BASE = "examples/profiles/profile-vit-base-patch16-224.yaml"


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as a wide terminal shows them, so that cells are not folded mid-word."""
    monkeypatch.setattr(console, "width", 250)
    monkeypatch.setattr(err_console, "width", 250)


def run(
    args: list[str], repo_root: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, str, str]:
    monkeypatch.chdir(repo_root)
    monkeypatch.setattr(sys, "argv", ["edgeweave", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cli(repo_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    return lambda *args: run(list(args), repo_root, capsys, monkeypatch)


# ------------------------------------------------------------------ PipeEdge data


def test_json_plan_of_vit_base_on_pipeedge_testbed_is_consistent(cli) -> None:
    code, out, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "json")
    assert code == 0
    plan = json.loads(out)
    for key in ("period_s", "throughput_per_s", "latency_s", "stages", "bottleneck_stage"):
        assert key in plan
    assert plan["throughput_per_s"] == pytest.approx(1 / plan["period_s"])
    stages = plan["stages"]
    # The stages cover layers 0..47 in order, without gaps or overlaps.
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 47
    for before, after in itertools.pairwise(stages):
        assert after["layers"][0] == before["layers"][1] + 1
    for stage in stages:
        for key in ("layers", "nodes", "in_bytes", "out_bytes", "memory_bytes", "period_s"):
            assert key in stage
        assert stage["nodes"]
    assert plan["period_s"] == pytest.approx(max(s["period_s"] for s in stages))
    assert stages[plan["bottleneck_stage"]]["period_s"] == pytest.approx(plan["period_s"])
    used = [name for stage in stages for name in stage["nodes"]]
    assert len(used) == len(set(used)) <= 16
    assert stages[0]["in_bytes"] == 4816896


def test_yaml_output_is_the_same_plan(cli) -> None:
    _, as_json, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "json")
    _, as_yaml, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "yaml")
    assert yaml.safe_load(as_yaml)["period_s"] == pytest.approx(json.loads(as_json)["period_s"])


def test_no_replicas_gives_one_node_per_stage_and_no_better_period(cli) -> None:
    _, free, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "json")
    _, single, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "json",
                       "--no-replicas")
    single_plan = json.loads(single)
    assert all(len(stage["nodes"]) == 1 for stage in single_plan["stages"])
    assert single_plan["period_s"] >= json.loads(free)["period_s"] * (1 - 1e-9)


def test_max_stages_is_respected(cli) -> None:
    _, out, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "-o", "json",
                    "--max-stages", "2")
    assert len(json.loads(out)["stages"]) <= 2


def test_table_marks_the_bottleneck_and_summarises(cli) -> None:
    code, out, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES)
    assert code == 0
    assert "bottleneck" in out
    assert "period" in out and "throughput" in out and "latency" in out
    assert "the best single node" in out
    assert "l0" in out and "l47" in out  # layer names of the first and last stage


def test_compare_lists_every_baseline(cli) -> None:
    code, out, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "--compare")
    assert code == 0
    for name in ("equal_layers", "memory_proportional", "pipeedge_dp", "pico_greedy"):
        assert name in out


def test_plot_writes_a_png(cli, tmp_path: Path) -> None:
    target = tmp_path / "plan.png"
    code, _, _ = cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES,
                     "--plot", str(target), "-o", "json")
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000


def test_skipped_nodes_are_listed(cli, tmp_path: Path) -> None:
    nodes = yaml.safe_load(Path(PIPEEDGE_NODES).read_text())
    nodes["items"][0]["status"]["conditions"][0]["status"] = "False"
    nodes["items"][1]["spec"] = {"unschedulable": True}
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(nodes))
    code, out, _ = cli("plan", "--profile", VIT_BASE, "--nodes", str(path))
    assert code == 0
    assert "skipped node mb-0" in out and "skipped node mb-1" in out
    _, as_json, _ = cli("plan", "--profile", VIT_BASE, "--nodes", str(path), "-o", "json")
    used = {name for stage in json.loads(as_json)["stages"] for name in stage["nodes"]}
    assert not used & {"mb-0", "mb-1"}


# ------------------------------------------------------------------ zoo model


def test_zoo_model_on_the_pi_example(cli) -> None:
    code, out, err = cli("plan", "zoo:resnet50", "--nodes", "examples/nodes-pi4-mixed.yaml",
                         "-o", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert math.isfinite(plan["period_s"]) and plan["period_s"] > 0
    used = {name for stage in plan["stages"] for name in stage["nodes"]}
    assert "pi4-4g-3" not in used  # NotReady in the example


def test_measured_layer_costs_price_the_same_model_by_its_timed_layers(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEWEAVE_CACHE_DIR", str(tmp_path / "cache"))
    args = ("plan", "zoo:mobilenet_v2", "--nodes", "examples/nodes-pi4-mixed.yaml", "-o", "json",
            "--no-replicas")
    code, by_flops, err = cli(*args)
    assert code == 0, err
    code, by_time, err = cli(*args, "--layer-costs", "measured")
    assert code == 0, err
    flops_plan, timed_plan = json.loads(by_flops), json.loads(by_time)
    # The same work, priced per layer by its timed share: the cuts move.
    assert ([s["layers"] for s in timed_plan["stages"]]
            != [s["layers"] for s in flops_plan["stages"]])
    assert list((tmp_path / "cache" / "timings").glob("*.json")), "timed once, then cached"


def test_measured_layer_costs_do_not_apply_to_a_measured_profile(cli) -> None:
    _expect_one_line_error(
        cli("plan", "--profile", VIT_BASE, "--nodes", PIPEEDGE_NODES, "--layer-costs",
            "measured"),
        "--layer-costs measured applies to MODEL")


# ------------------------------------------------------------------ errors


def _expect_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    code, out, err = result
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert out == ""


def _nodes_with_label(
    tmp_path: Path, label: str, value: str | None, *, on_every_node: bool = False
) -> str:
    """PipeEdge's nodes with ``label`` set to ``value`` (``None``: removed) on mb-3, or
    on every node; the path of the file written."""
    nodes = yaml.safe_load(Path(PIPEEDGE_NODES).read_text())
    for item in nodes["items"] if on_every_node else [nodes["items"][3]]:
        labels = item["metadata"]["labels"]
        if value is None:
            labels.pop(label)
        else:
            labels[label] = value
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(nodes))
    return str(path)


def test_non_numeric_label(cli, tmp_path: Path) -> None:
    nodes = _nodes_with_label(tmp_path, "edgeweave.io/memory-mb", "two gigs")
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", nodes),
                           "mb-3", "edgeweave.io/memory-mb", "two gigs")


def test_missing_memory(cli, tmp_path: Path) -> None:
    nodes = _nodes_with_label(tmp_path, "edgeweave.io/memory-mb", None)
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", nodes),
                           "mb-3", "memory")


def test_profile_class_no_node_has(cli, tmp_path: Path) -> None:
    nodes = _nodes_with_label(tmp_path, "edgeweave.io/device-class", "rpi4", on_every_node=True)
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", nodes),
                           "Minnowboard-E3845", "rpi4", "device-class")


def test_node_class_the_profile_lacks(cli, tmp_path: Path) -> None:
    nodes = _nodes_with_label(tmp_path, "edgeweave.io/device-class", "Jetson")
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", nodes),
                           "mb-3", "Jetson")


def test_flops_model_on_nodes_without_gflops(cli) -> None:
    _expect_one_line_error(cli("plan", "zoo:resnet50", "--nodes", PIPEEDGE_NODES),
                           "edgeweave.io/gflops")


def test_no_usable_node(cli, tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", str(path)),
                           "no Kubernetes Node objects")


def test_not_node_objects(cli, tmp_path: Path) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", str(path)),
                           "no Kubernetes Node objects", "Pod")


def test_no_feasible_plan(cli, tmp_path: Path) -> None:
    nodes = _nodes_with_label(tmp_path, "edgeweave.io/memory-mb", "16", on_every_node=True)
    _expect_one_line_error(cli("plan", "--profile", VIT_BASE, "--nodes", nodes))


def test_model_and_profile_together_or_neither(cli) -> None:
    _expect_one_line_error(cli("plan", "zoo:resnet50", "--profile", VIT_BASE,
                               "--nodes", PIPEEDGE_NODES), "not both")
    _expect_one_line_error(cli("plan", "--nodes", PIPEEDGE_NODES), "not neither")


def test_bad_profile_file(cli, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("input_bytes: 10\nlayers:\n- {name: a, out_bytes: 1, time_s: {x: 1}}\n")
    _expect_one_line_error(cli("plan", "--profile", str(path), "--nodes", PIPEEDGE_NODES),
                           "layer 0 ('a')", "mem_bytes")


def test_missing_node_file(cli, tmp_path: Path) -> None:
    _expect_one_line_error(
        cli("plan", "--profile", VIT_BASE, "--nodes", str(tmp_path / "absent.yaml")),
        "absent.yaml",
    )
