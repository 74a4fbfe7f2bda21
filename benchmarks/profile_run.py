"""Wall time of every node of one ``kedro run``, from Kedro's node hooks, as a markdown table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/profile_run.py [--env base] [--pipeline __default__]
        [--params compression.budget=0.3,...] [--output profile.md]

Runs the pipeline in this project (it writes new versions under data/ and one MLflow run, like
``kedro run``) with a timing hook registered beside the project's own, then prints one row per
node — seconds between ``before_node_run`` and ``after_node_run`` (inputs loaded, outputs not yet
saved), the same plus its dataset loads and saves, and the share of the run — sorted by time,
followed by the per-pipeline totals, the run's wall time and the process's peak RSS. ``--output``
also writes the table to a file (for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")

from kedro.framework.hooks import hook_impl  # noqa: E402
from kedro.framework.session import KedroSession  # noqa: E402
from kedro.framework.startup import bootstrap_project  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class NodeTimer:
    """Seconds per node: compute (before → after node run) and I/O (its dataset loads/saves)."""

    def __init__(self) -> None:
        self.compute: dict[str, float] = {}
        self.io: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self._io_started: dict[tuple[str, str], float] = {}

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        self.compute[node.name] = time.perf_counter() - self._started.pop(node.name)

    @hook_impl
    def before_dataset_loaded(self, dataset_name: str, node: Any) -> None:
        self._io_started[(node.name, dataset_name)] = time.perf_counter()

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        started = self._io_started.pop((node.name, dataset_name), None)
        if started is not None:
            self.io[node.name] += time.perf_counter() - started

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._io_started[(node.name, dataset_name)] = time.perf_counter()

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        started = self._io_started.pop((node.name, dataset_name), None)
        if started is not None:
            self.io[node.name] += time.perf_counter() - started


def parse_params(text: str | None) -> dict[str, Any]:
    """``a.b=1,c=x`` → nested runtime parameters (values parsed as YAML scalars)."""
    import yaml

    params: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        *parents, leaf = key.strip().split(".")
        target = params
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    return params


def profile_table(timer: NodeTimer, wall: float) -> str:
    """The markdown table of :class:`NodeTimer`'s measurements, slowest node first."""
    rows = sorted(timer.compute, key=lambda name: -(timer.compute[name] + timer.io[name]))
    lines = [
        "| node | compute s | + load/save s | share of run |",
        "|---|---:|---:|---:|",
    ]
    for name in rows:
        total = timer.compute[name] + timer.io[name]
        lines.append(f"| {name} | {timer.compute[name]:.1f} | {total:.1f} | {total / wall:.1%} |")
    groups: dict[str, float] = defaultdict(float)
    for name in rows:
        groups[name.split(".")[0] if "." in name else name] += timer.compute[name] + timer.io[name]
    lines += ["", "| node group | seconds |", "|---|---:|"]
    lines += [
        f"| {group} | {seconds:.1f} |"
        for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1])
    ]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += [
        "",
        f"Run wall time {wall:.1f} s (nodes {sum(timer.compute.values()):.1f} s, their "
        f"loads/saves {sum(timer.io.values()):.1f} s); peak RSS {peak_mb:,.0f} MB.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=None)
    parser.add_argument("--pipeline", default="__default__")
    parser.add_argument("--params", default=None, help="runtime params, a.b=1,c=2")
    parser.add_argument("--output", type=Path, default=None)
    arguments = parser.parse_args()
    bootstrap_project(PROJECT_ROOT)
    timer = NodeTimer()
    started = time.perf_counter()
    with KedroSession.create(
        project_path=PROJECT_ROOT, env=arguments.env, runtime_params=parse_params(arguments.params)
    ) as session:
        session._hook_manager.register(timer)
        session.run(pipeline_names=[arguments.pipeline])
    table = profile_table(timer, time.perf_counter() - started)
    print(table)
    if arguments.output is not None:
        arguments.output.write_text(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
