"""Process-wide TensorFlow settings that a trial asks for: CPU thread pools."""

from __future__ import annotations

import logging

import tensorflow as tf

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


def gpu_memory_limit_mb(share: float, total_mb: int | None) -> int | None:
    """The memory cap of a trial that holds `share` (0 < share < 1) of one GPU of `total_mb`:
    floor(share * total); None for whole GPUs or an unknown total (then memory grows on demand)."""
    if not 0 < share < 1 or not total_mb:
        return None
    return int(share * total_mb)


def configure_gpus(share: float, total_mb: int | None) -> list[str]:
    """Prepare the GPUs this process sees (Ray sets CUDA_VISIBLE_DEVICES) and name them.

    A fractional trial caps TensorFlow's memory on its GPU at its share; whole GPUs grow memory on
    demand instead of taking it all. Must run before TensorFlow touches a GPU.
    """
    gpus = tf.config.list_physical_devices("GPU")
    limit = gpu_memory_limit_mb(share, total_mb)
    for gpu in gpus:
        if limit:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=limit)])
        else:
            tf.config.experimental.set_memory_growth(gpu, True)
    return [f"/gpu:{i}" for i in range(len(gpus))]


def strategy_for(devices: list[str]) -> tf.distribute.Strategy:
    """Data parallelism (MirroredStrategy) over several devices; the default strategy otherwise."""
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()
