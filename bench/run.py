"""`make bench`: the ten benchmarks of the project against their references, side by side in one
run. Each benchmark's figures and verdicts are written as soon as it ends: bench/results.json,
bench/results.md and the table in docs/benchmarks.md.

    .venv/bin/python bench/run.py [--only activation,evaluation,throughput,pipeline,overhead,asha,tracking,
                                          scale,state,cluster]
    .venv/bin/python bench/run.py --smoke --out DIR   # every benchmark at a tiny size (the tests')
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
    # issue 24: per trial-epoch of a sweep on a multi-node cluster, the larger size over the smaller
    "cluster": [*((f"{cost} per trial-epoch, largest / smallest size", *_at_most(1.5))
                  for cost in ("driver CPU s", "state bytes written", "MLflow calls", "MLflow s")),
                ("wall / ideal, largest / smallest size", *_at_most(1.5)),
                ("state bytes written per trial-epoch, most at any size", "< 10 KB",
                 lambda v: v < 10_000),
                ("record complete at every size", "yes (1)", lambda v: v == 1)],
}


# Each benchmark at a size that runs in well under a minute: what `make test` runs, so that no
# benchmark rots between two `make bench`. The figures mean nothing at this size.
SMOKE = {
    "activation": {"rounds": 1, "block_s": 0.0, "archs": ("mlp",)},
    "evaluation": {"epochs": 2, "archs": ("mlp",), "train_size": 1000},
    "throughput": {"rounds": 1, "steps": 1},
    "pipeline": {"rounds": 1, "train_size": 1000},
    "overhead": {"trials": 2, "rounds": 1, "fixed": {"data.name": "synthetic", "budget.epochs": 1}},
    "asha": {"size": "smoke"},
    "tracking": {"pairs": 1, "fixed": {"data.name": "synthetic", "budget.epochs": 1}},
    "scale": {"sizes": (5, 10), "server_sizes": ()},
    "state": {"sizes": (4, 8), "real_up_to": 4, "driven": 2},
    "cluster": {"sizes": (3, 6), "workers": 2, "cpus": 2, "epochs": 3, "epoch_s": 0.2},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(TARGETS))
    parser.add_argument("--smoke", action="store_true",
                        help="every benchmark at its smoke size (SMOKE); figures into --out only")
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder of results.json and results.md (default: bench/)")
    args = parser.parse_args()
    if args.smoke and args.out == HERE:
        parser.error("--smoke writes its meaningless figures elsewhere: give --out")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench import activation, cluster, engine, scale, state

    run = {"activation": activation.activation_cost, "evaluation": activation.evaluation_cost,
           "throughput": activation.throughput,
           "pipeline": activation.input_pipeline, "overhead": engine.sweep_overhead,
           "asha": engine.early_stopping, "tracking": engine.tracking_cost,
           "scale": scale.analysis_scale, "state": state.state_scale,
           "cluster": cluster.cluster_scale}
    today = time.strftime("%Y-%m-%d")
    results = {"date": today, "machine": f"{platform.machine()}, "
               f"{os.cpu_count()} CPU cores, {platform.python_implementation()} "
               f"{platform.python_version()}", "dates": {}, "benchmarks": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    previous = args.out / "results.json"
    if args.only != parser.get_default("only") and previous.exists():  # refresh some, keep others
        kept = json.loads(previous.read_text())
        results["benchmarks"] = kept["benchmarks"]
        results["dates"] = kept.get("dates") or dict.fromkeys(kept["benchmarks"], kept["date"])
    for name in args.only.split(","):
        start = time.perf_counter()
        figures = run[name](**(SMOKE[name] if args.smoke else {}))
        figures["bench seconds"] = time.perf_counter() - start
        results["benchmarks"][name] = figures
        results["dates"][name] = today
        print(name, json.dumps(figures, indent=1), flush=True)
        print("\n".join(verdicts(name, figures)), flush=True)
        write(results, args.out, docs=not args.smoke)
    print(markdown(results))
    return 0


def verdicts(name: str, figures: dict) -> list[str]:
    """One line per target of benchmark `name`: its figure, the target, whether it is met and
    whether the figure's rounds (`KEY per round`) decide it ("not measured" where this size does
    not give the figure)."""
    from bench import decide

    lines = []
    for key, text, ok in TARGETS[name]:
        value = figures.get(key)
        said = ("not measured" if value is None
                else decide.verdict(value, figures.get(f"{key} per round"), ok))
        shown = "" if value is None else f" = {value:.3f}"
        lines.append(f"  target {name}: {key}{shown} ({text}): {said}")
    return lines


def write(results: dict, out: Path, docs: bool) -> None:
    """The results so far: out/results.json, out/results.md and (`docs`) docs/benchmarks.md's table."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    if docs:
        page = HERE.parent / "docs" / "benchmarks.md"
        page.write_text(with_results(page.read_text(), markdown(results)))


RESULTS_BLOCK = ("<!-- bench/results.md -->\n", "<!-- end bench/results.md -->\n")


def with_results(page: str, table: str) -> str:
    """`page` with `table` between its two RESULTS_BLOCK markers."""
    start, end = (page.index(marker) for marker in RESULTS_BLOCK)
    return page[:start + len(RESULTS_BLOCK[0])] + table + page[end:]


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
            if isinstance(value, list):  # a figure's rounds: its verdict says what they decide
                continue
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
    figures = {k: v for k, v in figures.items() if not isinstance(v, list)}  # not the rounds
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
