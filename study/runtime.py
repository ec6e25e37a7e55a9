"""Process-wide TensorFlow and Keras settings that a trial asks for: CPU thread pools, its GPUs,
its numeric precision and op determinism. Each is set again by every trial, so a reused worker runs
each trial as that trial asked."""

from __future__ import annotations

import logging
import os
import re
import subprocess

import keras
import tensorflow as tf

from study import compat
from study.errors import StudyError
from study.names import GPU_STAND_IN


class GPUNotVisible(StudyError):
    """Ray gave the trial GPUs that TensorFlow cannot see; the message names both."""

log = logging.getLogger(__name__)


def configure_threads(threads: int) -> None:
    """Size TensorFlow's intra- and inter-op pools to `threads` (0 keeps TensorFlow's default).

    TensorFlow fixes its pools when its runtime starts; a later, different request (a second trial in
    the same process asking for another count) is logged and the pools stay as they are.
    """
    if threads <= 0:
        return
    current = tf.config.threading.get_intra_op_parallelism_threads()
    if current == threads:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.warning("TensorFlow already runs with %s intra-op threads; %s requested", current or
                    "default", threads)


# Memory each process takes on its GPU outside TensorFlow's allocator: its CUDA context with the
# cuBLAS/cuDNN handles, a few hundred MB on current cards. Every trial sharing a GPU has its own
# process, so each cap leaves this much of its share to it.
CUDA_CONTEXT_MB = 600


class GPUMemoryUnknown(StudyError):
    """A fractional trial's GPU did not report its memory, so its cap cannot be set."""


def gpu_memory_limit_mb(share: float, total_mb: int | None) -> int | None:
    """The memory cap of a trial that holds `share` (0 < share < 1) of one GPU of `total_mb`:
    floor(share * total) - CUDA_CONTEXT_MB, so that the trials sharing the GPU and their processes'
    contexts fit on it together; None for whole GPUs (memory grows on demand) or an unknown total."""
    if not 0 < share < 1 or not total_mb:
        return None
    limit = int(share * total_mb) - CUDA_CONTEXT_MB
    if limit <= 0:
        raise StudyError(f"a trial with {share:g} of a GPU of {total_mb} MB would have {limit} MB "
                         f"left beside its process's CUDA context ({CUDA_CONTEXT_MB} MB): ask for "
                         "a larger share (resources.gpus)")
    return limit


MIG_LABEL_SHARE = 0.95  # of a MIG profile's labelled size, never above its memory (A100, H100)


def gpu_memory_mb(gpu_id: str) -> int | None:
    """Total memory in MB of the GPU Ray assigned as `gpu_id`, from nvidia-smi; None where it cannot
    be known (no nvidia-smi, no such GPU). A GPU in MIG mode is split into instances, each with a
    share of its memory, and CUDA_VISIBLE_DEVICES names the instance a process sees by its UUID
    (MIG-...): the memory is that instance's, from its profile's name in `nvidia-smi -L`
    ("MIG 3g.20gb Device 0: (UUID: MIG-...)"), MIG_LABEL_SHARE of the size the name gives (names
    round up: an A100's 3g.20gb holds 19,968 MiB, 0.975 of 20 GiB), and None when the process sees
    several instances, or none, of a GPU in MIG mode (the whole card's memory would be wrong)."""
    query = _nvidia_smi("--query-gpu=memory.total,mig.mode.current", "--format=csv,noheader,nounits",
                        "-i", gpu_id)
    try:
        total, mig = (field.strip() for field in query.splitlines()[0].split(","))
        total_mb = int(total)
    except (AttributeError, IndexError, ValueError):
        return None
    if mig != "Enabled":
        return total_mb
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if d.strip().startswith("MIG-")]
    if len(visible) != 1:
        return None
    for line in (_nvidia_smi("-L") or "").splitlines():
        if visible[0] in line and (profile := re.search(r"\bMIG\s+\d+g\.(\d+)gb\b", line)):
            return int(int(profile.group(1)) * 1024 * MIG_LABEL_SHARE)
    return None


def _nvidia_smi(*args: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=True,
                              timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def configure_gpus(share: float, total_mb: int | None) -> list[str]:
    """Prepare the GPUs this process sees (Ray sets CUDA_VISIBLE_DEVICES) and name them.

    A fractional trial caps TensorFlow's memory on its GPU (`gpu_memory_limit_mb`), and refuses to
    run uncapped where the GPU's memory is unknown; whole GPUs grow memory on demand instead of
    taking it all. Must run before TensorFlow touches a GPU.
    """
    gpus = tf.config.list_physical_devices("GPU")
    limit = gpu_memory_limit_mb(share, total_mb)
    if gpus and 0 < share < 1 and limit is None:
        raise GPUMemoryUnknown(f"a trial with {share:g} of a GPU caps its memory at its share, but "
                               "the GPU's total memory is unknown (nvidia-smi did not report it): "
                               "it would run uncapped beside the trials sharing the GPU")
    for gpu in gpus:
        if limit:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
        else:
            tf.config.experimental.set_memory_growth(gpu, True)
    return [f"/gpu:{i}" for i in range(len(gpus))]


def reset_gpu_peaks(devices: list[str]) -> None:
    """Start a trial's peak GPU memory (worker/gpu_peak_mb) afresh in a reused worker."""
    for device in devices:
        tf.config.experimental.reset_memory_stats(device.replace("/gpu", "GPU"))


def check_gpus_seen(assigned: list[str], devices: list[str]) -> bool:
    """Refuse a trial that Ray gave GPUs (`assigned`, its ids) but TensorFlow sees none of: it would
    train on the CPU while holding them. Whether the CPU stands in for them (GPU_STAND_IN=1)."""
    if not assigned or devices:
        return False
    if os.environ.get(GPU_STAND_IN) == "1":
        return True
    build = "built with CUDA" if tf.test.is_built_with_cuda() else "the CPU build"
    raise GPUNotVisible(
        f"Ray gave this trial GPU {', '.join(assigned)} (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}) but TensorFlow {tf.__version__} ({build}) "
        f"sees no GPU: install TensorFlow's GPU build on this node, or set {GPU_STAND_IN}=1 to "
        "train on the CPU (logical GPUs)")


def strategy_for(devices: list[str]) -> tf.distribute.Strategy:
    """Data parallelism (MirroredStrategy) over several devices; the default strategy otherwise."""
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def configure_precision(policy: str) -> None:
    """Keras' dtype policy for the models built next: "float32", or "mixed_bfloat16" /
    "mixed_float16" (variables in float32, layers computing in bfloat16 / float16; under
    mixed_float16 `compile` wraps the optimizer in Keras' LossScaleOptimizer). The activation's coin
    stays a float32 draw in every policy (`study.activations`)."""
    keras.config.set_dtype_policy(policy)


def configure_determinism(deterministic: bool) -> None:
    """TensorFlow's op determinism, on or off: on a GPU some kernels (reductions by atomics, cuDNN's
    fastest convolution algorithms) are nondeterministic unless it is on, and with it on, an op
    without a deterministic implementation raises instead of running. On the CPU the training step
    is deterministic either way."""
    compat.tf_set_op_determinism(deterministic)
