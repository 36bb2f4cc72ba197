"""One benchmark case alternated between two checkouts of this repository: is the new code slower?

    git worktree add /tmp/old <commit>
    .venv/bin/python tests/benchmarks/compare_trees.py /tmp/old . --case seed --rounds 5   # ~2-3 min

Each round runs, for each tree in turn, one fresh process that builds the case's vanilla DataLoader and
AdaptiveLoader from that tree's ``tests/benchmarks/cases.py``, iterates each for 4 epochs and keeps the
best of the last 3; the medians over the rounds are printed. Alternating the trees round by round makes a
machine's drift hit both. The trees must both have ``cases.py`` with the case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "seed": "seed_case()",
    "transport-default": "transport_case('default')",
    "transport-persistent": "transport_case('default', persistent=True)",
}

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests/benchmarks")
from cases import close, epoch_seconds, seed_case, transport_case
case = {case}
out = {{}}
for name in ("vanilla DataLoader", "AdaptiveLoader"):
    loader = case.variants[name]()
    times = [epoch_seconds(loader) for _ in range(4)]
    close(loader)
    out[name] = min(times[1:])
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, help="two checkouts: the old one, then the new one")
    parser.add_argument("--case", choices=sorted(CASES), default="seed")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in args.trees]
    child = CHILD.format(case=CASES[args.case])
    results = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:
            done = subprocess.run([sys.executable, "-c", child, tree], capture_output=True, text=True, cwd=tree)
            if done.returncode != 0:
                raise SystemExit(f"{tree}: {done.stderr[-2000:]}")
            results[tree].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"case {args.case}, {args.rounds} rounds, medians of each round's best epoch")
    for tree, runs in results.items():
        vanilla = statistics.median(r["vanilla DataLoader"] for r in runs)
        ours = statistics.median(r["AdaptiveLoader"] for r in runs)
        print(f"  {tree:40}  vanilla {vanilla:.3f} s  AdaptiveLoader {ours:.3f} s  "
              f"vanilla / adaptive {vanilla / ours:.2f}")


if __name__ == "__main__":
    _started = time.perf_counter()
    main()
    print(f"\n(this script ran {time.perf_counter() - _started:.0f} s)")
