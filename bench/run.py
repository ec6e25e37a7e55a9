"""`make bench`: the nine benchmarks of the project against their references, side by side in one
run; writes bench/results.json and bench/results.md (the table the README shows).

    .venv/bin/python bench/run.py [--only activation,evaluation,throughput,pipeline,overhead,asha,tracking,
                                          scale,state]
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

ARCHS = ("mlp", "cnn", "gated", "bottleneck")


def _at_most(bound: float, unit: str = "x"):
    text = f"<= {bound:.0%}" if unit == "%" else f"<= {bound:.2f}x"
    return text, lambda v: v <= bound


# The activation's targets (issue 11): ratio of the training step to Keras' sigmoid in the same net.
_ACTIVATION_TARGETS = {
    **{(arch, f"{v} c={c}"): _at_most(1.10) for arch in ARCHS
       for v in ("batch", "example", "p=1", "ste", "hard_sigmoid") for c in ("1", "1.2")},
    **{("mlp", f"unit c={c}"): _at_most(1.10) for c in ("1", "1.2")},
    **{("cnn", f"unit c={c}"): _at_most(1.25) for c in ("1", "1.2")},
    ("cnn", "semhash"): _at_most(1.5),
}

# (benchmark, the figure that has a target, target text, passes)
TARGETS = {
    "activation": [(f"{arch}: {variant} / keras sigmoid", text, ok)
                   for (arch, variant), (text, ok) in _ACTIVATION_TARGETS.items()],
    "evaluation": [(f"{arch}: evaluation / training epoch", *_at_most(0.25, "%")) for arch in ARCHS],
    "throughput": [("step / matmul limit", ">= 60%", lambda v: v >= 0.60)],
    "pipeline": [("project data path / in-memory tensors", "<= 1.05x", lambda v: v <= 1.05)],
    "overhead": [("sweep / ideal", "<= 1.3x", lambda v: v <= 1.3)],
    "asha": [("asha epochs / none", "<= 40%", lambda v: v <= 0.40),
             ("best difference (points)", "<= 0.5", lambda v: v <= 0.5)],
    "tracking": [("with MLflow / without", "<= 1.03x", lambda v: v <= 1.03)],
    # issue 13: time (or bytes) per trial at the largest size over the smallest
    "scale": [("sqlite load per trial, largest / smallest size", *_at_most(1.5)),
              ("sqlite tables per trial, largest / smallest size", *_at_most(1.5)),
              ("server load per trial, largest / smallest size", *_at_most(1.5)),
              ("server load of 1000 runs s", "< 15 s", lambda v: v < 15)],
    "state": [("state bytes per trial, largest / smallest size", *_at_most(1.5)),
              ("tracker s per trial, largest / smallest size", *_at_most(1.5))],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench import activation, engine, scale, state

    run = {"activation": activation.activation_cost, "evaluation": activation.evaluation_cost,
           "throughput": activation.throughput,
           "pipeline": activation.input_pipeline, "overhead": engine.sweep_overhead,
           "asha": engine.early_stopping, "tracking": engine.tracking_cost,
           "scale": scale.analysis_scale, "state": state.state_scale}
    today = time.strftime("%Y-%m-%d")
    results = {"date": today, "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} CPU cores, {platform.python_implementation()} "
               f"{platform.python_version()}", "dates": {}, "benchmarks": {}}
    previous = HERE / "results.json"
    if args.only != parser.get_default("only") and previous.exists():  # refresh some, keep others
        kept = json.loads(previous.read_text())
        results["benchmarks"] = kept["benchmarks"]
        results["dates"] = kept.get("dates") or dict.fromkeys(kept["benchmarks"], kept["date"])
    for name in args.only.split(","):
        start = time.perf_counter()
        figures = run[name]()
        figures["bench seconds"] = time.perf_counter() - start
        results["benchmarks"][name] = figures
        results["dates"][name] = today
        print(name, json.dumps(figures, indent=1), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(markdown(results))
    readme = HERE.parent / "README.md"
    readme.write_text(with_results(readme.read_text(), markdown(results)))
    print(markdown(results))
    return 0


README_BLOCK = ("<!-- bench/results.md -->\n", "<!-- end bench/results.md -->\n")


def with_results(readme: str, table: str) -> str:
    """The README with `table` between its two README_BLOCK markers."""
    start, end = (readme.index(marker) for marker in README_BLOCK)
    return readme[:start + len(README_BLOCK[0])] + table + readme[end:]


def markdown(results: dict) -> str:
    dates = results.get("dates") or dict.fromkeys(results["benchmarks"], results["date"])
    when = (f"{next(iter(dates.values()))}" if len(set(dates.values())) == 1
            else "; ".join(f"{name} {date}" for name, date in dates.items()))
    lines = [f"Measured on {results['machine']}: {when}.", ""]
    if "activation" in results["benchmarks"]:
        lines += activation_matrix(results["benchmarks"]["activation"]) + [""]
    lines += ["| benchmark | measured | target | met |", "|---|---|---|---|"]
    for name, figures in results["benchmarks"].items():
        if name == "activation":
            continue
        for key, value in figures.items():
            target = next(((t, ok) for k, t, ok in TARGETS[name] if k == key), None)
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            if target:
                lines.append(f"| {name}: {key} | {shown} | {target[0]} | "
                             f"{'yes' if target[1](value) else 'no'} |")
            elif key != "bench seconds":
                lines.append(f"| {name}: {key} | {shown} | | |")
    return "\n".join(lines) + "\n"


def activation_matrix(figures: dict) -> list[str]:
    """The activation benchmark as one row per variant, one column per architecture: the training
    step over Keras' sigmoid's, "TF ops -> fused", and the target where there is one."""
    variants = list(dict.fromkeys(k.split(": ", 1)[1].removesuffix(" / keras sigmoid")
                                  for k in figures if ": " in k and k.endswith(" / keras sigmoid")
                                  and "(TF ops)" not in k))
    extras = list(dict.fromkeys(k.split(": ", 1)[1] for k in figures
                                if ": " in k and not k.endswith(" / keras sigmoid")))
    lines = ["Training step over Keras' sigmoid in the same network (graph mode, batch 128); "
             "\"a -> b\": the op as separate TensorFlow ops -> the fused kernels; target met: "
             "yes/NO.", "",
             "| variant | " + " | ".join(ARCHS) + " |", "|---" * (len(ARCHS) + 1) + "|"]
    for variant in variants + extras:
        cells = []
        for arch in ARCHS:
            key = f"{arch}: {variant}" + ("" if variant in extras else " / keras sigmoid")
            if key not in figures:
                cells.append("")
                continue
            value = figures[key]
            cell = f"{value:.2f}" if isinstance(value, float) else str(value)
            before = figures.get(f"{arch}: {variant} (TF ops) / keras sigmoid")
            if before is not None:
                cell = f"{before:.2f} -> {cell}"
            if variant.endswith("of which its draws") or variant.endswith("of which its noise"):
                cell = f"{value:+.2f}"
            target = _ACTIVATION_TARGETS.get((arch, variant))
            if target:
                cell += f" ({target[0]}: {'yes' if target[1](value) else 'NO'})"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
