"""Devices and threads: the GPU memory share of a fractional trial, multi-device data parallelism
on TensorFlow logical CPU devices (no GPU here: the GPU path itself cannot run on this machine)."""

import subprocess
import sys

import pytest

from study.runtime import configure_gpus, gpu_memory_limit_mb

from .conftest import ROOT


@pytest.mark.parametrize("share,total,limit", [(0.5, 24000, 12000), (0.25, 16384, 4096),
                                               (1.0, 24000, None), (2.0, 24000, None),
                                               (0.5, None, None)])
def test_fractional_trials_cap_their_gpu_memory_at_their_share(share, total, limit):
    assert gpu_memory_limit_mb(share, total) == limit


def test_without_a_gpu_no_device_is_configured():
    assert configure_gpus(0.5, 24000) == []


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
