"""One model builder from the typed config: architectures mlp, cnn, gated and bottleneck.

Every hidden nonlinearity that the study is about goes through `activation`; `build_network` returns
the trainable model and, sharing its weights, an evaluator whose outputs are the logits with every
such activation binarized (hard(x) = 1[x > 0]), the logits with every one soft, and the
pre-activations of every unit, flattened side by side (for the diagnostics). For the full-precision
baselines (sigmoid, ReLU) "binary" is the same network binarized after training.

In the binary twin each such unit is hard(x - t): t is a per-unit threshold (per unit of a dense
layer, per channel of a conv layer, shared over positions), one non-trainable tf.Variable per
activation layer in `Network.thresholds`, 0 unless `study.calibration` sets it. The thresholds are
no Keras weights (neither model's `weights` nor the model's checkpoint holds them) and the
pre-activations reported are x, not x - t.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from study.activations import SigmoidOrBinary, hard, saturating_sigmoid
from study.config import ActivationConfig, ModelConfig

Act = Callable[[object], object]


@dataclass(frozen=True)
class Network:
    model: keras.Model  # trained; its own evaluation follows activation.eval_mode
    evaluator: keras.Model  # same weights: [binary logits, soft logits, pre-activations (N, units)]
    thresholds: tuple[tf.Variable, ...] = ()  # the binary twin's t, one per activation layer, in order


class _Reuse:
    """Creates layers on the first pass through an architecture and hands the same ones out again."""

    def __init__(self):
        self.layers: list[keras.layers.Layer] = []
        self.index = 0

    def __call__(self, make: Callable[[], keras.layers.Layer]) -> keras.layers.Layer:
        if self.index == len(self.layers):
            self.layers.append(make())
        self.index += 1
        return self.layers[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


def build_network(
    model: ModelConfig, activation: ActivationConfig, input_shape, num_classes: int, seed: int = 0
) -> Network:
    """The model for `model.arch` with `activation` everywhere the study puts it."""
    arch = _ARCHS[model.arch]
    inputs = keras.Input(input_shape)
    reuse = _Reuse()
    trained: list[keras.layers.Layer] = []

    def train_act(x):
        trained.append(_trained_activation(activation, seed * 1000 + len(trained)))
        return trained[-1](x)

    logits = arch(inputs, model, num_classes, reuse, train_act)

    pre_activations, thresholds = [], []

    def binary_act(x):
        pre_activations.append(x)
        thresholds.append(tf.Variable(tf.zeros(x.shape[-1:]), trainable=False,
                                      name=f"threshold_{len(thresholds)}"))
        return HardAbove(thresholds[-1])(x)

    reuse.rewind()
    binary = arch(inputs, model, num_classes, reuse, binary_act)
    reuse.rewind()
    soft = arch(inputs, model, num_classes, reuse, lambda x: _soft_activation(activation)(x))
    units = [keras.layers.Flatten()(x) for x in pre_activations]
    units = keras.layers.Concatenate()(units) if len(units) > 1 else units[0]
    return Network(
        model=keras.Model(inputs, logits, name=model.arch),
        evaluator=keras.Model(inputs, [binary, soft, units], name=f"{model.arch}_eval"),
        thresholds=tuple(thresholds),
    )


class HardAbove(keras.layers.Layer):
    """hard(x - t), t a threshold per last-axis unit held as a plain tf.Variable (no Keras weight);
    x is compared in t's dtype (float32) whatever the layers compute in."""

    def __init__(self, threshold: tf.Variable, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold

    def call(self, x):
        return hard(tf.cast(x, self.threshold.dtype) - self.threshold)

    def compute_output_shape(self, input_shape):
        return input_shape


def _trained_activation(cfg: ActivationConfig, seed: int) -> keras.layers.Layer:
    if cfg.kind != "sigmoid_or_binary":
        return keras.layers.Activation(cfg.kind)
    return SigmoidOrBinary(
        p=cfg.p, slope=cfg.slope, cutoff=cfg.cutoff, granularity=cfg.granularity,
        noise_std=cfg.noise_std, surrogate=cfg.surrogate, eval_mode=cfg.eval_mode,
        p_ramp_steps=cfg.p_ramp_steps, seed=seed,
    )


def _soft_activation(cfg: ActivationConfig) -> keras.layers.Layer:
    if cfg.kind != "sigmoid_or_binary":
        return keras.layers.Activation(cfg.kind)
    return keras.layers.Activation(lambda x: saturating_sigmoid(x, cfg.slope, cfg.cutoff))


def _normalized(x, cfg: ModelConfig, reuse: _Reuse):
    return reuse(keras.layers.BatchNormalization)(x) if cfg.batch_norm else x


def mlp(inputs, cfg: ModelConfig, classes: int, reuse: _Reuse, act: Act):
    """Flatten -> [Dense(w) -> (BN) -> act] for w in widths -> Dense(classes)."""
    x = reuse(keras.layers.Flatten)(inputs)
    for width in cfg.widths:
        x = act(_normalized(reuse(lambda w=width: keras.layers.Dense(w))(x), cfg, reuse))
    return reuse(lambda: keras.layers.Dense(classes))(x)


def cnn(inputs, cfg: ModelConfig, classes: int, reuse: _Reuse, act: Act):
    """[Conv3x3(f) -> (BN) -> act -> MaxPool2] for f in filters -> Dense(dense_width) -> act -> Dense."""
    x = inputs
    for filters in cfg.filters:
        conv = reuse(lambda f=filters: keras.layers.Conv2D(f, 3, padding="same"))
        x = act(_normalized(conv(x), cfg, reuse))
        x = reuse(lambda: keras.layers.MaxPooling2D(2, padding="same"))(x)
    x = reuse(keras.layers.Flatten)(x)
    x = act(_normalized(reuse(lambda: keras.layers.Dense(cfg.dense_width))(x), cfg, reuse))
    return reuse(lambda: keras.layers.Dense(classes))(x)


def gated(inputs, cfg: ModelConfig, classes: int, reuse: _Reuse, act: Act):
    """The original question's use: h = relu(Dense(w) x) * act(Dense(w) x), a learned binary mask."""
    x = reuse(keras.layers.Flatten)(inputs)
    for width in cfg.widths:
        features = reuse(lambda w=width: keras.layers.Dense(w, activation="relu"))(x)
        mask = act(_normalized(reuse(lambda w=width: keras.layers.Dense(w))(x), cfg, reuse))
        x = reuse(keras.layers.Multiply)([features, mask])
    return reuse(lambda: keras.layers.Dense(classes))(x)


def bottleneck(inputs, cfg: ModelConfig, classes: int, reuse: _Reuse, act: Act):
    """Semantic hashing: relu encoder -> Dense(code_bits) -> (BN) -> act (a k-bit code) -> Dense."""
    x = reuse(keras.layers.Flatten)(inputs)
    for width in cfg.widths:
        x = reuse(lambda w=width: keras.layers.Dense(w, activation="relu"))(x)
    code = act(_normalized(reuse(lambda: keras.layers.Dense(cfg.code_bits))(x), cfg, reuse))
    return reuse(lambda: keras.layers.Dense(classes))(code)


_ARCHS = {"mlp": mlp, "cnn": cnn, "gated": gated, "bottleneck": bottleneck}
