"""How long `resnetlab` takes to start: wall time of fresh processes, median of several runs.

    python benchmarks/startup.py [--runs 7] [--json]

Goals (issue 15, friction 6): `resnetlab --help` <= 0.5 s, `resnetlab models` <= 1.5 s. The figures are
printed next to the floor (a Python that does nothing) and the cost of `import torch`, which the fast
commands avoid, so they can be read on a busy machine too. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CLI = [sys.executable, "-m", "resnetlab.cli.main"]
#: label -> (command line, goal in seconds or None)
COMMANDS: dict[str, tuple[list[str], float | None]] = {
    "python (floor)": ([sys.executable, "-c", "pass"], None),
    "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
    "resnetlab --help": ([*CLI, "--help"], 0.5),
    "resnetlab --version": ([*CLI, "--version"], 0.5),
    "resnetlab models": ([*CLI, "models"], 1.5),
    "resnetlab models --json": ([*CLI, "models", "--json"], 1.5),
    "resnetlab info resnet50": ([*CLI, "info", "resnet50"], None),
}


def wall_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per command (the median is reported)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {}
    for label, (command, goal) in COMMANDS.items():
        wall_seconds(command)  # warm the file cache
        times = [wall_seconds(command) for _ in range(max(1, args.runs))]
        results[label] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "goal_s": goal}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'command':<28} {'median':>8} {'min':>8}  goal")
    for label, r in results.items():
        verdict = (
            "" if r["goal_s"] is None else f"<= {r['goal_s']} s: {'met' if r['median_s'] <= r['goal_s'] else 'MISSED'}"
        )
        print(f"{label:<28} {r['median_s']:>7.3f}s {r['min_s']:>7.3f}s  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
