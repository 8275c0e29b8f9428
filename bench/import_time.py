"""How long `import agentkit` takes: this checkout side by side with an earlier revision.

Run from the repository root:  python bench/import_time.py [--base REV] [--runs N] [--quick]

Each run is a fresh `python -X importtime -c "import agentkit"` subprocess (the checkout's
agentkit.py, or REV's, written to a temporary folder); the table gives the median and the
best of the wall time of the whole process and of the import as `-X importtime` counts it
(cumulative microseconds of the top-level `agentkit` line), and the official MCP client
(`import mcp.client.session`, when installed) beside them for scale. Runs alternate between
the two revisions, so load on the machine falls on both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(folder: Path, module: str) -> tuple[float, float]:
    """Wall seconds of a fresh interpreter importing `module` from `folder`, and the
    import's own cumulative seconds as -X importtime reports it."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(folder)},
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    top = [line for line in done.stderr.splitlines() if line.rstrip().endswith(f"| {module}")]
    cumulative = int(top[-1].split("|")[1]) / 1e6 if top else float("nan")
    return wall, cumulative


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="the revision to compare (HEAD~1)")
    parser.add_argument("--runs", type=int, default=30, help="runs of each (30)")
    parser.add_argument("--quick", action="store_true", help="3 runs, a smoke test")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    base = subprocess.run(
        ["git", "show", f"{args.base}:agentkit.py"], cwd=ROOT, capture_output=True, text=True
    )
    if base.returncode:  # no git history here (a tarball, a shallow clone): this one alone
        print(f"cannot read agentkit.py at {args.base}: {base.stderr.strip()}", file=sys.stderr)
    label = subprocess.run(
        ["git", "log", "-1", "--format=%h", args.base], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        targets = {}
        if not base.returncode:
            (Path(tmp) / "agentkit.py").write_text(base.stdout)
            targets[f"agentkit at {label} ({args.base})"] = (Path(tmp), "agentkit")
        targets["agentkit, this checkout"] = (ROOT, "agentkit")
        try:
            import mcp  # noqa: F401  (a test dependency: only for scale)

            if not args.quick:
                targets["mcp.client.session (the SDK)"] = (Path(tmp), "mcp.client.session")
        except ImportError:
            pass
        for folder, module in targets.values():  # warm the bytecode caches
            one_run(folder, module)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
        for _ in range(runs):
            for name, (folder, module) in targets.items():
                times[name].append(one_run(folder, module))
    print(
        f"machine: nproc {os.cpu_count()}, {platform.system()} {platform.machine()}; "
        f"Python {platform.python_version()}; {runs} runs each, alternating"
    )
    header = ("process median", "best", "import median", "best", "import ratio")
    print(f"{'':36} {header[0]:>15} {header[1]:>8} {header[2]:>14} {header[3]:>8} {header[4]:>13}")
    first = statistics.median(c for _, c in next(iter(times.values())))
    for name, measured in times.items():
        walls = [w for w, _ in measured]
        imports = [c for _, c in measured]
        ratio = statistics.median(imports) / first
        print(
            f"{name:36} {statistics.median(walls) * 1000:12.0f} ms {min(walls) * 1000:5.0f} ms"
            f" {statistics.median(imports) * 1000:11.0f} ms {min(imports) * 1000:5.0f} ms"
            f" {ratio:12.2f}×"
        )
    print("import ratio: median import time ÷ the base revision's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
