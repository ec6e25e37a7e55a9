"""One trial: `train(config, callbacks) -> TrainResult`, with per-epoch metrics and exact resume.

Metrics per epoch (DESIGN section 3): `train/loss`, `train/accuracy`, `val/accuracy_binary`,
`val/accuracy_soft`, `val/binary_gap` (= soft - binary), `val/accuracy_binary_best`, the `act/*`
diagnostics of `study.evaluation`, `time/epoch_s` (the training pass) and `time/eval_s`; the last
epoch's metrics also hold `test/accuracy_binary` and `test/accuracy_soft` of the final weights, so a
run stopped early never carries a test score. Sweeps plug in through callbacks
`(epoch, metrics, state)`, where `state.save(folder)` writes a checkpoint that `train(resume_from=...)`
continues from exactly (same weights, optimiser, random state and data order as an unbroken run).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from study import runtime
from study.config import OptimConfig, TrialConfig
from study.data import Dataset, load
from study.evaluation import Evaluator
from study.models import Network, build_network


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite; `history` holds the epochs completed before."""

    def __init__(self, message: str, history: list[dict[str, float]]):
        super().__init__(message)
        self.history = history


@dataclass
class TrainResult:
    config: dict[str, Any]  # the flat trial config
    history: list[dict[str, float]]  # one dict of metrics per epoch, with "epoch" (1-based)
    test: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=list)


class TrainState:
    """What a checkpoint holds: all model and optimiser variables plus the metric history."""

    def __init__(self, network: Network, history: list[dict[str, float]]):
        self.network, self.history = network, history

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        values = {f"v{i}": v.numpy() for i, v in enumerate(self._variables())}
        np.savez(folder / "variables.npz", **values)
        (folder / "history.json").write_text(json.dumps(self.history))

    def restore(self, folder: str | Path) -> None:
        folder = Path(folder)
        model = self.network.model
        model.optimizer.build(model.trainable_variables)
        with np.load(folder / "variables.npz") as saved:
            variables = self._variables()
            if len(saved.files) != len(variables):
                raise ValueError(f"{folder}: checkpoint holds {len(saved.files)} variables, "
                                 f"the model has {len(variables)}: was it made with another config?")
            for i, variable in enumerate(variables):
                variable.assign(saved[f"v{i}"])
        self.history[:] = json.loads((folder / "history.json").read_text())

    def _variables(self):
        model = self.network.model
        return [*model.variables, *model.optimizer.variables]


Callback = Callable[[int, dict[str, float], TrainState], None]


def train(
    config: TrialConfig,
    callbacks: Sequence[Callback] = (),
    *,
    dataset: Dataset | None = None,
    resume_from: str | Path | None = None,
    devices: Sequence[str] = (),
    verbose: int = 0,
) -> TrainResult:
    """Train `config` for `config.budget.epochs` epochs; raise TrialDiverged on a NaN loss.

    With several `devices` (e.g. the GPUs of a multi-GPU trial) each batch is split across them
    (MirroredStrategy); the batch size stays the global one.
    """
    runtime.configure_threads(config.runtime.threads)
    keras.backend.clear_session()  # a reused worker process starts every trial clean
    keras.utils.set_random_seed(config.seed)
    data = dataset if dataset is not None else load(config.data)
    with runtime.strategy_for(list(devices)).scope():
        network = build_network(config.model, config.activation, data.input_shape,
                                data.num_classes, seed=config.seed)
        model = network.model
        model.compile(
            optimizer=make_optimizer(config.optim),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=config.runtime.jit_compile,
        )
    history: list[dict[str, float]] = []
    state = TrainState(network, history)
    if resume_from is not None:
        state.restore(resume_from)
    evaluator = Evaluator(network, config.activation)
    evaluator(data.x_val, data.y_val, data.scale)  # codes before the next epoch, for the flip rate
    epochs, batch_size = config.budget.epochs, config.budget.batch_size
    if len(history) < epochs:
        sizes = {"model/params": float(model.count_params()),
                 "model/binary_units": float(network.evaluator.outputs[2].shape[-1])}
        hook = _EpochHook(evaluator, data, state, callbacks, last_epoch=epochs, constants=sizes)
        model.fit(
            batches(data.x_train, data.y_train, data.scale, batch_size, config.seed,
                    first_epoch=len(history), epochs=epochs),
            epochs=epochs, initial_epoch=len(history),
            steps_per_epoch=math.ceil(len(data.x_train) / batch_size),
            shuffle=False, callbacks=[hook], verbose=verbose,
        )
        if hook.diverged:
            raise TrialDiverged(hook.diverged, history)
    test = {k: v for k, v in history[-1].items() if k.startswith("test/")}
    return TrainResult(config=config.to_flat(), history=history, test=test)


def make_optimizer(cfg: OptimConfig) -> keras.optimizers.Optimizer:
    if cfg.name == "sgd":
        return keras.optimizers.SGD(cfg.lr, momentum=cfg.momentum)
    return keras.optimizers.Adam(cfg.lr)


def batches(x: np.ndarray, y: np.ndarray, scale: float, batch_size: int, seed: int, *,
            first_epoch: int, epochs: int) -> tf.data.Dataset:
    """Batches for epochs first_epoch..epochs-1; epoch e is shuffled by the stateless seed (seed, e),
    so a resumed run sees the same order as an unbroken one. The uint8 images (what Ray's object
    store shares) are scaled to float once per trial; a batch is then a single gather."""
    images = tf.cast(tf.constant(x), tf.float32) * scale
    labels, n = tf.constant(y), len(x)

    def epoch_order(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n), seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    def gather(index):
        return tf.gather(images, index), tf.gather(labels, index)

    epochs_ds = tf.data.Dataset.range(first_epoch, epochs).map(lambda e: tf.cast(e, tf.int32))
    return (epochs_ds.flat_map(epoch_order)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


class _EpochHook(keras.callbacks.Callback):
    """After each epoch: evaluate, assemble the metrics, stop on divergence, call the callbacks."""

    def __init__(self, evaluator: Evaluator, data: Dataset, state: TrainState,
                 callbacks: Iterable[Callback], last_epoch: int, constants: dict[str, float]):
        super().__init__()
        self.evaluator, self.data, self.state = evaluator, data, state
        self.last_epoch, self.constants = last_epoch, constants
        self.callbacks = list(callbacks)
        self.diverged: str | None = None
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        train_time = time.perf_counter() - self.started
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            self.diverged = f"train/loss is {loss} at epoch {epoch + 1}"
            self.model.stop_training = True
            return
        history = self.state.history
        ev = self.evaluator(self.data.x_val, self.data.y_val, self.data.scale)
        best = max([h["val/accuracy_binary"] for h in history] + [ev.accuracy_binary])
        metrics = {
            "epoch": epoch + 1,
            "train/loss": loss,
            "train/accuracy": float(logs["accuracy"]),
            "val/accuracy_binary": ev.accuracy_binary,
            "val/accuracy_soft": ev.accuracy_soft,
            "val/binary_gap": ev.accuracy_soft - ev.accuracy_binary,
            "val/accuracy_binary_best": best,
            **ev.diagnostics,
            "time/epoch_s": train_time,
            **self.constants,
        }
        if epoch + 1 == self.last_epoch:
            test = self.evaluator(self.data.x_test, self.data.y_test, self.data.scale,
                                  diagnostics=False)
            metrics["test/accuracy_binary"] = test.accuracy_binary
            metrics["test/accuracy_soft"] = test.accuracy_soft
        metrics["time/eval_s"] = time.perf_counter() - self.started - train_time
        history.append(metrics)
        for callback in self.callbacks:
            callback(epoch + 1, dict(metrics), self.state)
