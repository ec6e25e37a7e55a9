"""The sigmoid-or-binary activation: a stochastic binary unit trained through a sigmoid surrogate.

With x the pre-activation, s > 0 the slope, c >= 1 the saturation (cutoff) and p in [0, 1]:

    sat(x)  = clip(c * sigmoid(s x) - (c - 1) / 2, 0, 1)    c = 1: sigmoid(s x); c = 1.2: Kaiser & Bengio
    hard(x) = 1[x > 0]                                        (0 at x == 0)

    training:  z = x + noise_std * N(0, 1)
               B ~ Bernoulli(p), one coin per batch | per example | per unit ("granularity")
               y = B * hard(z) + (1 - B) * sat(z)
               dy/dx := g(z), whatever B was (a straight-through estimator), with g the surrogate:
                 "sigmoid"       g = sat'(z) = c s sigmoid(s z) (1 - sigmoid(s z)) where |z| < T, else 0
                 "ste"           g = 1[|z| <= 1]            (larq SteHeaviside; BNN's hard-tanh STE)
                 "hard_sigmoid"  g = 0.5 * 1[|z| <= 1]      (the derivative of clip((z + 1) / 2, 0, 1):
                                 the STE times 1/2, which Adam's update divides out up to its epsilon,
                                 so under Adam it trains as the STE does; not a method of its own)
    evaluation: y = hard(x) (eval_mode "binary") or sat(x) (eval_mode "soft"); no noise, no coin.

T = ln((c + 1) / (c - 1)) / s is where sat saturates (ln 11 = 2.398 for c = 1.2, s = 1; infinite for
c = 1). p = 0 is an ordinary saturating-sigmoid unit, p = 1 a deterministic sigmoid-adjusted
straight-through estimator. With surrogate "ste" and p = 1 the op is exactly larq's SteHeaviside (the
straight-through estimator of Courbariaux et al. 2016, on 0/1 outputs); with p < 1 its soft branch is
still sat(z).

Implementation: one implementation in Keras ops, for every Keras 3 backend (TensorFlow, JAX,
PyTorch), with the surrogate gradient by `keras.ops.custom_gradient`; the training step it traces
has no data-dependent branch (the coin selects by `where`). On TensorFlow (`study.activations_tf`,
loaded only there) the coins and noise are drawn so that the fused CPU kernels draw the same, those
kernels are the fast path on the CPU (float32, outside XLA, built by `make setup`), and under a
distribution strategy each replica draws its own. On JAX and PyTorch the coins and noise are
keras.random's: the same laws, other bits. This module needs nothing but Keras and its backend.

References: Stack Overflow question 62379895 ("different forward and backward propagation in
TensorFlow 2 and Keras"), whose `sigmoid_or_bin` this generalises; Kaiser & Bengio 2018, "Discrete
autoencoders for sequence models" (improved semantic hashing, tensor2tensor `discretization.py`);
larq `quantizers.py`.
"""

from __future__ import annotations

import keras
from keras import ops

from study.saturation import saturation_threshold

GRANULARITIES = ("batch", "example", "unit")
SURROGATES = ("sigmoid", "ste", "hard_sigmoid")
EVAL_MODES = ("binary", "soft")


def hard(x):
    """The hard 0/1 step 1[x > 0] (no gradient flows through it)."""
    x = ops.convert_to_tensor(x)
    if (tf_side := _tensorflow()) is not None and tf_side.fused_usable(x):
        return tf_side.fused_hard(x)
    return _step(x)


def saturating_sigmoid(x, slope: float = 1.0, cutoff: float = 1.0):
    """sat(x) = clip(c * sigmoid(s x) - (c - 1) / 2, 0, 1); its gradient is sat'(x)."""
    x = ops.convert_to_tensor(x)
    if (tf_side := _tensorflow()) is not None and tf_side.fused_usable(x):
        return tf_side.fused_saturating(x, slope, cutoff)
    return _saturate(ops.sigmoid(_scaled(x, slope)), cutoff)


def surrogate_gradient(x, *, slope: float = 1.0, cutoff: float = 1.0, surrogate: str = "sigmoid"):
    """The surrogate g(x) that the backward pass uses in place of dy/dx (see the module docstring)."""
    check_options(slope=slope, cutoff=cutoff, surrogate=surrogate)
    x = ops.convert_to_tensor(x)
    sig = ops.sigmoid(_scaled(x, slope)) if surrogate == "sigmoid" else None
    return _surrogate_times(ops.ones_like(x), x, sig, slope, cutoff, surrogate)


def check_options(
    *,
    p: float | None = None,
    slope: float = 1.0,
    cutoff: float = 1.0,
    granularity: str = "batch",
    noise_std: float = 0.0,
    surrogate: str = "sigmoid",
    eval_mode: str = "binary",
) -> None:
    """Raise ValueError naming the first option that is out of range."""
    if p is not None and not ops.is_tensor(p) and not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not slope > 0:
        raise ValueError(f"slope must be > 0, got {slope}")
    if not cutoff >= 1:
        raise ValueError(f"cutoff must be >= 1, got {cutoff}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    for name, value, allowed in (
        ("granularity", granularity, GRANULARITIES),
        ("surrogate", surrogate, SURROGATES),
        ("eval_mode", eval_mode, EVAL_MODES),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def sigmoid_or_binary(
    x,
    *,
    p,
    slope: float = 1.0,
    cutoff: float = 1.0,
    granularity: str = "batch",
    noise_std: float = 0.0,
    surrogate: str = "sigmoid",
    training=True,
    eval_mode: str = "binary",
    seed=None,
):
    """Hard 0/1 with probability p, else sat(x), backpropagated through the surrogate g.

    The formulas are in the module docstring. `p` is a float or a scalar tensor (a schedule).
    `seed` is a `keras.random.SeedGenerator` (a fresh draw per call, reproducible from its seed, and
    what the layer uses), an int (the same draw at every call) or None (Keras' global generator, eager
    only). `training` is a Python bool (None means False) or a boolean tensor.
    """
    check_options(
        p=p, slope=slope, cutoff=cutoff, granularity=granularity,
        noise_std=noise_std, surrogate=surrogate, eval_mode=eval_mode,
    )
    x = ops.convert_to_tensor(x)
    tf_side = _tensorflow()

    def train_branch():
        if tf_side is not None and tf_side.fused_usable(x):
            return tf_side.fused_train(x, p, slope, cutoff, granularity, noise_std, surrogate, seed)
        z = x
        if noise_std > 0:
            z = z + noise_std * _normal(ops.shape(x), keras.backend.standardize_dtype(x.dtype),
                                        seed, tf_side)
        return _coin_op(z, _draw_coin(z, p, granularity, seed, tf_side), slope, cutoff, surrogate)

    def eval_branch():
        return hard(x) if eval_mode == "binary" else saturating_sigmoid(x, slope, cutoff)

    if ops.is_tensor(training):
        return ops.cond(training, train_branch, eval_branch)
    return train_branch() if training else eval_branch()


def _tensorflow():
    """`study.activations_tf` on Keras' TensorFlow backend, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    from study import activations_tf

    return activations_tf


def _step(x):
    return ops.cast(ops.greater(x, 0), keras.backend.standardize_dtype(x.dtype))


def _scaled(x, slope: float):
    return x if slope == 1 else x * slope


def _saturate(sig, cutoff: float):
    if cutoff == 1:
        return sig
    return ops.clip(cutoff * sig - (cutoff - 1) / 2, 0.0, 1.0)


def _normal(shape, dtype: str, seed, tf_side):
    """Standard normals of `dtype`, as keras.random.normal draws them."""
    if tf_side is not None:
        return tf_side.normal(shape, dtype, seed)
    return keras.random.normal(shape, dtype=dtype, seed=seed)


def _draw_coin(z, p, granularity: str, seed, tf_side):
    """B ~ Bernoulli(p) as a boolean tensor broadcastable to z, or a Python bool when p is 0 or 1:
    keras.random.uniform(shape) < p (per unit on TensorFlow: the same law from fewer random bits,
    `activations_tf.unit_coins`). The uniforms are float32 whatever z's dtype: in float16 or
    bfloat16 p itself would be rounded (bfloat16 resolves 2^-8 near 0.5)."""
    if not ops.is_tensor(p) and p == 0:  # tested, not bool(p): torch.compile traces p symbolic
        return False
    if not ops.is_tensor(p) and p == 1:
        return True
    shape = ops.shape(z)
    if granularity == "unit" and tf_side is not None:
        return tf_side.unit_coins(shape, p, seed)
    if granularity == "batch":
        shape = ()
    elif granularity == "example":
        shape = (shape[0],) + (1,) * (len(shape) - 1)
    if tf_side is not None:
        uniform = tf_side.uniform(shape, seed)
    else:
        uniform = keras.random.uniform(shape, dtype="float32", seed=seed)
    return ops.less(uniform, ops.cast(p, "float32"))


def _surrogate_times(dy, z, sig, slope: float, cutoff: float, surrogate: str):
    """dy * g(z), given sig = sigmoid(s z) from the forward pass (unused by "ste"/"hard_sigmoid")."""
    if surrogate == "sigmoid":
        grad = dy * sig * (1 - sig)
        if slope * cutoff != 1:
            grad = grad * (slope * cutoff)
        if cutoff > 1:
            inside = ops.less(ops.abs(z), saturation_threshold(slope, cutoff))
            grad = ops.where(inside, grad, ops.zeros_like(grad))
        return grad
    inside = ops.less_equal(ops.abs(z), 1)
    return ops.where(inside, dy if surrogate == "ste" else 0.5 * dy, ops.zeros_like(dy))


def _coin_op(z, coin, slope: float, cutoff: float, surrogate: str):
    """y = where(coin, hard(z), sat(z)) with the analytic surrogate gradient; the coin is closed
    over. One coin for the batch selects by `where` too: a data-dependent branch would synchronise
    a GPU with its host once per layer and step."""
    needs_sigmoid = surrogate == "sigmoid" or coin is not True

    @ops.custom_gradient
    def op(z):
        sig = ops.sigmoid(_scaled(z, slope)) if needs_sigmoid else None
        if coin is True:
            y = _step(z)
        elif coin is False:
            y = _saturate(sig, cutoff)
        else:
            y = ops.where(coin, _step(z), _saturate(sig, cutoff))

        def grad(*args, upstream=None):  # TensorFlow and JAX pass upstream alone, PyTorch by name
            if upstream is None:
                (upstream,) = args
            return _surrogate_times(upstream, z, sig, slope, cutoff, surrogate)

        return y, grad

    return op(z)


@keras.saving.register_keras_serializable(package="study")
class SigmoidOrBinary(keras.layers.Layer):
    """Keras layer of `sigmoid_or_binary` (formulas in the module docstring).

    `call(x, training)` trains with the coin and the surrogate gradient and evaluates with `eval_mode`.
    With `p_ramp_steps = N > 0`, p is ramped linearly from 0 to `p` over the first N training calls
    (the semantic-hashing schedule); the step counter is layer state, saved with the model.
    """

    def __init__(
        self,
        p: float = 0.5,
        slope: float = 1.0,
        cutoff: float = 1.0,
        granularity: str = "batch",
        noise_std: float = 0.0,
        surrogate: str = "sigmoid",
        eval_mode: str = "binary",
        p_ramp_steps: int = 0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_options(
            p=p, slope=slope, cutoff=cutoff, granularity=granularity,
            noise_std=noise_std, surrogate=surrogate, eval_mode=eval_mode,
        )
        if p_ramp_steps < 0:
            raise ValueError(f"p_ramp_steps must be >= 0, got {p_ramp_steps}")
        self.p, self.slope, self.cutoff = float(p), float(slope), float(cutoff)
        self.granularity, self.noise_std = granularity, float(noise_std)
        self.surrogate, self.eval_mode = surrogate, eval_mode
        self.p_ramp_steps, self.seed = int(p_ramp_steps), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.steps = None
        if self.p_ramp_steps:
            self.steps = self.add_weight(  # int64 on TensorFlow (GPUs keep int32 on the host),
                shape=(), initializer="zeros", trainable=False,  # JAX has no int64 by default
                dtype="int64" if keras.backend.backend() == "tensorflow" else "int32",
                aggregation="only_first_replica", name="steps",
            )

    def call(self, x, training=None):
        if ops.is_tensor(training):
            return ops.cond(training, lambda: self.call(x, True), lambda: self.call(x, False))
        p = self.p
        if training and self.steps is not None:
            self.steps.assign_add(1)
            ramp = ops.minimum(ops.cast(self.steps.value, "float32") / self.p_ramp_steps, 1.0)
            p = self.p * ramp
        return sigmoid_or_binary(
            x, p=p, slope=self.slope, cutoff=self.cutoff, granularity=self.granularity,
            noise_std=self.noise_std, surrogate=self.surrogate, training=training,
            eval_mode=self.eval_mode, seed=self.seed_generator,
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.p, "slope": self.slope, "cutoff": self.cutoff,
            "granularity": self.granularity, "noise_std": self.noise_std,
            "surrogate": self.surrogate, "eval_mode": self.eval_mode,
            "p_ramp_steps": self.p_ramp_steps, "seed": self.seed,
        }
