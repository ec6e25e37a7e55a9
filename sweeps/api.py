"""The public Python API of the sweeps: what the command line, the benchmarks and the tests build on.

A whole sweep, as `python -m sweeps run` does it (checks, driver lock, Ray, the record, the fit,
the record closed)::

    from sweeps.api import Settings, load_spec, run_sweep
    spec = load_spec("sweeps/specs/quick.yaml", size="smoke")
    results = run_sweep(spec, Settings.from_env())      # Ray Tune's ResultGrid

Its pieces, for a harness of one's own on a Ray that is already running::

    record = open_record(spec, settings)                # the experiment and the parent run
    tuner = build_tuner(spec, settings, dataset, [record.tracker(spec, settings, dataset)])
    tuner.fit()

`build_tuner(..., trial=Subclass)` runs a subclass of `StudyTrial` instead (the benchmarks replace
its training by made-up numbers); `tuner_parts` gives what `build_tuner` puts together, for a driver
of Ray Tune's own. Runs are read back into pandas frames by `analysis.runs.load`.
"""

from __future__ import annotations

from sweeps.launch import run as run_sweep
from sweeps.preflight import SweepError
from sweeps.runner import Record, open_record, param_space, run_config, trainable, tune_config
from sweeps.runner import new_tuner as build_tuner
from sweeps.settings import Settings
from sweeps.spec import SpecError, SweepSpec, load_spec, parse_spec
from sweeps.trainable import SCORE, StudyTrial

__all__ = ["SCORE", "Record", "Settings", "SpecError", "StudyTrial", "SweepError", "SweepSpec",
           "build_tuner", "load_spec", "open_record", "parse_spec", "run_sweep", "tuner_parts"]


def tuner_parts(spec: SweepSpec, settings: Settings, dataset, callbacks: list,
                trial: type[StudyTrial] = StudyTrial) -> dict:
    """What `build_tuner` passes to `ray.tune.Tuner`: the trainable (`trial` on the spec's
    resources), the param space, the TuneConfig (searcher, scheduler) and the RunConfig
    (`callbacks`, Ray's per-trial loggers, checkpoints, retries)."""
    return {"trainable": trainable(spec, dataset, trial), "param_space": param_space(spec),
            "tune_config": tune_config(spec, settings),
            "run_config": run_config(spec, settings, callbacks)}
