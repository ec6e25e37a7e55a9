"""The activation's TensorFlow side (`study.activations` is the op; it loads this module only on
Keras' TensorFlow backend):

- the fused CPU kernels as the op's fast path (`fused_train`, `fused_hard`, `fused_saturating`:
  one kernel forward, one backward; `study.fused`, `study/kernels/sigmoid_or_binary.cc`);
- the draws, taken from the seeds keras.random.* would use, so that the kernels and the Keras-ops
  path draw the same: the batch and example coins are keras.random.uniform(shape) < p, the unit
  coins the same law from a quarter of the random bits (`unit_coins`), the noise
  keras.random.normal; under a distribution strategy each replica draws its own (`replica_seed`);
- the process-wide registry of traced custom gradients (`traced_gradients`, `forget_gradients`).
"""

from __future__ import annotations

import tensorflow as tf

from study import compat, fused
from study.saturation import saturation_threshold


def replica_seed(seed) -> tf.Tensor:
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


def uniform(shape, seed) -> tf.Tensor:
    """float32 uniforms in [0, 1), as keras.random.uniform(shape, dtype="float32") draws them."""
    return tf.random.stateless_uniform(shape, seed=_seed32(replica_seed(seed)), minval=0.0,
                                       maxval=1.0, dtype=tf.float32)


def normal(shape, dtype, seed) -> tf.Tensor:
    """Standard normals, as keras.random.normal(shape, dtype=dtype) draws them."""
    return tf.random.stateless_normal(shape, seed=_seed32(replica_seed(seed)), mean=0.0, stddev=1.0,
                                      dtype=dtype)


def unit_coins(shape, p, seed) -> tf.Tensor:
    """One coin per element: B = m < P, m a uniform 23-bit integer and P = ceil(p 2^23), the law of
    keras.random.uniform(shape) < p, from a quarter of the Philox blocks: m's top 8 bits are the
    bytes of the blocks keras.random.* would draw from the seed (16 coins a block), and m's low 15
    bits are read only where the top 8 equal P's (1 coin in 256), from a second Philox stream (the
    same key, the counter's top bit flipped). The fused kernel draws the same coins. The per-element
    comparisons are in float32, which holds every value exactly: int32 element-wise ops would run in
    host memory on a GPU."""
    shape = tf.convert_to_tensor(shape, tf.int32)
    key, counter, alg = tf.raw_ops.StatelessRandomGetKeyCounterAlg(seed=_seed32(replica_seed(seed)))
    n = tf.reduce_prod(shape)
    words = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=[(n + 15) // 16 * 4], key=key, counter=counter, alg=alg, dtype=tf.uint32)
    top = tf.cast(tf.reshape(tf.bitcast(words, tf.uint8), [-1])[:n], tf.float32)
    ties = tf.bitwise.bitwise_xor(counter, tf.constant([0, 2**63], tf.uint64))
    low = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[n], key=key, counter=ties, alg=alg,
                                                     dtype=tf.uint32)
    low = tf.cast(tf.bitwise.bitwise_and(low, 0x7FFF), tf.float32)
    whole_p = tf.clip_by_value(tf.math.ceil(tf.cast(p, tf.float64) * 2.0**23), 0.0, 2.0**23)
    top_p = tf.math.floor(whole_p / 2**15)
    low_p = tf.cast(whole_p - top_p * 2**15, tf.float32)
    top_p = tf.cast(top_p, tf.float32)
    return tf.reshape((top < top_p) | ((top == top_p) & (low < low_p)), shape)


def fused_usable(x) -> bool:
    """Whether the op on x runs the fused kernels (`study.fused.usable`)."""
    return isinstance(x, (tf.Tensor, tf.Variable)) and fused.usable(x)


def fused_hard(x: tf.Tensor) -> tf.Tensor:
    """hard(x) by the fused kernel (no gradient)."""
    return tf.stop_gradient(_kernel(x, coin="hard", keep="none")[0])


def fused_saturating(x: tf.Tensor, slope: float, cutoff: float) -> tf.Tensor:
    """sat(x) by the fused kernel, with sat'(x) as its gradient; sigmoid(s x) is kept for the
    gradient only when the gradient is asked for."""

    @tf.custom_gradient
    def op(x):
        def grad(dy):
            aux = _kernel(x, coin="soft", keep="sig", slope=slope, cutoff=cutoff)[1]
            return _kernel_grad(dy, aux, "sigmoid", slope, cutoff)

        return _kernel(x, coin="soft", keep="none", slope=slope, cutoff=cutoff)[0], grad

    return op(x)


def fused_train(x: tf.Tensor, p, slope: float, cutoff: float, granularity: str, noise_std: float,
                surrogate: str, seed) -> tf.Tensor:
    """The training branch as one fused kernel forward and one backward.

    The kernel draws the noise and the coin itself, from the seeds keras.random.normal and
    keras.random.uniform would be given, in the same order: the batch and example coins are
    keras.random.uniform's bit for bit, the unit coins `unit_coins`', the normals
    keras.random.normal's to a few ulps. Its second output keeps what the backward needs:
    sigmoid(s z), zeroed where |z| >= T (the surrogate's mask, decided once in the forward), or z
    for "ste"/"hard_sigmoid" with noise."""
    noise_seed = replica_seed(seed) if noise_std > 0 else None
    if not isinstance(p, tf.Tensor) and p in (0, 1):
        coin, coin_seed = ("hard" if p == 1 else "soft"), None
    else:
        coin, coin_seed = granularity, replica_seed(seed)
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
