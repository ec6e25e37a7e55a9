"""Every private attribute and private module of another library the project touches (Ray, Optuna,
MLflow, Keras, TensorFlow), each behind one accessor that says what it reaches and why no public API
does. Nothing else in study/, sweeps/ or analysis/ touches one (tests/test_compat.py reads the
sources). The libraries are imported by name inside the accessors, so importing this module loads
none of them: study/ never imports Ray, Optuna or MLflow, and the sweep launcher stays light.

`CHECKED` names the versions of each library its private names here were checked with. An accessor
raises `PrivateAPIError`, one line naming the library, its installed version, the checked one and
the private name:
- when the private name is missing (a module, an attribute, a parameter), whatever the version;
- when the installed version is of a minor release (major.minor) none of the checked ones is of:
  private internals move between minor releases, and one that kept its name may have changed its
  meaning (a seed drawn differently), so an unchecked minor release is refused, not trusted.
Another patch release of a checked minor release is trusted: patch releases fix bugs without
reworking internals, and refusing one would stop a sweep (or a cluster node with a newer image) for
nothing. The pins in pyproject.toml are exact and tests/test_compat.py fails while an installed
version is missing from `CHECKED`, so moving a pin, even to a patch release, means re-checking first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

from study.errors import StudyError

CHECKED: dict[str, tuple[str, ...]] = {
    "ray": ("2.60.0",),
    "optuna": ("5.0.0",),
    "mlflow": ("3.17.2",),
    "keras": ("3.15.1",),
    "tensorflow": ("2.21.0",),
}
# What `ray.init` of a local cluster imports lazily (its usage statistics, its dashboard's optional
# dependencies, its CLI helpers) that the tuning side imports as well (Ray 2.60, MLflow 3.17).
RAY_INIT_IMPORTS = ("ray._common.usage.usage_lib", "ray.dashboard.optional_deps", "click")
MLFLOW_HISTORY_BULK = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
_MISSING = object()


class PrivateAPIError(StudyError, RuntimeError):
    """A private name of another library is missing, or its installed version was not checked."""

    def __init__(self, library: str, private: str, problem: str = "has no"):
        checked = " or ".join(CHECKED[library])
        super().__init__(
            f"{library} {installed(library)} {problem} {private} (checked with {library} {checked}): "
            f"see 'Private calls into other libraries' in docs/design.md")


@functools.cache
def installed(library: str) -> str:
    """The installed version of a library (importing it)."""
    return importlib.import_module(library).__version__


# TensorFlow


def tf_gradient_registry() -> dict:
    """TensorFlow's process-wide gradient functions by name
    (`tensorflow.python.framework.ops._gradient_registry._registry`): every `tf.custom_gradient`
    traced in graph mode adds one and nothing removes it, and TensorFlow has no public way to list
    or remove them (`study.activations_tf.forget_gradients`)."""
    registry = _from("tensorflow", "tensorflow.python.framework.ops", "_gradient_registry")
    return _attribute("tensorflow", registry, "_registry",
                      "tensorflow.python.framework.ops._gradient_registry._registry")


def tf_in_xla_context(graph) -> bool:
    """Whether `graph` (where an op is being traced) or a graph around it is compiled by XLA
    (`tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`): TensorFlow has no public
    way to ask, and the fused kernels have no XLA implementation (`study.fused.usable`)."""
    return _from("tensorflow", "tensorflow.python.ops.control_flow_util",
                 "GraphOrParentsInXlaContext")(graph)


# Keras


def tf_set_op_determinism(enabled: bool) -> None:
    """Turn TensorFlow's op determinism on or off for this process
    (`tensorflow.python.framework.config.{enable,disable,is}_op_determinism[_enabled]`): the public
    `tf.config.experimental.enable_op_determinism` has no way back and no way to ask, and a reused
    Ray worker runs trials that ask for either (`study.runtime.configure_determinism`)."""
    module = "tensorflow.python.framework.config"
    if _from("tensorflow", module, "is_op_determinism_enabled")() != enabled:
        _from("tensorflow", module, "enable_op_determinism" if enabled else "disable_op_determinism")()


def keras_draw_seed(seed):
    """The seed tensor keras.random.* draws with for `seed` (a SeedGenerator: its next state; an
    int: [seed, 0]; None: the next of Keras' global generator), for the fused kernel to draw what
    keras.random.* would (`keras.src.random.seed_generator.draw_seed`). The public
    `SeedGenerator.next()` covers one case of three and Keras' global generator has no public
    handle; rebuilding the other two would copy Keras' rules, where calling the function
    keras.random.* itself calls keeps the seeds identical by construction."""
    return _from("keras", "keras.src.random.seed_generator", "draw_seed")(seed)


# Ray


def import_ray_init_modules() -> None:
    """Import `RAY_INIT_IMPORTS`, so that starting a local Ray and importing the tuning side on two
    threads import no module in common (`sweeps.launch`). Which modules `ray.init` imports lazily
    is Ray's internals (one is private: `ray._common`), named by no public API."""
    for name in RAY_INIT_IMPORTS:
        _module("ray", name)


def ray_local_cpus() -> int:
    """The CPUs `ray.init()` would register on this machine, a container's CPU quota included
    (`ray._private.utils.get_num_cpus`): Ray's public resources exist only once it runs, and
    `os.cpu_count()` ignores the quota."""
    return _from("ray", "ray._private.utils", "get_num_cpus")()


def ray_local_gpus() -> int:
    """The GPUs `ray.init()` would register on this machine: those CUDA_VISIBLE_DEVICES shows this
    process, else all the node has (`ray._private.accelerators.get_accelerator_manager_for_resource`):
    no public API detects them before Ray runs."""
    gpus = _from("ray", "ray._private.accelerators", "get_accelerator_manager_for_resource")("GPU")
    visible = gpus.get_current_process_visible_accelerator_ids()
    return len(visible) if visible is not None else gpus.get_current_node_num_accelerators()


def ray_cluster_config():
    """The autoscaling configuration the connected cluster holds (its `node_group_configs`: node
    types, their resources and max counts), or None: none, or an older GCS without the autoscaler's
    key (`ray._private.state.state.get_cluster_config`). Ray's public state API lists the nodes
    alive, not those an autoscaler may add."""
    state = _from("ray", "ray._private.state", "state")
    get = _attribute("ray", state, "get_cluster_config", "ray._private.state.state.get_cluster_config")
    try:
        return get()
    except Exception:  # an older GCS without the autoscaler's key: a fixed cluster
        return None


def ray_local_node():
    """Ray's node of the local cluster this process started, or None
    (`ray._private.worker._global_node`): Ray has no public handle on the processes it started."""
    return _from("ray", "ray._private.worker", "_global_node")


def ray_node_pids(node) -> list[int]:
    """The process ids of a local node's processes (`Node.all_processes` of `ray_local_node()`)."""
    processes = _attribute("ray", node, "all_processes", "ray._private.node.Node.all_processes")
    return [info.process.pid for infos in processes.values() for info in infos]


def ray_kill_at_once_on_shutdown(node) -> None:
    """Have `ray.shutdown()` SIGKILL the local node's processes at once: its
    `Node.kill_all_processes` is called with `allow_graceful=False` whatever it is asked. Ray's
    shutdown sends SIGTERM and waits a second for each process, which processes that block SIGTERM
    spend for nothing; no public option skips it."""
    kill = _attribute("ray", node, "kill_all_processes", "ray._private.node.Node.kill_all_processes")
    if "allow_graceful" not in inspect.signature(kill).parameters:
        raise PrivateAPIError("ray", "ray._private.node.Node.kill_all_processes(allow_graceful=)")
    node.kill_all_processes = lambda **how: kill(**{**how, "allow_graceful": False})


def ray_reread_auth() -> None:
    """Have Ray's core in this process read RAY_AUTH_MODE and its token again
    (`ray._raylet.Config.initialize`, `ray._raylet.AuthenticationTokenLoader.reset_cache`: what
    Ray's own test helper `reset_auth_token_state` does): it reads them once per process, and no
    public API reads them again (bench/ray_nodes.py switches token authentication on and off)."""
    _from("ray", "ray._raylet", "Config").initialize("")
    _from("ray", "ray._raylet", "AuthenticationTokenLoader").instance().reset_cache()


def tune_drop_actor_env_var(name: str) -> None:
    """Stop Ray Tune from giving every trainable actor the environment variable `name` (its
    module-level defaults, `ray.tune.execution.class_cache.DEFAULT_ENV_VARS`): an actor with an
    environment of its own cannot take the workers Ray prestarts (`sweeps.runner.trainable`). No
    public option sets them."""
    defaults = _from("ray", "ray.tune.execution.class_cache", "DEFAULT_ENV_VARS")
    defaults.pop(name, None)


def tune_pace_snapshots(decide) -> None:
    """After a trial's checkpoint, Ray Tune snapshots the experiment when `decide(bytes of its last
    snapshot)` says so, instead of whenever a trial has checkpointed `CheckpointConfig.num_to_keep`
    times (`ray.tune.execution.experiment_state._ExperimentCheckpointManager.on_trial_checkpoint`,
    which sets `_should_force_sync_up`; the last snapshot's files are in
    `_storage.experiment_driver_staging_path`). No public option paces it while `num_to_keep` is
    set. The size is read once per snapshot (`_last_save_time` changes), not at every checkpoint:
    the staging folder also holds a folder per trial. For this process, from now on."""
    manager = _from("ray", "ray.tune.execution.experiment_state", "_ExperimentCheckpointManager")
    _attribute("ray", manager, "on_trial_checkpoint",
               "ray.tune.execution.experiment_state._ExperimentCheckpointManager.on_trial_checkpoint")

    def on_trial_checkpoint(self, trial) -> None:
        where = "ray.tune.execution.experiment_state._ExperimentCheckpointManager."
        storage = _attribute("ray", self, "_storage", where + "_storage")
        saved = _attribute("ray", self, "_last_save_time", where + "_last_save_time")
        _attribute("ray", self, "_should_force_sync_up", where + "_should_force_sync_up")
        if getattr(self, "_study_sized_at", None) != saved:  # a snapshot since the last size
            staging = Path(storage.experiment_driver_staging_path)
            self._study_size = sum(p.stat().st_size for p in staging.iterdir() if p.is_file()) \
                if staging.is_dir() else 0
            self._study_sized_at = saved
        if decide(self._study_size):
            self._should_force_sync_up = True

    manager.on_trial_checkpoint = on_trial_checkpoint


def tune_trainable_kwargs(trial) -> dict:
    """The keyword arguments Ray Tune makes a trial's trainable with (its config, its storage)
    (`ray.tune.experiment.trial._get_trainable_kwargs`), for a driver that runs the trainable in
    its own process (bench/state.py): no public API gives them."""
    return _from("ray", "ray.tune.experiment.trial", "_get_trainable_kwargs")(trial)


def tune_search_study(searcher):
    """The Optuna study behind Ray Tune's OptunaSearch, None before it has a space
    (`OptunaSearch._ot_study`): Ray Tune keeps no public handle on it."""
    return _attribute("ray", searcher, "_ot_study", "ray.tune.search.optuna.OptunaSearch._ot_study")


def tune_search_trials(searcher) -> dict:
    """OptunaSearch's Optuna trials by Ray Tune trial id, the dict it keeps itself
    (`OptunaSearch._ot_trials`): no public API lists them or lets one go."""
    return _attribute("ray", searcher, "_ot_trials", "ray.tune.search.optuna.OptunaSearch._ot_trials")


def tune_search_completed(searcher) -> set:
    """The Ray Tune trial ids OptunaSearch has told its study of (`OptunaSearch._completed_trials`):
    no public API says which."""
    return _attribute("ray", searcher, "_completed_trials",
                      "ray.tune.search.optuna.OptunaSearch._completed_trials")


def tune_staging_path(controller) -> str:
    """Where Ray Tune's driver writes the experiment's state before syncing it to the storage
    (`TuneController._storage.experiment_driver_staging_path`): no public API names it."""
    storage = _attribute("ray", controller, "_storage",
                         "ray.tune.execution.tune_controller.TuneController._storage")
    return storage.experiment_driver_staging_path


def tune_trial_folder(trial) -> tuple[Any, str] | None:
    """The file system and path of a trial's folder in the storage, where its checkpoint_NNNNNN
    folders are (`Trial.storage`, a `ray.train._internal.storage.StorageContext`:
    `storage_filesystem`, `trial_fs_path`); None before Ray Tune has named the folder."""
    storage = _attribute("ray", trial, "storage", "ray.tune.experiment.Trial.storage")
    if storage is None or getattr(storage, "trial_dir_name", None) is None:
        return None
    return (_attribute("ray", storage, "storage_filesystem",
                       "ray.train._internal.storage.StorageContext.storage_filesystem"),
            storage.trial_fs_path)


def tune_mark_to_checkpoint(controller, trial) -> None:
    """Have Ray Tune's driver include `trial` in its next snapshot of the experiment
    (`TuneController._mark_trial_to_checkpoint`), as it does itself when a trial's state changes:
    no public API does."""
    _attribute("ray", controller, "_mark_trial_to_checkpoint",
               "ray.tune.execution.tune_controller.TuneController._mark_trial_to_checkpoint")(trial)


# Optuna


def optuna_set_trial_user_attr(study, trial, key: str, value: Any) -> None:
    """Set a user attribute of a RUNNING trial (a FrozenTrial) this process did not ask for: through
    the study's storage by the trial's id (`Study._storage`, `FrozenTrial._trial_id`). Optuna sets
    user attributes only through the `Trial` that asked, and making one for another's trial runs the
    sampler's `before_trial` on it."""
    storage = _attribute("optuna", study, "_storage", "optuna.study.Study._storage")
    trial_id = _attribute("optuna", trial, "_trial_id", "optuna.trial.FrozenTrial._trial_id")
    storage.set_trial_user_attr(trial_id, key, value)


# MLflow


def mlflow_store(client):
    """The tracking store an MlflowClient reads (`MlflowClient._tracking_client.store`), for a SQL
    store's `get_metric_history_bulk`: one query for a key of many runs, where the public
    `MlflowClient.get_metric_history` makes one per run and key (`analysis.runs`)."""
    tracking = _attribute("mlflow", client, "_tracking_client",
                          "mlflow.tracking.MlflowClient._tracking_client")
    return tracking.store


@contextlib.contextmanager
def mlflow_around_requests(around):
    """While in the block, every HTTP request of this process's MLflow client, the REST calls and
    the artifact uploads alike, goes through `around(send)(method, url, *args, **kwargs)`, where
    `send` is MLflow's own (`mlflow.utils.rest_utils._get_http_response_with_retries`, which
    `http_request` and the artifact repository both call): no public hook sees every request
    (bench/remote_mlflow.py adds a server's latency and counts the calls)."""
    rest = _module("mlflow", "mlflow.utils.rest_utils")
    send = _attribute("mlflow", rest, "_get_http_response_with_retries",
                      "mlflow.utils.rest_utils._get_http_response_with_retries")
    rest._get_http_response_with_retries = around(send)
    try:
        yield
    finally:
        rest._get_http_response_with_retries = send


def mlflow_server_history_bulk(host_creds, run_ids: list[str], key: str, max_results: int) -> list:
    """The logged values of `key` of up to 100 runs in one request to a tracking server (at most
    `max_results`): its UI's endpoint `MLFLOW_HISTORY_BULK`, where MLflow's public REST API reads
    one run per request. The endpoint is the server's, so its absence (404) is the error; the
    version checked is the installed (client's) one."""
    _check("mlflow", MLFLOW_HISTORY_BULK)
    rest = importlib.import_module("mlflow.utils.rest_utils")
    response = rest.http_request(host_creds=host_creds, endpoint=MLFLOW_HISTORY_BULK, method="GET",
                                 params={"run_id": run_ids, "metric_key": key,
                                         "max_results": max_results})
    if response.status_code == 404:
        raise PrivateAPIError("mlflow", MLFLOW_HISTORY_BULK, "reached a tracking server without")
    return rest.verify_rest_response(response, MLFLOW_HISTORY_BULK).json()["metrics"]


# resolution


def _from(library: str, module: str, name: str) -> Any:
    """`module`.`name` of `library`: a private module's attribute or a module's private one."""
    private = f"{module}.{name}"
    return _attribute(library, _module(library, module, private), name, private)


def _module(library: str, name: str, private: str = "") -> ModuleType:
    """The module `name` of `library`; `private` is what a version error names, if not the module."""
    _check(library, private or name)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not err.name or not name.startswith(err.name):
            raise  # a dependency of the module is missing, not the module
        raise PrivateAPIError(library, name) from None


def _attribute(library: str, owner: object, name: str, private: str) -> Any:
    """owner.`name`, named `private` in an error."""
    _check(library, private)
    value = getattr(owner, name, _MISSING)
    if value is _MISSING:
        raise PrivateAPIError(library, private)
    return value


def _check(library: str, private: str) -> None:
    """PrivateAPIError unless the installed library is of a minor release a checked version is of."""
    if _minor(installed(library)) not in {_minor(version) for version in CHECKED[library]}:
        raise PrivateAPIError(library, private, "is not a checked version for")


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])
