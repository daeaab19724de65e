"""How closely emulated edge nodes match what they were asked for (root only).

For each requested link rate, a bulk TCP transfer host->node, node->host and
node->node; for each requested CPU share, spinning processes inside a node report the
CPU time they got per wall second. Prints a table; ``--json PATH`` also writes it.

    sudo .venv/bin/python benchmarks/emulate.py [--rates 10,80,400,1000] \
        [--cpus 0.25,0.5,1.0,1.5] [--seconds 2] [--json benchmarks/results/emulate.json]

The machine's other load shows up in the CPU figures (a quota is a ceiling, not a
reservation), so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgeweave.local import EdgeEmulator, NodeSpec, emulation_available
from edgeweave.local.emulate import cpu_share, processes_to_saturate, transfer_rate


def measure_bandwidth(rate_mbps: float, seconds: float) -> dict[str, Any]:
    rate = rate_mbps * 1e6 / 8
    nbytes = max(4 * 2**20, int(rate * seconds))
    specs = [NodeSpec(name, cpu=2.0, bandwidth_bytes_per_s=rate) for name in ("a", "b")]
    with EdgeEmulator(specs) as emu:
        a, b = emu.node("a"), emu.node("b")
        achieved = {
            "host->node": transfer_rate(emu, None, a, nbytes),
            "node->host": transfer_rate(emu, a, None, nbytes),
            "node->node": transfer_rate(emu, a, b, nbytes),
        }
    return {
        "requested_mbps": rate_mbps,
        "bytes": nbytes,
        **{path: value * 8 / 1e6 for path, value in achieved.items()},
    }


def measure_cpu(cpu: float, seconds: float) -> dict[str, Any]:
    processes = processes_to_saturate(cpu)
    with EdgeEmulator([NodeSpec("n", cpu=cpu)]) as emu:
        achieved = cpu_share(emu.node("n"), seconds, processes)
    return {
        "requested_cores": cpu,
        "processes": processes,
        "achieved_cores": achieved,
        "load_average_1m": os.getloadavg()[0],
    }


def print_tables(bandwidth: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> None:
    print("link rate (Mbit/s): requested vs achieved (bulk TCP, receiver-side)")
    print(f"{'requested':>10} {'host->node':>11} {'node->host':>11} {'node->node':>11}")
    for row in bandwidth:
        print(
            f"{row['requested_mbps']:>10.0f} {row['host->node']:>11.1f} "
            f"{row['node->host']:>11.1f} {row['node->node']:>11.1f}"
        )
    print("\nCPU (cores): requested vs achieved (CPU seconds per wall second)")
    print(f"{'requested':>10} {'achieved':>9} {'procs':>6} {'load1m':>7}")
    for row in cpu:
        print(
            f"{row['requested_cores']:>10.2f} {row['achieved_cores']:>9.3f} "
            f"{row['processes']:>6} {row['load_average_1m']:>7.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="10,80,400,1000", help="Mbit/s, comma-separated")
    parser.add_argument("--cpus", default="0.25,0.5,1.0,1.5", help="cores, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    available, reason = emulation_available()
    if not available:
        sys.exit(f"cannot emulate nodes here: {reason}")
    bandwidth = [measure_bandwidth(float(r), args.seconds) for r in args.rates.split(",")]
    cpu = [measure_cpu(float(c), args.seconds) for c in args.cpus.split(",")]
    print_tables(bandwidth, cpu)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "cpu": cpu}, indent=2) + "\n")


if __name__ == "__main__":
    main()
