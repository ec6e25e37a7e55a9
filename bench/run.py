"""`make bench`: the six benchmarks of the project against their references, side by side in one
run; writes bench/results.json and bench/results.md (the table the README shows).

    .venv/bin/python bench/run.py [--only activation,throughput,pipeline,overhead,asha,tracking]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# (benchmark, the figure that has a target, target text, passes)
TARGETS = {
    "activation": [("SigmoidOrBinary batch / keras sigmoid", "<= 1.05x", lambda v: v <= 1.05),
                   ("SigmoidOrBinary unit / keras sigmoid", "<= 1.10x", lambda v: v <= 1.10)],
    "throughput": [("step / matmul limit", ">= 60%", lambda v: v >= 0.60)],
    "pipeline": [("project data path / in-memory tensors", "<= 1.05x", lambda v: v <= 1.05)],
    "overhead": [("sweep / ideal", "<= 1.3x", lambda v: v <= 1.3)],
    "asha": [("asha epochs / none", "<= 40%", lambda v: v <= 0.40),
             ("best difference (points)", "<= 0.5", lambda v: v <= 0.5)],
    "tracking": [("with MLflow / without", "<= 1.03x", lambda v: v <= 1.03)],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench import activation, engine

    run = {"activation": activation.activation_cost, "throughput": activation.throughput,
           "pipeline": activation.input_pipeline, "overhead": engine.sweep_overhead,
           "asha": engine.early_stopping, "tracking": engine.tracking_cost}
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} CPU cores, {platform.python_implementation()} "
               f"{platform.python_version()}", "benchmarks": {}}
    previous = HERE / "results.json"
    if args.only != parser.get_default("only") and previous.exists():  # refresh some, keep others
        results["benchmarks"] = json.loads(previous.read_text())["benchmarks"]
    for name in args.only.split(","):
        start = time.perf_counter()
        figures = run[name]()
        figures["bench seconds"] = time.perf_counter() - start
        results["benchmarks"][name] = figures
        print(name, json.dumps(figures, indent=1), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [f"Measured {results['date']} on {results['machine']}.", "",
             "| benchmark | measured | target | met |", "|---|---|---|---|"]
    for name, figures in results["benchmarks"].items():
        for key, value in figures.items():
            target = next(((t, ok) for k, t, ok in TARGETS[name] if k == key), None)
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            if target:
                lines.append(f"| {name}: {key} | {shown} | {target[0]} | "
                             f"{'yes' if target[1](value) else 'no'} |")
            elif key != "bench seconds":
                lines.append(f"| {name}: {key} | {shown} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
