"""Devices and threads: the GPU memory share of a fractional trial, multi-device data parallelism
on TensorFlow logical CPU devices (no GPU here: the GPU path itself cannot run on this machine)."""

import subprocess
import sys
from importlib import metadata

import pytest

from study import runtime
from study.runtime import configure_gpus, gpu_memory_limit_mb

from .conftest import ROOT


@pytest.mark.parametrize("share,total,limit", [(0.5, 24000, 11400), (0.25, 16384, 3496),
                                               (1.0, 24000, None), (2.0, 24000, None),
                                               (0.5, None, None)])
def test_fractional_trials_cap_their_gpu_memory_at_their_share(share, total, limit):
    assert gpu_memory_limit_mb(share, total) == limit


def test_without_a_gpu_no_device_is_configured():
    assert configure_gpus(0.5, 24000) == []


def test_a_trial_given_gpus_that_tensorflow_cannot_see_fails_in_one_line(monkeypatch):
    monkeypatch.delenv(runtime.GPU_STAND_IN, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(runtime.GPUNotVisible) as refused:
        runtime.check_gpus_seen(["3"], [])
    message = str(refused.value)
    assert "GPU 3" in message and "CUDA_VISIBLE_DEVICES='3'" in message
    assert "the CPU build" in message and "sees no GPU" in message and "\n" not in message
    assert runtime.check_gpus_seen(["3"], ["/gpu:0"]) is False  # seen: it trains there
    assert runtime.check_gpus_seen([], []) is False  # a CPU trial
    monkeypatch.setenv(runtime.GPU_STAND_IN, "1")
    assert runtime.check_gpus_seen(["3"], []) is True  # logical GPUs: the CPU stands in


MULTI_DEVICE = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from study import runtime
from study.config import TrialConfig
from study.train import train
strategy = runtime.strategy_for(["/cpu:0", "/cpu:1"])
cfg = TrialConfig.from_flat({"data.name": "synthetic", "budget.epochs": 2, "model.batch_norm": True,
                             "activation.granularity": "unit", "activation.p_ramp_steps": 10})
result = train(cfg, devices=["/cpu:0", "/cpu:1"])
print(strategy.num_replicas_in_sync, result.history[-1]["val/accuracy_binary"])
"""


def test_a_multi_device_trial_trains_data_parallel_over_logical_devices():
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replicas, accuracy = proc.stdout.split()[-2:]
    assert replicas == "2" and float(accuracy) > 0.5


LEAN_IMPORT = """
import sys
preloaded = sys.argv[1:]
for name in preloaded:
    __import__(name)
from study.lean_import import import_tensorflow
import_tensorflow()
loaded_with_tf = [n for n in ("sklearn", "matplotlib") if n in sys.modules]
import keras.src.wrappers.fixes as fixes
from study.config import TrialConfig
from study.train import train
result = train(TrialConfig.from_flat({"data.name": "synthetic", "budget.epochs": 1}))
import matplotlib.pyplot, sklearn.datasets  # importable afterwards
print(loaded_with_tf, fixes.sklearn is None, result.history[-1]["epoch"])
"""


@pytest.mark.parametrize("preloaded,loaded,wrappers_off", [((), [], True),
                                                            (("sklearn",), ["sklearn"], False)])
def test_tensorflow_imports_without_what_keras_loads_only_for_unused_features(
        preloaded, loaded, wrappers_off):
    """A worker's TensorFlow import leaves scikit-learn and matplotlib out (~1 s of its start-up),
    trains as usual, and both still import afterwards; one imported before stays as it is."""
    proc = subprocess.run([sys.executable, "-c", LEAN_IMPORT, *preloaded], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == f"{loaded} {wrappers_off} 1"


def test_a_local_gpu_sweep_in_an_environment_with_the_cpu_build_is_refused(monkeypatch):
    from sweeps.preflight import SweepError, check_gpu_build

    monkeypatch.delenv(runtime.GPU_STAND_IN, raising=False)
    installed = {"tensorflow-cpu": "2.21.0"}  # this environment, as requirements.lock pins it

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(SweepError, match=r"asks for 0.5 GPU .* \(tensorflow-cpu 2\.21\.0\)"):
        check_gpu_build(0.5)
    check_gpu_build(0)  # a CPU spec
    installed["tensorflow"] = "2.21.0"  # the build with CUDA
    check_gpu_build(0.5)
    del installed["tensorflow"]
    monkeypatch.setenv(runtime.GPU_STAND_IN, "1")
    check_gpu_build(0.5)


def test_the_caps_of_trials_sharing_a_gpu_leave_room_for_their_cuda_contexts():
    total, shares = 24000, [0.25] * 4
    used = sum(gpu_memory_limit_mb(s, total) + runtime.CUDA_CONTEXT_MB for s in shares)
    assert used <= total
    with pytest.raises(runtime.StudyError, match="ask for a larger share"):
        gpu_memory_limit_mb(0.02, total)  # 480 MB: less than a context


class FakeGPUs:
    """TensorFlow's device calls on a machine with one GPU (there is none here)."""

    def __init__(self, monkeypatch):
        self.capped, self.grown, self.reset = [], [], []
        config = runtime.tf.config
        monkeypatch.setattr(config, "list_physical_devices", lambda kind: ["GPU:0"])
        monkeypatch.setattr(config, "set_logical_device_configuration",
                            lambda gpu, limits: self.capped.append((gpu, limits[0].memory_limit)))
        monkeypatch.setattr(config.experimental, "set_memory_growth",
                            lambda gpu, on: self.grown.append(gpu))
        monkeypatch.setattr(config.experimental, "reset_memory_stats", self.reset.append)


def test_a_fractional_trial_is_capped_never_silently_uncapped(monkeypatch):
    gpus = FakeGPUs(monkeypatch)
    assert configure_gpus(0.5, 24000) == ["/gpu:0"]
    assert gpus.capped == [("GPU:0", 11400)] and gpus.grown == []
    with pytest.raises(runtime.GPUMemoryUnknown, match="would run uncapped"):
        configure_gpus(0.5, None)  # nvidia-smi did not answer
    assert configure_gpus(1.0, None) == ["/gpu:0"] and gpus.grown == ["GPU:0"]  # a whole GPU grows


def test_each_trial_in_a_reused_worker_starts_its_gpu_peak_afresh(monkeypatch):
    gpus = FakeGPUs(monkeypatch)
    runtime.reset_gpu_peaks(["/gpu:0", "/gpu:1"])
    runtime.reset_gpu_peaks([])  # a CPU trial
    assert gpus.reset == ["GPU:0", "GPU:1"]


SMI_LIST = """GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5a1c)
  MIG 3g.20gb     Device  0: (UUID: MIG-1f2e)
  MIG 2g.10gb     Device  1: (UUID: MIG-9c8d)
"""


@pytest.mark.parametrize("query,visible,expected", [
    ("40960, Disabled", "0", 40960),  # a whole GPU: its memory
    ("40960, [N/A]", "0", 40960),  # a GPU without MIG
    ("40960, Enabled", "MIG-1f2e", int(20 * 1024 * 0.95)),  # the instance this process sees
    ("40960, Enabled", "MIG-9c8d", int(10 * 1024 * 0.95)),
    ("40960, Enabled", "MIG-1f2e,MIG-9c8d", None),  # two instances: neither is the trial's own
    ("40960, Enabled", "0", None),  # MIG mode without an instance named: the card would be wrong
    (None, "0", None),  # no nvidia-smi
])
def test_a_gpus_memory_is_its_mig_instances_where_it_is_split(monkeypatch, query, visible,
                                                               expected):
    answers = {"--query-gpu=memory.total,mig.mode.current": query, "-L": SMI_LIST}
    monkeypatch.setattr(runtime, "_nvidia_smi", lambda *args: answers[args[0]])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert runtime.gpu_memory_mb("0") == expected
    if expected is None:  # a fractional trial there fails rather than run uncapped
        monkeypatch.setattr(runtime.tf.config, "list_physical_devices", lambda kind: ["GPU:0"])
        with pytest.raises(runtime.GPUMemoryUnknown):
            runtime.configure_gpus(0.5, runtime.gpu_memory_mb("0"))
