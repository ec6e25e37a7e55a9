"""One trial: `Trainer(config).step()` per epoch, or `train(config, callbacks) -> TrainResult`.

Metrics per epoch (DESIGN section 3): `train/loss`, `train/accuracy`, `val/accuracy_binary`,
`val/accuracy_soft`, `val/binary_gap` (= soft - binary), `val/accuracy_binary_best`, the `act/*`
diagnostics of `study.evaluation`, `time/epoch_s` (the training pass), `time/eval_s` and the
trial's constants (`study.names.TRIAL_CONSTANTS`: size of the model, its set-up time).

A trial ends by its own rule after `budget.epochs` epochs or, with `budget.patience` = k > 0, on a
plateau: once the monitored validation accuracy (`budget.monitor`) has not improved for k epochs,
i.e. epoch - best_epoch >= k, best_epoch the first epoch of the highest value. The last epoch's
metrics then hold `test/accuracy_binary` and `test/accuracy_soft` and `test/epoch`, the epoch whose
weights were tested: the last one, or with a patience the best one (its weights are kept aside as
training goes on), and `test/accuracy_binary_calibrated`, the same weights' binary accuracy with
per-unit thresholds recalibrated on the validation set (`study.calibration`). A run stopped by a
scheduler never carries a test score. `Trainer.save(folder)` writes a checkpoint that
`Trainer.restore` (or `train(resume_from=...)`) continues from exactly: same weights (and best
weights), optimiser, random state and data order as an unbroken run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from study import runtime
from study.activations_tf import forget_gradients, traced_gradients
from study.calibration import calibrate, reset
from study.config import OptimConfig, TrialConfig
from study.data import Dataset, load
from study.errors import first_line
from study.evaluation import Evaluator
from study.models import build_network
from study.names import CALIBRATED, TEST_EPOCH

CHECKPOINT = "state"  # tf.train.Checkpoint's prefix in a checkpoint folder (state.index, state.data-*)


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


class Trainer:
    """One trial, an epoch at a time: `step()` trains one epoch, evaluates it and returns its metrics
    (a Ray Tune class trainable calls it once per `step`); `save`/`restore` hold all model and
    optimiser variables plus the history, so a restored trainer continues exactly.

    With several `devices` (e.g. the GPUs of a multi-GPU trial) each batch is split across them
    (MirroredStrategy); the batch size stays the global one.
    """

    def __init__(self, config: TrialConfig, *, dataset: Dataset | None = None,
                 devices: Sequence[str] = ()):
        started = time.perf_counter()
        self._gradients_before = traced_gradients()
        runtime.configure_threads(config.runtime.threads)
        keras.backend.clear_session()  # a reused worker process starts every trial clean
        keras.utils.set_random_seed(config.seed)
        runtime.configure_precision(config.runtime.precision)
        runtime.configure_determinism(config.runtime.deterministic)
        self.config = config
        self.data = data = dataset if dataset is not None else load(config.data)
        with runtime.strategy_for(list(devices)).scope():
            self.network = build_network(config.model, config.activation, data.input_shape,
                                         data.num_classes, seed=config.seed)
            self.network.model.compile(
                optimizer=make_optimizer(config.optim, config.budget.epochs * math.ceil(
                    len(data.x_train) / config.budget.batch_size)),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
                jit_compile=config.runtime.jit_compile,
            )
        self._train_tensors = as_tensors(data.x_train, data.y_train, data.scale)
        self.history: list[dict[str, float]] = []
        self._best = BestWeights(self.network.model) if config.budget.patience else None
        self.evaluator = Evaluator(self.network, config.activation)
        self._score_codes()
        self.sizes = {"model/params": float(self.network.model.count_params()),
                      "model/binary_units": float(self.network.evaluator.outputs[2].shape[-1]),
                      "time/setup_s": time.perf_counter() - started}

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.history)

    @property
    def best_epoch(self) -> int:
        """The first epoch with the highest monitored validation accuracy (0 before any)."""
        return best_epoch(self.history, self.config.budget.monitor)

    @property
    def done(self) -> bool:
        """The budget is spent, or (with a patience) the monitored metric is on a plateau."""
        budget = self.config.budget
        return self.epoch >= budget.epochs or (
            budget.patience > 0 and self.epoch - self.best_epoch >= budget.patience)

    def step(self, verbose: int = 0) -> dict[str, float]:
        """Train and evaluate the next epoch; raise TrialDiverged on a non-finite loss. The metrics
        of the epoch that ends the trial also carry the test accuracies (see the module)."""
        epoch, budget, data = self.epoch + 1, self.config.budget, self.data
        started = time.perf_counter()
        logs = self.network.model.fit(
            batches(*self._train_tensors, budget.batch_size, self.config.seed, epoch - 1),
            epochs=epoch, initial_epoch=epoch - 1,
            steps_per_epoch=math.ceil(len(data.x_train) / budget.batch_size),
            shuffle=False, verbose=verbose,
        ).history
        train_time = time.perf_counter() - started
        loss = float(logs["loss"][-1])
        if not math.isfinite(loss):
            raise TrialDiverged(f"train/loss is {loss} at epoch {epoch}", self.history)
        ev = self.evaluator(data.x_val, data.y_val, data.scale)
        best = max([h["val/accuracy_binary"] for h in self.history] + [ev.accuracy_binary])
        metrics = {
            "epoch": epoch,
            "train/loss": loss,
            "train/accuracy": float(logs["accuracy"][-1]),
            "val/accuracy_binary": ev.accuracy_binary,
            "val/accuracy_soft": ev.accuracy_soft,
            "val/binary_gap": ev.accuracy_soft - ev.accuracy_binary,
            "val/accuracy_binary_best": best,
            **ev.diagnostics,
            "time/epoch_s": train_time,
            **self.sizes,
        }
        self.history.append(metrics)
        if self._best is not None and self.best_epoch == epoch:
            self._best.keep()
        if self.done:
            if self._best is not None:
                self._best.put_back()
            test = self.evaluator(data.x_test, data.y_test, data.scale, diagnostics=False)
            metrics["test/accuracy_binary"] = test.accuracy_binary
            metrics["test/accuracy_soft"] = test.accuracy_soft
            metrics[TEST_EPOCH] = self.best_epoch if self._best is not None else epoch
            try:  # the same weights, thresholds recalibrated on the validation set, then 0 again
                calibrate(self.network, self.config.activation, data.x_val, data.scale)
                metrics[CALIBRATED] = self.evaluator(data.x_test, data.y_test, data.scale,
                                                     diagnostics=False).accuracy_binary
            finally:
                reset(self.network)
        metrics["time/eval_s"] = time.perf_counter() - started - train_time
        return dict(metrics)

    def result(self) -> TrainResult:
        test = {k: v for k, v in self.history[-1].items() if k.startswith("test/")}
        return TrainResult(config=self.config.to_flat(), history=list(self.history), test=test)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._checkpoint().write(str(folder / CHECKPOINT))
        (folder / "history.json").write_text(json.dumps(self.history))

    def restore(self, folder: str | Path) -> None:
        folder = Path(folder)
        model = self.network.model
        model.optimizer.build(model.trainable_variables)
        try:
            self._checkpoint().read(str(folder / CHECKPOINT)).assert_consumed()
        except (AssertionError, ValueError, tf.errors.OpError) as err:
            raise ValueError(f"{folder}: the checkpoint does not match this model "
                             f"({first_line(err, 300)}): was "
                             "it made with another config?") from err
        self.history[:] = json.loads((folder / "history.json").read_text())
        self._score_codes()

    def close(self) -> None:
        """Release what TensorFlow keeps of this trial process-wide (the custom gradients its
        tracing registered), so a process can train trial after trial without growing; the
        trainer is not to be stepped after."""
        forget_gradients(traced_gradients() - self._gradients_before)

    def _score_codes(self) -> None:
        """Evaluate once so the next epoch's flip rate compares with the current codes."""
        self.evaluator(self.data.x_val, self.data.y_val, self.data.scale)

    def _checkpoint(self) -> tf.train.Checkpoint:
        """The model's and the optimiser's variables by their place in the object graph, not by
        position: a model that differs fails to restore instead of receiving another variable's
        values. Keras' random-generator states are not in that graph: they follow, in the model's
        order, under `rng`."""
        model = self.network.model
        rng = [v for v in model.variables if v.name == "seed_generator_state"]
        best = {} if self._best is None else {"best": self._best.variables}
        return tf.train.Checkpoint(model=model, optimizer=model.optimizer, rng=rng, **best)


class BestWeights:
    """A copy of a model's weights at its best epoch so far: `keep()` copies the model's weights in,
    `put_back()` copies them back into the model."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.variables = [tf.Variable(w, trainable=False) for w in model.weights]

    def keep(self) -> None:
        for kept, weight in zip(self.variables, self.model.weights, strict=True):
            kept.assign(weight)

    def put_back(self) -> None:
        for kept, weight in zip(self.variables, self.model.weights, strict=True):
            weight.assign(kept)


def best_epoch(history: Sequence[dict[str, float]], monitor: str) -> int:
    """The first epoch (1-based) with the highest `monitor` in `history`; 0 for no history."""
    values = [h[monitor] for h in history]
    return values.index(max(values)) + 1 if values else 0


Callback = Callable[[int, dict[str, float], Trainer], None]


def train(
    config: TrialConfig,
    callbacks: Sequence[Callback] = (),
    *,
    dataset: Dataset | None = None,
    resume_from: str | Path | None = None,
    devices: Sequence[str] = (),
    verbose: int = 0,
) -> TrainResult:
    """Train `config` for `config.budget.epochs` epochs (continuing a checkpoint `resume_from`),
    calling each callback `(epoch, metrics, trainer)` after every epoch; raise TrialDiverged on a
    NaN loss."""
    trainer = Trainer(config, dataset=dataset, devices=devices)
    try:
        if resume_from is not None:
            trainer.restore(resume_from)
        while not trainer.done:
            metrics = trainer.step(verbose)
            for callback in callbacks:
                callback(trainer.epoch, dict(metrics), trainer)
        return trainer.result()
    finally:
        trainer.close()


def make_optimizer(cfg: OptimConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam or SGD at `cfg.lr`, constant or decayed to 0 along a cosine over `total_steps`."""
    lr = (keras.optimizers.schedules.CosineDecay(cfg.lr, decay_steps=total_steps)
          if cfg.schedule == "cosine" else cfg.lr)
    if cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    return keras.optimizers.Adam(lr)


def as_tensors(x: np.ndarray, y: np.ndarray, scale: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The uint8 images (what Ray's object store shares) scaled to float, once per trial."""
    return tf.cast(tf.constant(x), tf.float32) * scale, tf.constant(y)


def batches(images: tf.Tensor, labels: tf.Tensor, batch_size: int, seed: int, epoch: int
            ) -> tf.data.Dataset:
    """The batches of epoch `epoch` (0-based), shuffled by the stateless seed (seed, epoch), so a
    resumed run sees the same order as an unbroken one; a batch is a single gather."""
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(images)[0]),
                                                     seed=tf.constant([seed, epoch]))

    def gather(index):
        return tf.gather(images, index), tf.gather(labels, index)

    return (tf.data.Dataset.from_tensor_slices(order).batch(batch_size)
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))
