"""`study.compat`, the one module that touches other libraries' private names: each accessor still
reaches its name in the installed libraries, a missing name or an unchecked version is refused in
one line, importing study loads none of the tuning libraries, and no other source touches a
private name."""

import importlib
import inspect
import json
import re
import subprocess
import sys
import types

import keras
import mlflow
import optuna
import pytest
import ray
import requests
import tensorflow as tf
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from study import compat
from sweeps import resources, space

from .conftest import ROOT

# --- layering


EVERY_STUDY_MODULE = """
import json, pkgutil, sys, importlib
import study
for module in pkgutil.walk_packages(study.__path__, "study."):
    if module.name != "study.__main__":
        importlib.import_module(module.name)
print(json.dumps(sorted(m for m in ("ray", "optuna", "mlflow") if m in sys.modules)))
"""


def test_importing_every_study_module_loads_no_tuning_library():
    proc = subprocess.run([sys.executable, "-c", EVERY_STUDY_MODULE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_importing_compat_loads_none_of_the_libraries():
    code = ("import json, sys, study.compat; print(json.dumps(sorted(m for m in "
            "('ray', 'optuna', 'mlflow', 'keras', 'tensorflow', 'pandas') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


# --- the installed versions


def test_the_installed_versions_are_the_checked_ones():
    """A pin moved in pyproject.toml fails here until the private names are re-checked with the new
    version and it is added to `CHECKED` (docs/design.md, "Private calls into other libraries")."""
    for library, checked in compat.CHECKED.items():
        assert compat.installed(library) in checked, library


# --- every accessor against the installed libraries


def test_tensorflow_gradient_registry_holds_the_traced_custom_gradients():
    before = {k for k in compat.tf_gradient_registry() if k.startswith("CustomGradient-")}

    @tf.custom_gradient
    def identity(x):
        return x, lambda dy: dy

    tf.function(identity).get_concrete_function(tf.TensorSpec([], tf.float32))
    added = {k for k in compat.tf_gradient_registry() if k.startswith("CustomGradient-")} - before
    assert added
    for name in added:
        compat.tf_gradient_registry().pop(name)


def test_tensorflow_xla_context_is_seen_where_xla_compiles():
    seen = []

    def probe(x):
        seen.append(compat.tf_in_xla_context(tf.compat.v1.get_default_graph()))
        return x + 1

    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    tf.function(probe)(tf.constant(1.0))
    probe(tf.constant(1.0))
    assert seen == [True, False, False]


def test_keras_draw_seed_is_what_keras_random_draws_with():
    assert compat.keras_draw_seed(7).numpy().tolist() == [7, 0]
    drawn, public = keras.random.SeedGenerator(3), keras.random.SeedGenerator(3)
    for _ in range(2):
        assert compat.keras_draw_seed(drawn).numpy().tolist() == public.next().numpy().tolist()
    assert compat.keras_draw_seed(None).shape == (2,)
    seed = compat.keras_draw_seed(5)
    assert (keras.random.uniform((4,), seed=5).numpy()
            == tf.random.stateless_uniform((4,), seed=seed).numpy()).all()


def test_ray_init_modules_are_imported():
    compat.import_ray_init_modules()
    assert all(name in sys.modules for name in compat.RAY_INIT_IMPORTS)


def test_ray_local_resources_are_detected():
    node = resources.local_node()
    assert node["CPU"] >= 1 and node["GPU"] >= 0
    assert isinstance(compat.ray_local_cpus(), int) and isinstance(compat.ray_local_gpus(), int)


def test_ray_cluster_config_is_none_without_a_cluster():
    assert not ray.is_initialized()
    assert compat.ray_cluster_config() is None
    assert compat.ray_local_node() is None


def test_ray_node_names_are_those_of_the_installed_node():
    from ray._private.node import Node

    assert "self.all_processes" in inspect.getsource(Node.__init__)
    node = Node.__new__(Node)  # a node that started nothing
    node.all_processes = {"raylet": [types.SimpleNamespace(process=types.SimpleNamespace(pid=12))]}
    assert compat.ray_node_pids(node) == [12]
    compat.ray_kill_at_once_on_shutdown(node)
    node.all_processes = {}
    node.kill_all_processes(check_alive=False, allow_graceful=True)


def test_ray_node_is_killed_without_grace_whatever_shutdown_asks():
    asked = []
    node = types.SimpleNamespace()
    node.kill_all_processes = lambda check_alive=True, allow_graceful=False, wait=False: asked.append(
        (check_alive, allow_graceful, wait))
    compat.ray_kill_at_once_on_shutdown(node)
    node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
    assert asked == [(False, False, True)]


@pytest.mark.slow
def test_ray_local_node_of_a_local_cluster():
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        node = compat.ray_local_node()
        assert node is not None and compat.ray_node_pids(node)
        compat.ray_cluster_config()  # None or the autoscaler's: resolves either way
        compat.ray_kill_at_once_on_shutdown(node)
    finally:
        ray.shutdown()
    assert compat.ray_local_node() is None


def test_tune_controller_names_are_those_of_the_installed_controller():
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.tune_controller import TuneController

    assert "self._storage = " in inspect.getsource(TuneController.__init__)
    assert isinstance(inspect.getattr_static(StorageContext, "experiment_driver_staging_path"),
                      property)
    controller = TuneController.__new__(TuneController)
    controller._trials_to_cache = set()
    compat.tune_mark_to_checkpoint(controller, "trial")
    assert controller._trials_to_cache == {"trial"}
    controller._storage = types.SimpleNamespace(experiment_driver_staging_path="/staging")
    assert compat.tune_staging_path(controller) == "/staging"


def test_tune_snapshots_are_paced_by_the_decision_on_the_last_snapshots_size(tmp_path,
                                                                            monkeypatch):
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    monkeypatch.setattr(_ExperimentCheckpointManager, "on_trial_checkpoint",
                        _ExperimentCheckpointManager.on_trial_checkpoint)  # put back afterwards
    (tmp_path / "experiment_state-1.json").write_text("x" * 300)
    (tmp_path / "searcher-state-1.pkl").write_text("y" * 200)
    manager = _ExperimentCheckpointManager(
        storage=types.SimpleNamespace(experiment_driver_staging_path=str(tmp_path)),
        checkpoint_period=10.0, sync_every_n_trial_checkpoints=1)
    manager.on_trial_checkpoint("trial")
    assert manager._should_force_sync_up  # Ray Tune's own rule: forced after each checkpoint
    manager._should_force_sync_up = False
    decisions = iter([False, True])
    sizes = []
    compat.tune_pace_snapshots(lambda size: sizes.append(size) or next(decisions))
    manager.on_trial_checkpoint("trial")
    assert not manager._should_force_sync_up
    manager.on_trial_checkpoint("trial")
    assert manager._should_force_sync_up and sizes == [500, 500]


def test_tune_actor_environment_loses_the_variable_and_trainable_kwargs_are_rays(monkeypatch):
    from ray.tune.execution import class_cache
    from ray.tune.experiment import trial

    monkeypatch.setitem(class_cache.DEFAULT_ENV_VARS, "STUDY_TEST_VARIABLE", "1")
    compat.tune_drop_actor_env_var("STUDY_TEST_VARIABLE")
    assert "STUDY_TEST_VARIABLE" not in class_cache.DEFAULT_ENV_VARS
    compat.tune_drop_actor_env_var("STUDY_TEST_VARIABLE")  # already gone: nothing to do
    assert list(inspect.signature(trial._get_trainable_kwargs).parameters) == ["trial"]
    monkeypatch.setattr(trial, "_get_trainable_kwargs", lambda t: {"config": t})
    assert compat.tune_trainable_kwargs("x") == {"config": "x"}


def _searcher() -> OptunaSearch:
    return OptunaSearch(space={"a": optuna.distributions.FloatDistribution(0, 1)}, metric="m",
                        mode="max", sampler=optuna.samplers.TPESampler(seed=0))


def test_optuna_search_names_reach_its_study_and_trials():
    searcher = _searcher()
    assert isinstance(compat.tune_search_study(searcher), optuna.Study)
    searcher.suggest("t1")
    assert set(compat.tune_search_trials(searcher)) == {"t1"}
    searcher.on_trial_complete("t1", {"m": 0.5})
    assert compat.tune_search_completed(searcher) == {"t1"}


def test_orphans_are_closed_failed_and_marked():
    """Trials the study holds RUNNING that the searcher does not know (asked by a driver that died)
    are told FAIL with the user attribute `orphaned`; the searcher's own are left running."""
    searcher = _searcher()
    searcher.suggest("mine")
    study = compat.tune_search_study(searcher)
    orphan = study.ask()
    assert space.forget_orphans(searcher) == 1
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[orphan.number].user_attrs == {"orphaned": True}
    mine = compat.tune_search_trials(searcher)["mine"].number
    assert trials[mine].state == TrialState.RUNNING and trials[mine].user_attrs == {}


def test_mlflow_store_is_the_clients(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    store = compat.mlflow_store(client)
    assert hasattr(store, "get_metric_history_bulk")


def _reply(status: int, body: dict | str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = (json.dumps(body) if isinstance(body, dict) else body).encode()
    return response


def test_mlflow_server_history_bulk_asks_the_endpoint(monkeypatch):
    from mlflow.utils import rest_utils

    asked = []
    metrics = [{"run_id": "r", "key": "k", "step": 0, "value": 1.0, "timestamp": 0}]

    def http_request(**request):
        asked.append(request)
        return _reply(200, {"metrics": metrics})

    monkeypatch.setattr(rest_utils, "http_request", http_request)
    assert compat.mlflow_server_history_bulk("creds", ["r"], "k", 5) == metrics
    assert asked == [{"host_creds": "creds", "endpoint": compat.MLFLOW_HISTORY_BULK, "method": "GET",
                      "params": {"run_id": ["r"], "metric_key": "k", "max_results": 5}}]


def test_a_tracking_server_without_the_endpoint_is_refused_in_one_line(monkeypatch):
    from mlflow.utils import rest_utils

    monkeypatch.setattr(rest_utils, "http_request", lambda **request: _reply(404, "<html>\nNot Found"))
    with pytest.raises(compat.PrivateAPIError) as caught:
        compat.mlflow_server_history_bulk("creds", ["r"], "k", 5)
    assert str(caught.value).startswith(
        f"mlflow {mlflow.__version__} reached a tracking server without {compat.MLFLOW_HISTORY_BULK} "
        f"(checked with mlflow 3.17.2)")


# --- refused: a missing name, an unchecked version


def _one_line_error(call, *args) -> str:
    with pytest.raises(compat.PrivateAPIError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_missing_private_attribute_is_refused_in_one_line(monkeypatch):
    monkeypatch.delattr(importlib.import_module("keras.src.random.seed_generator"), "draw_seed")
    assert _one_line_error(compat.keras_draw_seed, 1) == (
        f"keras {keras.__version__} has no keras.src.random.seed_generator.draw_seed (checked with "
        f"keras 3.15.1): see 'Private calls into other libraries' in docs/design.md")


def test_a_missing_private_module_is_refused(monkeypatch):
    monkeypatch.setattr(compat, "RAY_INIT_IMPORTS", ("ray._no_such_module",))
    assert "has no ray._no_such_module (checked with ray 2.60.0)" in _one_line_error(
        compat.import_ray_init_modules)


def test_a_missing_instance_attribute_or_parameter_is_refused():
    assert "has no ray.tune.search.optuna.OptunaSearch._ot_study" in _one_line_error(
        compat.tune_search_study, object())
    assert "has no optuna.study.Study._storage" in _one_line_error(
        compat.optuna_set_trial_user_attr, object(), object(), "k", 1)
    node = types.SimpleNamespace(kill_all_processes=lambda check_alive=True: None)
    assert "has no ray._private.node.Node.kill_all_processes(allow_graceful=)" in _one_line_error(
        compat.ray_kill_at_once_on_shutdown, node)


@pytest.mark.parametrize("library,call,private", [
    ("ray", compat.ray_local_cpus, "ray._private.utils.get_num_cpus"),
    ("keras", lambda: compat.keras_draw_seed(1), "keras.src.random.seed_generator.draw_seed"),
    ("tensorflow", compat.tf_gradient_registry, "tensorflow.python.framework.ops._gradient_registry"),
    ("mlflow", lambda: compat.mlflow_store(object()), "mlflow.tracking.MlflowClient._tracking_client"),
    ("optuna", lambda: compat.optuna_set_trial_user_attr(object(), object(), "k", 1),
     "optuna.study.Study._storage"),
])
def test_another_minor_release_is_refused_and_another_patch_release_trusted(monkeypatch, library,
                                                                           call, private):
    checked = compat.CHECKED[library][0]
    major, minor, _ = checked.split(".")
    versions = {library: f"{major}.{int(minor) + 1}.0"}
    monkeypatch.setattr(compat, "installed", lambda name: versions.get(name, compat.CHECKED[name][0]))
    assert _one_line_error(call) == (
        f"{library} {major}.{int(minor) + 1}.0 is not a checked version for {private} (checked with "
        f"{library} {checked}): see 'Private calls into other libraries' in docs/design.md")
    versions[library] = f"{major}.{minor}.99"
    try:
        call()
    except compat.PrivateAPIError as err:  # only a missing name (the fakes' attributes) may fail
        assert " has no " in str(err)


def test_the_project_code_passes_the_refusal_on(monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda name: "9.0.0")
    assert "ray 9.0.0 is not a checked version" in _one_line_error(resources.local_node)


# --- the static rule: no other source touches a private name

LIBRARIES = r"(?:ray|optuna|mlflow|keras|tensorflow|pandas)"
PRIVATE = re.compile("|".join([
    rf"\b{LIBRARIES}(?:\.\w+)*\._\w",  # a private module or attribute by its dotted path
    r"\bkeras\.src\b|\btensorflow\.python\b",  # private packages without an underscore
    rf"\bfrom\s+{LIBRARIES}[\w.]*\s+import\s+[^#\n]*\b_[a-z]",  # a private name imported
    r"\._ot_\w+|\._completed_trials\b",  # OptunaSearch's, also through `self` in a subclass
    r"(?<!self)(?<!cls)\.(?:_storage|_trial_id|_tracking_client|_global_node|_gradient_registry"
    r"|_registry|_mark_trial_to_checkpoint)\b",
    r"\.(?:all_processes|kill_all_processes)\b",
    r"\b(?:DEFAULT_ENV_VARS|class_cache)\b",  # Ray Tune's module-level actor environment
    r"\b(?:draw_seed|get_num_cpus|get_accelerator_manager_for_resource|get_cluster_config"
    r"|GraphOrParentsInXlaContext|_escape_latex|style_render)\b",
    r"ajax-api",
]))
FORMER = """
from keras.src.random.seed_generator import draw_seed
    return ops._gradient_registry._registry
    from tensorflow.python.ops import control_flow_util
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.state import state
    if not _started_here or ray._private.worker._global_node is None:
RAY_INIT_IMPORTS = ("ray._common.usage.usage_lib", "ray.dashboard.optional_deps", "click")
    node.kill_all_processes = lambda **how: kill(**{**how, "allow_graceful": False})
    for infos in node.all_processes.values():
    study = searcher._ot_study
        if trial_id in self._completed_trials:
        study._storage.set_trial_user_attr(trial._trial_id, "orphaned", True)
from pandas.io.formats.style_render import _escape_latex
    store = client._tracking_client.store
REST_BULK = "/ajax-api/2.0/mlflow/metrics/get-history-bulk"
    class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    from ray.tune.experiment.trial import _get_trainable_kwargs
        staging = Path(controller._storage.experiment_driver_staging_path)
        controller._mark_trial_to_checkpoint(trial)
"""


def test_the_rule_sees_every_former_private_call():
    assert all(PRIVATE.search(line) for line in FORMER.strip().splitlines())


def test_no_source_but_compat_touches_a_private_name():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for folder in ("study", "sweeps", "analysis", "bench")
             for path in sorted((ROOT / folder).rglob("*.py"))
             if path != ROOT / "study" / "compat.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert found == []
