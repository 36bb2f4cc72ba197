"""Two simulated nodes x 2 ranks (stress/nodes.py): what a small node costs the job, and what one budget
agreement costs. Prints a table.

Each run is the job of tests/test_two_nodes.py (96 samples of 1 to 50 MiB, batches up to a cost of 160,
one worker per rank, 2 epochs, every sample's content checked) under torchrun on two nodes of this
machine, each with its own network namespace, memory cgroup and /dev/shm. The cases go round by round,
so that drift on a busy machine hits all of them:

- ``equal``: both nodes 4 GiB of memory and 1 GiB of /dev/shm;
- ``small-b``: node B with 1.5 GiB of memory (issue 25's small node).

Per case: the runs that completed as one plan, the job's images/s (samples of both epochs over the
slowest rank's time in its epochs), OOM kills, the mean batch size, the agreements per rank and epoch,
the median time a rank spent in an agreement during the epochs (waiting for the slowest rank included)
and the median of 20 agreements made back to back after the epochs, every rank ready (the collective
alone: one all-reduce of two float64 over gloo across the veth pair).

    sudo .venv/bin/python tests/benchmarks/two_nodes.py [--rounds 3] [--picture docs/img/two-nodes.png]  # ~1 min

Needs root (namespaces, cgroups); says why and exits 2 where nodes cannot be made.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from stress.nodes import NodeSpec, nodes_available, run_nodes  # noqa: E402

MiB, GiB = 2**20, 2**30
SCRIPT = os.path.join(REPO, "tests", "ranks", "node_ranks.py")
SAMPLES, EPOCHS = 96, 2
CASES = {"equal": [NodeSpec(4 * GiB, 1 * GiB), NodeSpec(4 * GiB, 1 * GiB)],
         "small-b": [NodeSpec(4 * GiB, 1 * GiB), NodeSpec(1536 * MiB, 1 * GiB)]}


def one_run(nodes: List[NodeSpec]) -> Dict[str, Any]:
    results = run_nodes([SCRIPT, "--max-mib", "50", "--max-cost", "160", "--hang-after", "75",
                         "--time-agreements", "20"], nodes, timeout=100, after_failure_s=15)
    ranks = [rank for r in results for rank in r.ranks]
    completed = all(r.returncode == 0 for r in results) and len(ranks) == 4 and all(r["done"] for r in ranks)
    out: Dict[str, Any] = {"completed": completed, "oom_kills": sum(r.oom_kills or 0 for r in results),
                           "timelines": [(rank["node"], rank["rank"], rank.get("timeline", [])) for rank in ranks],
                           "limits": [spec.memory_bytes for spec in nodes]}
    if completed:
        slowest = max(sum(e["seconds"] for e in rank["epochs"]) for rank in ranks)
        batches = sum(e["batches"] for rank in ranks for e in rank["epochs"])
        during = [a["seconds"] for rank in ranks for a in rank["agreements"] if a.get("seconds") is not None]
        out.update(images_per_s=SAMPLES * EPOCHS / slowest, mean_batch=SAMPLES * EPOCHS / batches,
                   agreements=len(ranks[0]["agreements"]) / EPOCHS,
                   during_ms=1e3 * statistics.median(during) if during else None,
                   alone_ms=1e3 * statistics.median(rank["agreement_s"] for rank in ranks))
    return out


def draw(run: Dict[str, Any], path: str) -> None:
    """Each node's memory (as its ranks read it after each batch) and the budget every rank holds, over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = min(t for _, _, timeline in run["timelines"] for t, _, _ in timeline)
    fig, (memory, budget) = plt.subplots(2, 1, sharex=True, figsize=(8, 5.5))
    colours = {0: "tab:blue", 1: "tab:orange"}
    for node, limit in enumerate(run["limits"]):
        memory.axhline(limit / MiB, color=colours[node], linestyle="--", linewidth=1,
                       label=f"node {'AB'[node]}'s limit ({limit / GiB:.1f} GiB)")
    for node, rank, timeline in run["timelines"]:
        times = [t - start for t, _, _ in timeline]
        memory.plot(times, [used / MiB for _, used, _ in timeline], color=colours[node], marker=".",
                    linewidth=1, label=f"node {'AB'[node]}, read by rank {rank}")
        budget.step(times, [cost for _, _, cost in timeline], where="post", color=colours[node], linewidth=1,
                    alpha=0.7, label=f"rank {rank} (node {'AB'[node]})")
    memory.set_ylabel("memory used (MiB)")
    memory.legend(fontsize=7, loc="upper right", ncol=2)
    budget.set_ylabel("max_cost after each batch")
    budget.set_xlabel("seconds")
    budget.set_ylim(bottom=0)
    budget.legend(fontsize=7, loc="lower right", ncol=2)
    memory.set_title("Two nodes x 2 ranks: each node's memory, and the budget every rank holds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


def median_of(runs: List[Dict[str, Any]], key: str) -> str:
    values = [run[key] for run in runs if run.get(key) is not None]
    return f"{statistics.median(values):.2f}" if values else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--picture", metavar="PNG", help="draw the last completed small-b run: each node's memory "
                        "and the budget on every rank over time")
    args = parser.parse_args()
    available, why = nodes_available()
    if not available:
        print(f"two nodes cannot be made here: {why}", file=sys.stderr)
        return 2
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in CASES}
    for round_ in range(args.rounds):
        for name, nodes in CASES.items():
            result = one_run(nodes)
            runs[name].append(result)
            shown = {key: value for key, value in result.items() if key not in ("timelines", "limits")}
            print(f"[round {round_ + 1}] {name}: {shown}", flush=True)
    print("\n| case | completed | OOM kills | images/s (median) | mean batch | agreements per rank and epoch "
          "| ms per agreement during the epochs | ms per agreement, all ranks ready |")
    print("|---|---|---|---|---|---|---|---|")
    for name, case_runs in runs.items():
        done = [run for run in case_runs if run["completed"]]
        print(f"| {name} | {len(done)}/{len(case_runs)} | {sum(run['oom_kills'] for run in case_runs)} | "
              f"{median_of(done, 'images_per_s')} | {median_of(done, 'mean_batch')} | {median_of(done, 'agreements')} "
              f"| {median_of(done, 'during_ms')} | {median_of(done, 'alone_ms')} |")
    small_runs = [run for run in runs["small-b"] if run["completed"]]
    if args.picture and small_runs:
        draw(small_runs[-1], args.picture)
    equal, small = (median_of([r for r in runs[n] if r["completed"]], "images_per_s") for n in CASES)
    if "-" not in (equal, small):
        print(f"\nthe small node costs the job {1 - float(small) / float(equal):.0%} of its images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
