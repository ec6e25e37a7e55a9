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
