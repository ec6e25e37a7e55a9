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

Implementation: on CPU, for float32 and outside XLA, the training branch is one fused kernel forward
(noise, coin, sat and hard in one pass, the draws taken inside it from the Keras seeds) and one fused
kernel backward (`study.fused`, `study/kernels/sigmoid_or_binary.cc`, built by `make setup`);
elsewhere, or without the built library, the same formulas run as separate TensorFlow ops. Both draw
the same coins and (to a few ulps) the same noise from the same seeds: the batch and example coins
are keras.random.uniform(...) < p, the unit coins the same law from a quarter of the random bits
(`_unit_coins`), the noise keras.random.normal.

References: Stack Overflow question 62379895 ("different forward and backward propagation in
TensorFlow 2 and Keras"), whose `sigmoid_or_bin` this generalises; Kaiser & Bengio 2018, "Discrete
autoencoders for sequence models" (improved semantic hashing, tensor2tensor `discretization.py`);
larq `quantizers.py`.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from study import compat, fused

GRANULARITIES = ("batch", "example", "unit")
SURROGATES = ("sigmoid", "ste", "hard_sigmoid")
EVAL_MODES = ("binary", "soft")


def saturation_threshold(slope: float, cutoff: float) -> float:
    """|x| from which sat(x) is clipped to 0 or 1: ln((c + 1) / (c - 1)) / s (infinite for c = 1)."""
    if cutoff == 1:
        return math.inf
    return math.log((cutoff + 1) / (cutoff - 1)) / slope


def hard(x: tf.Tensor) -> tf.Tensor:
    """The hard 0/1 step 1[x > 0] (no gradient flows through it)."""
    x = tf.convert_to_tensor(x)
    if fused.usable(x):
        return tf.stop_gradient(_kernel(x, coin="hard", keep="none")[0])
    return tf.cast(x > 0, x.dtype)


def saturating_sigmoid(x: tf.Tensor, slope: float = 1.0, cutoff: float = 1.0) -> tf.Tensor:
    """sat(x) = clip(c * sigmoid(s x) - (c - 1) / 2, 0, 1); its gradient is sat'(x)."""
    x = tf.convert_to_tensor(x)
    if not fused.usable(x):
        return _saturate(tf.sigmoid(_scaled(x, slope)), cutoff)

    @tf.custom_gradient
    def op(x):  # the op with p = 0; sigmoid(s x) is kept for the gradient only when it is asked for
        def grad(dy):  # sat'(x): the sigmoid surrogate
            aux = _kernel(x, coin="soft", keep="sig", slope=slope, cutoff=cutoff)[1]
            return _kernel_grad(dy, aux, "sigmoid", slope, cutoff)

        return _kernel(x, coin="soft", keep="none", slope=slope, cutoff=cutoff)[0], grad

    return op(x)


def surrogate_gradient(
    x: tf.Tensor, *, slope: float = 1.0, cutoff: float = 1.0, surrogate: str = "sigmoid"
) -> tf.Tensor:
    """The surrogate g(x) that the backward pass uses in place of dy/dx (see the module docstring)."""
    check_options(slope=slope, cutoff=cutoff, surrogate=surrogate)
    x = tf.convert_to_tensor(x)
    sig = tf.sigmoid(_scaled(x, slope)) if surrogate == "sigmoid" else None
    return _surrogate_times(tf.ones_like(x), x, sig, slope, cutoff, surrogate)


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
    if p is not None and not isinstance(p, tf.Tensor) and not 0 <= p <= 1:
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
) -> tf.Tensor:
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
    x = tf.convert_to_tensor(x)

    def train_branch():
        if fused.usable(x):
            return _fused_op(x, p, slope, cutoff, granularity, noise_std, surrogate, seed)
        z = x
        if noise_std > 0:
            z = z + noise_std * tf.random.stateless_normal(
                tf.shape(x), seed=_seed32(_draw_seed(seed)), mean=0.0, stddev=1.0, dtype=x.dtype)
        return _coin_op(z, _draw_coin(z, p, granularity, seed), slope, cutoff, surrogate)

    def eval_branch():
        return hard(x) if eval_mode == "binary" else saturating_sigmoid(x, slope, cutoff)

    if isinstance(training, (tf.Tensor, tf.Variable)):
        return tf.cond(training, train_branch, eval_branch)
    return train_branch() if training else eval_branch()


def _scaled(x: tf.Tensor, slope: float) -> tf.Tensor:
    return x if slope == 1 else x * slope


def _saturate(sig: tf.Tensor, cutoff: float) -> tf.Tensor:
    if cutoff == 1:
        return sig
    return tf.clip_by_value(cutoff * sig - (cutoff - 1) / 2, 0.0, 1.0)


def _draw_seed(seed) -> tf.Tensor:
    """The int64 seed pair of one draw: the generator's next state, the seed keras.random.* would
    draw with (`compat.keras_draw_seed`). Under a distribution strategy with several replicas, whose
    generator state is mirrored, replica r draws from stateless_fold_in(seed, r) (Philox) instead,
    so that the replicas' coins and noise are distinct, and reproducible from the seed; with one
    replica (one device, or no strategy) the draw is keras.random.*'s own."""
    drawn = tf.cast(compat.keras_draw_seed(seed), tf.int64)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return drawn
    replica = tf.cast(context.replica_id_in_sync_group, tf.int64)
    return tf.cast(tf.random.experimental.stateless_fold_in(_seed32(drawn), replica, alg="philox"),
                   tf.int64)


def _seed32(drawn: tf.Tensor) -> tf.Tensor:
    """A drawn seed as TensorFlow's stateless ops take it from keras.random.*: int32, mod 2^31 - 2."""
    return tf.cast(tf.math.floormod(drawn, 2**31 - 2), tf.int32)


def _draw_coin(z: tf.Tensor, p, granularity: str, seed):
    """B ~ Bernoulli(p) as a boolean tensor broadcastable to z, or a Python bool when p is 0 or 1:
    keras.random.uniform(shape) < p, drawn as keras.random.uniform draws (its TensorFlow backend:
    the stateless uniform from the drawn seed) so that the replicas can differ (`_draw_seed`). The
    uniforms are float32 whatever z's dtype: in float16 or bfloat16 p itself would be rounded
    (bfloat16 resolves 2^-8 near 0.5)."""
    if not isinstance(p, tf.Tensor) and p in (0, 1):
        return bool(p)
    if granularity == "unit":
        return _unit_coins(tf.shape(z), p, seed)
    if granularity == "batch":
        shape = []
    elif granularity == "example":
        shape = tf.concat([tf.shape(z)[:1], tf.ones([tf.rank(z) - 1], tf.int32)], axis=0)
    else:
        shape = tf.shape(z)
    uniform = tf.random.stateless_uniform(shape, seed=_seed32(_draw_seed(seed)), minval=0.0,
                                          maxval=1.0, dtype=tf.float32)
    return uniform < tf.cast(p, tf.float32)


def _unit_coins(shape: tf.Tensor, p, seed) -> tf.Tensor:
    """One coin per element: B = m < P, m a uniform 23-bit integer and P = ceil(p 2^23), the law of
    keras.random.uniform(shape) < p, from a quarter of the Philox blocks: m's top 8 bits are the
    bytes of the blocks keras.random.* would draw from the seed (16 coins a block), and m's low 15
    bits are read only where the top 8 equal P's (1 coin in 256), from a second Philox stream (the
    same key, the counter's top bit flipped). The fused kernel draws the same coins. The per-element
    comparisons are in float32, which holds every value exactly: int32 element-wise ops would run in
    host memory on a GPU."""
    key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=_seed32(_draw_seed(seed)))
    n = tf.reduce_prod(shape)
    words = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[(n + 15) // 16 * 4], key=key, counter=counter, alg=alg, dtype=tf.uint32)
    top = tf.cast(tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:n], tf.float32)
    ties = tf.bitwise.bitwise_xor(counter, tf.constant([0, 2**63], tf.uint64))
    low = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[n], key=key, counter=ties, alg=alg,
                                                     dtype=tf.uint32)
    low = tf.cast(tf.bitwise.bitwise_and(low, 0x7FFF), tf.float32)
    whole_p = tf.clip_by_value(tf.math.ceil(tf.cast(p, tf.float64) * 2.0**23), 0.0, 2.0**23)
    top_p = tf.cast(tf.math.floor(whole_p / 2**15), tf.float32)
    low_p = tf.cast(whole_p - tf.math.floor(whole_p / 2**15) * 2**15, tf.float32)
    return tf.reshape((top < top_p) | ((top == top_p) & (low < low_p)), shape)


def _surrogate_times(dy, z, sig, slope: float, cutoff: float, surrogate: str) -> tf.Tensor:
    """dy * g(z), given sig = sigmoid(s z) from the forward pass (unused by "ste"/"hard_sigmoid")."""
    if surrogate == "sigmoid":
        grad = tf.raw_ops.SigmoidGrad(y=sig, dy=dy)  # dy * sig * (1 - sig), one fused kernel
        if slope * cutoff != 1:
            grad = grad * (slope * cutoff)
        if cutoff > 1:
            grad = tf.where(tf.abs(z) < saturation_threshold(slope, cutoff), grad, tf.zeros_like(grad))
        return grad
    inside = tf.abs(z) <= 1
    return tf.where(inside, dy if surrogate == "ste" else 0.5 * dy, tf.zeros_like(dy))


def _coin_op(z: tf.Tensor, coin, slope: float, cutoff: float, surrogate: str) -> tf.Tensor:
    """y = where(coin, hard(z), sat(z)) with the analytic surrogate gradient; the coin is closed over."""
    needs_sigmoid = surrogate == "sigmoid" or coin is not True

    @tf.custom_gradient
    def op(z):
        sig = tf.sigmoid(_scaled(z, slope)) if needs_sigmoid else None
        if coin is True:
            y = hard(z)
        elif coin is False:
            y = _saturate(sig, cutoff)
        else:  # one coin for the batch too: a tf.cond would sync device and host per layer
            y = tf.where(coin, hard(z), _saturate(sig, cutoff))

        def grad(dy):
            return _surrogate_times(dy, z, sig, slope, cutoff, surrogate)

        return y, grad

    return op(z)


def _fused_op(x: tf.Tensor, p, slope: float, cutoff: float, granularity: str, noise_std: float,
              surrogate: str, seed) -> tf.Tensor:
    """The training branch as one fused kernel forward and one backward (`study.fused`).

    The kernel draws the noise and the coin itself, from the seeds keras.random.normal and
    keras.random.uniform would be given, in the same order: the batch and example coins are
    keras.random.uniform's bit for bit, the unit coins `_unit_coins`', the normals
    keras.random.normal's to a few ulps. Its second output keeps what the backward needs:
    sigmoid(s z), zeroed where |z| >= T (the surrogate's mask, decided once in the forward), or z
    for "ste"/"hard_sigmoid" with noise."""
    noise_seed = _draw_seed(seed) if noise_std > 0 else None
    if not isinstance(p, tf.Tensor) and p in (0, 1):
        coin, coin_seed = ("hard" if p == 1 else "soft"), None
    else:
        coin, coin_seed = granularity, _draw_seed(seed)
    keep = "sig" if surrogate == "sigmoid" else "z" if noise_std > 0 else "none"

    @tf.custom_gradient
    def op(x):
        y, aux = _kernel(x, coin=coin, keep=keep, p=p, slope=slope, cutoff=cutoff,
                         noise_std=noise_std, coin_seed=coin_seed, noise_seed=noise_seed)

        def grad(dy):
            return _kernel_grad(dy, x if keep == "none" else aux, surrogate, slope, cutoff)

        return y, grad

    return op(x)


def _kernel(x: tf.Tensor, *, coin: str, keep: str, p=0.0, slope: float = 1.0, cutoff: float = 1.0,
            noise_std: float = 0.0, coin_seed=None, noise_seed=None) -> tuple[tf.Tensor, tf.Tensor]:
    """The fused forward kernel: (y, aux); see study/kernels/sigmoid_or_binary.cc."""
    no_seed = tf.zeros([2], tf.int64)
    return fused.ops().study_sigmoid_or_binary(
        x, tf.cast(p, tf.float32), no_seed if coin_seed is None else coin_seed,
        no_seed if noise_seed is None else noise_seed, coin=coin, keep=keep, slope=slope,
        cutoff=cutoff, offset=(cutoff - 1) / 2, threshold=saturation_threshold(slope, cutoff),
        noise_std=noise_std)


def _kernel_grad(dy: tf.Tensor, aux: tf.Tensor, surrogate: str, slope: float, cutoff: float):
    """The fused backward kernel: dy * g(z), from the forward's aux (or x)."""
    return fused.ops().study_sigmoid_or_binary_grad(dy, aux, surrogate=surrogate,
                                                    scale=slope * cutoff)


def traced_gradients() -> frozenset[str]:
    """Names of the gradient functions `tf.custom_gradient` has registered so far in this process.

    Traced in graph mode (inside `tf.function`, so in every `model.fit`), each call of the op
    registers its gradient function in TensorFlow's process-wide gradient registry, and nothing
    removes it; the function closes over tensors of the traced graph, so every model a process ever
    trained stays in memory (megabytes per trial). A process that trains one model
    after another (a reused Ray worker) calls `forget_gradients(traced_gradients() - before)` once a
    model is done with: its graphs are traced, and nothing will differentiate them again.
    """
    return frozenset(k for k in compat.tf_gradient_registry() if k.startswith("CustomGradient-"))


def forget_gradients(names: frozenset[str]) -> None:
    """Unregister custom gradients by name (see `traced_gradients`)."""
    registry = compat.tf_gradient_registry()
    for name in names:
        registry.pop(name, None)


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
            self.steps = self.add_weight(
                shape=(), initializer="zeros", dtype="int64", trainable=False,
                aggregation="only_first_replica", name="steps",
            )

    def call(self, x, training=None):
        if isinstance(training, (tf.Tensor, tf.Variable)):
            return tf.cond(training, lambda: self.call(x, True), lambda: self.call(x, False))
        p = self.p
        if training and self.steps is not None:
            self.steps.assign_add(1)
            ramp = tf.minimum(tf.cast(self.steps.value, "float32") / self.p_ramp_steps, 1.0)
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
