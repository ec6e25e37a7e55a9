"""The tuning side of a sweep, once `sweeps.launch` has checked it and started Ray: a Ray Tune
Tuner (new, or restored when interrupted) with Optuna as the searcher, ASHA as the scheduler and
MLflow as the record; then the record closed."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from mlflow import MlflowClient
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from study import compat
from sweeps import interrupt, snapshots, tracking
from sweeps.lock import DriverLock, holder_text
from sweeps.preflight import SweepError, error_line, storage_join
from sweeps.progress import Progress
from sweeps.settings import Interrupted, Settings
from sweeps.space import DefineByRun, Repeats, StudySearch, limited, sampler, study_storage
from sweeps.spec import SweepSpec
from sweeps.trainable import SCORE, TIME_ATTR, StudyTrial, ray_keeps


def open_store(uri: str) -> None:
    """Have MLflow open (and keep: it caches stores by URI) the tracking store, reading nothing
    but one experiment: a failure here is left to the sweep's own first use to report."""
    with contextlib.suppress(Exception):
        MlflowClient(uri).search_experiments(max_results=1)


@dataclass(frozen=True)
class Record:
    """A sweep's record, open in MLflow: its experiment, its parent run (RUNNING), the provenance
    tags every run of it carries, and how many runs a dead driver of it had left RUNNING."""
    client: MlflowClient
    exp_id: str
    parent: str
    tags: dict[str, str]
    stale: int

    def tracker(self, spec: SweepSpec, settings: Settings, dataset) -> tracking.MlflowTracker:
        """The Ray Tune callback that records the sweep's trials under the parent run."""
        return tracking.MlflowTracker(spec, settings.tracking_uri, self.exp_id, self.parent,
                                      self.tags, tracking.DatasetRecord.of(dataset))

    def callbacks(self, spec: SweepSpec, settings: Settings, dataset) -> list[tune.Callback]:
        """A sweep's own callbacks: the record's tracker, the live progress, the stop signals."""
        return [self.tracker(spec, settings, dataset), Progress(spec), Catch()]


def open_record(spec: SweepSpec, settings: Settings) -> Record:
    """Open (or reopen, on resume) the sweep's record: its experiment; the runs of earlier versions
    of the spec and of this sweep that dead drivers left RUNNING closed KILLED (a line printed for
    each earlier version); its parent run."""
    client = MlflowClient(settings.tracking_uri)
    exp_id = tracking.experiment_id(client, spec.experiment, settings.artifact_root)
    for line in close_other_sweeps(client, exp_id, spec, settings.storage):
        print(line, flush=True)
    stale = tracking.close_stale_runs(client, exp_id, spec.sweep_id)
    tags = tracking.provenance(spec)
    return Record(client, exp_id, tracking.open_parent(client, exp_id, spec, tags), tags, stale)


def run_locked(spec: SweepSpec, settings: Settings, dataset, ray_start_s: float | None,
               trial: type[StudyTrial] = StudyTrial) -> tune.ResultGrid:
    """Run (or resume) the sweep under its driver lock on a started Ray, recording it in MLflow;
    the record is closed whatever happens (KILLED on a signal, FAILED on an error)."""
    record = open_record(spec, settings)
    client, exp_id, parent, stale = record.client, record.exp_id, record.parent, record.stale
    if ray_start_s is not None:  # one value per launch
        client.log_metric(parent, "time/ray_start_s", ray_start_s)
    path = storage_join(settings.storage, spec.sweep_id)
    resumed = tune.Tuner.can_restore(path)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the loggers are `ray_loggers()`
    print(f"sweep {spec.sweep_id}: {spec.num_trials} trials, {'resuming' if resumed else 'new'}"
          f"{f', {stale} stale runs closed' if stale else ''}; storage {path}; MLflow "
          f"{settings.tracking_uri} experiment {spec.experiment!r}", flush=True)
    status, failure = "FAILED", None
    interrupt.on_stop_at_once(lambda: close_at_once(client, exp_id, spec, parent))
    try:
        if resumed:
            tuner = tune.Tuner.restore(path, trainable=trainable(spec, dataset, trial),
                                       resume_errored=True)
            tracking.active_tracker().relaunched(record.tags)  # the tracker restored with it
        else:
            tuner = new_tuner(spec, settings, dataset, record.callbacks(spec, settings, dataset),
                              trial)
        try:
            results = tuner.fit()
        finally:
            interrupt.while_running(None)
            interrupt.install()  # Ray Tune put back the SIGINT handler it found
        status = "KILLED" if interrupt.received else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
    except Exception as err:
        failure = error_line(str(err))
        raise
    finally:
        try:
            left = _close_record(client, exp_id, spec, parent, status, failure)
        except Exception as err:  # the store went away: a stop says so, a crash shows it
            if not interrupt.received:
                raise
            left = (f", but the record could not be closed ({error_line(str(err))}): "
                    "`python -m sweeps status --repair` closes it")
        interrupt.on_stop_at_once(None)
    if interrupt.received or status == "KILLED":
        killed = len([r for r in tracking.find_runs(client, exp_id, {
            "sweep.id": spec.sweep_id, "sweep.role": "trial"}) if r.info.status == "KILLED"])
        raise Interrupted(f"interrupted by {interrupt.name()}: the sweep and {killed} cut-short "
                          f"trial runs are marked KILLED{left}; run the same command to resume")
    if left:
        raise SweepError(f"the sweep ended{left}")
    return results


def _close_record(client, exp_id: str, spec: SweepSpec, parent: str, status: str,
                  failure: str | None) -> str:
    """Flush the tracker, close runs left RUNNING as KILLED, close the parent; returns ", but
    MLflow did not record: ..." when writes were left over. After a stop signal the flush waits
    only until shortly before the signal's deadline (`interrupt.GRACE_S`), and what it could not
    write is given up so that the runs are still closed (with the tags their history gives)."""
    tracker = tracking.active_tracker()
    left = tracker.left if tracker is not None else []
    if tracker is not None and not left:
        left = tracker.writer.flush(flush_deadline())
    note = (f", but MLflow at {tracker.tracking_uri} did not record {len(left)} writes "
            f"({tracking.describe_left(left)})" if left else "")
    if left and not interrupt.received:
        return note
    if left:
        tracker.writer.stop()
    if tracking.close_stale_runs(client, exp_id, spec.sweep_id, role="trial"):
        status = "KILLED" if status == "FINISHED" else status
    if failure:
        client.set_tag(parent, "sweep.failure", failure)
    client.set_terminated(parent, status=status)
    return note


def flush_deadline() -> float:
    """How long the last flush of MLflow writes may wait: STUDY_MLFLOW_FLUSH_S (600 s), or after a
    stop signal what is left of its deadline, less a second to close the runs."""
    full = float(os.environ.get("STUDY_MLFLOW_FLUSH_S", 600))
    return min(full, max(0.0, interrupt.time_left() - 1.0))


def close_at_once(client, exp_id: str, spec: SweepSpec, parent: str) -> str:
    """The record closed without Ray (a second signal, SIGQUIT, or a graceful stop past its
    deadline): the MLflow writer given up, every run of the sweep still RUNNING closed KILLED with
    the tags its history gives; the end of the driver's last line."""
    tracker = tracking.active_tracker()
    left = []
    if tracker is not None:
        tracker.writer.stop()
        tracker.writer.join(timeout=2.0)
        left = tracker.writer.left()
    closed = tracking.close_stale_runs(client, exp_id, spec.sweep_id, role="trial")
    client.set_terminated(parent, status="KILLED")
    note = (f", without {len(left)} MLflow writes ({tracking.describe_left(left)})" if left else "")
    return (f"the sweep and {closed} trial runs still open are marked KILLED{note}; run the same "
            "command to resume")


def close_other_sweeps(client, exp_id: str, spec: SweepSpec, storage: str) -> list[str]:
    """Other sweeps of the same spec name in this experiment (the spec's meaning changed): one
    line each for an incomplete one, and its runs left RUNNING by a driver that is gone are
    closed KILLED (a sweep whose driver still runs is left alone)."""
    lines = []
    parents = tracking.find_runs(client, exp_id, {"sweep.role": "parent"})
    for other in parents:
        other_id = other.data.tags.get("sweep.id")
        if other_id == spec.sweep_id or other.info.status == "FINISHED":
            continue
        holder = DriverLock(storage, other_id).held_elsewhere()
        if holder is not None:
            lines.append(f"note: sweep {other_id} of an earlier version of this spec is running "
                         f"(driver {holder_text(holder)}); this is a new sweep {spec.sweep_id}")
            continue
        closed = tracking.close_stale_runs(client, exp_id, other_id)
        trials = tracking.find_runs(client, exp_id, {"sweep.id": other_id, "sweep.role": "trial"})
        done = sum(r.info.status in ("FINISHED", "FAILED") for r in trials)
        lines.append(f"note: the spec changed since sweep {other_id} (incomplete: {done} of "
                     f"{other.data.params.get('search.samples', '?')} trials ended"
                     f"{f', {closed} runs left RUNNING closed KILLED' if closed else ''}); "
                     f"starting sweep {spec.sweep_id}")
    return lines


def new_tuner(spec: SweepSpec, settings: Settings, dataset, callbacks: list[tune.Callback],
              trial: type[StudyTrial] = StudyTrial) -> tune.Tuner:
    """The Tuner of a new sweep: `trial` (a StudyTrial, or a subclass that replaces its training)
    on the spec's resources, searcher and scheduler, with `callbacks` before Ray's loggers."""
    return tune.Tuner(trainable(spec, dataset, trial), param_space=param_space(spec),
                      tune_config=tune_config(spec, settings),
                      run_config=run_config(spec, settings, callbacks))


def trainable(spec: SweepSpec, dataset, trial: type[StudyTrial] = StudyTrial):
    """`trial` with the sweep's spec and data, on the spec's resources, in workers Ray has
    prestarted: Ray Tune gives every trainable actor the environment variable PL_DISABLE_FORK (a
    PyTorch Lightning switch), and an actor with an environment of its own cannot take the workers
    Ray prestarts for the driver, so every slot would start a fresh worker while those sit idle.
    Nothing here uses Lightning. Variables Tune passes on from the driver's environment (AWS
    credentials for S3 storage) still go."""
    compat.tune_drop_actor_env_var("PL_DISABLE_FORK")
    snapshots.install()  # Ray Tune's snapshots paced, for every tuner (new or restored)
    return tune.with_resources(tune.with_parameters(trial, spec=spec, dataset=dataset),
                               {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})


def param_space(spec: SweepSpec) -> dict:
    if spec.search.algorithm == "grid":
        return {"trial": tune.grid_search(spec.grid())}
    return {}


def tune_config(spec: SweepSpec, settings: Settings) -> tune.TuneConfig:
    """The searcher behind the spec's concurrency (`space.limited`), or the grid: at most
    `max_concurrent` trials at once, or under "auto" none (Ray Tune keeps up to 200 grid trials
    pending, more on a cluster of more CPUs, and runs what the cluster places)."""
    search_alg, samples = None, 1
    if spec.search.algorithm != "grid":
        searcher = StudySearch(space=DefineByRun(spec), metric=SCORE, mode=spec.mode,
                               sampler=sampler(spec), study_name=spec.sweep_id,
                               storage=study_storage(settings.optuna_storage))
        if len(spec.seeds) > 1:
            searcher = Repeats(searcher, repeat=len(spec.seeds))
        search_alg = limited(searcher, spec)
        samples = spec.num_trials
    scheduler = None
    if spec.scheduler.name == "asha":
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=spec.epochs,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return tune.TuneConfig(metric=SCORE, mode=spec.mode, search_alg=search_alg,
                           scheduler=scheduler, num_samples=samples, reuse_actors=True,
                           max_concurrent_trials=spec.search.concurrency if search_alg is None
                           else None)


def run_config(spec: SweepSpec, settings: Settings, callbacks) -> tune.RunConfig:
    """The run's callbacks are the given ones, Ray's per-trial loggers, then `KeepWhatRayReads`
    (last: everything before it sees the whole result)."""
    callbacks = [*callbacks, *ray_loggers(), KeepWhatRayReads()]
    return tune.RunConfig(
        name=spec.sweep_id, storage_path=settings.storage, callbacks=callbacks, verbose=0,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_frequency=1),
    )


def ray_loggers() -> list[tune.Callback]:
    """Ray Tune's per-trial loggers (result.json, progress.csv), given explicitly so that they come
    before `KeepWhatRayReads` and log every key; `run_locked` turns off the ones Ray Tune would
    add, among them its TensorBoard logger (where tensorboardX is installed, as `ray[tune]`
    installs it), which writes and flushes an event file per trial-epoch on Ray Tune's loop for
    a view the MLflow UI gives."""
    return [CSVLoggerCallback(), JsonLoggerCallback()]


class KeepWhatRayReads(tune.Callback):
    """The last callback: cuts each result, in place (Ray Tune lets callbacks modify it), to the
    keys Ray Tune reads back (`trainable.ray_keeps`) before Ray stores it as the trial's last
    result and keeps statistics of its numbers in the experiment state, which is rewritten whole
    at every snapshot. By then the scheduler and the searcher have decided on the whole result,
    and the MLflow tracker and Ray's per-trial logs have recorded it. The keys cut (the project's
    metrics, tags and worker figures, Ray's per-attempt timers time_this_iter_s,
    time_since_restore, iterations_since_restore) are not needed to resume: a resumed or retried
    trial starts from its checkpoint (whose metrics `StudyTrial.save` cuts the same way), and
    the record of every epoch is MLflow's. What is left of the experiment state is mostly Ray's
    own (its storage context, resources, checkpoint manager, statistics of its own keys); the
    state benchmark measures it per trial."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        kept = set(ray_keeps(result))
        for key in [k for k in result if k not in kept]:
            del result[key]


class Catch(tune.Callback):
    """Once Ray Tune's loop runs, the first stop signal takes Ray Tune's graceful stop: its SIGINT
    handler (installed when its loop starts), called by `interrupt` for any stop signal."""

    def __init__(self):
        self.installed = False

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def on_step_begin(self, iteration, trials, **info):
        if self.installed:
            return
        self.installed = True
        interrupt.take_over(signal.getsignal(signal.SIGINT))
