"""Run the suite's slowest tests in two processes at once, as a loaded CI machine would.

A deadlock in native code showed only under load (two suites at once), so this check runs the
``slow``-marked tests (or the whole suite with ``--all``) twice concurrently, each copy with its
own temporary folder, and prints each copy's wall time and outcome. Exit code 0 only when both
copies pass. Usage::

    python bench/bench_concurrent_suite.py [--all] [--copies 2] [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="the whole suite, not only slow tests")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args()
    selection = [] if args.all else ["-m", "slow"]
    procs = []
    with tempfile.TemporaryDirectory(prefix="concurrent-suite-") as tmp:
        start = time.perf_counter()
        for i in range(args.copies):
            log = open(Path(tmp) / f"copy{i}.log", "w")  # noqa: SIM115 (closed below)
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       "--basetemp", str(Path(tmp) / f"base{i}"), *selection, *args.pytest_args]
            procs.append((subprocess.Popen(command, cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT), log, time.perf_counter()))
        results = []
        for i, (proc, log, began) in enumerate(procs):
            code = proc.wait()
            log.close()
            wall = time.perf_counter() - began
            last = (Path(tmp) / f"copy{i}.log").read_text().strip().splitlines()
            results.append((i, code, wall, last[-1] if last else ""))
        total = time.perf_counter() - start
    for i, code, wall, summary in results:
        print(f"copy {i}: exit {code}, {wall:.0f} s wall: {summary}")
    print(f"both copies together: {total:.0f} s wall")
    return 0 if all(code == 0 for _, code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
