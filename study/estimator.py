"""How good is the op's gradient? Each estimator's bias, variance and cosine against the gradient of
the expected loss of the stochastic binary network (SBN) on the MLP.

The SBN. With h_0 = x, a_l = h_{l-1} W_l + b_l and every hidden unit

    h_l = hard(a_l + sigma * eps_l),   eps ~ Logistic(0, 1) iid,   so P(h_li = 1) = F(a_li / sigma),

F = sigmoid. Its loss L(W) = E_eps[mean_b CE(logits_b, y_b)] on a fixed minibatch is smooth in the
weights though every draw is piecewise constant, and g_true = dL/dW (every Dense kernel) is what a
binary network trained with this noise should follow (Yin et al. 2019; Shekhovtsov & Yanush 2021).
At sigma = 1 a unit fires with probability sigmoid(a) and d/da E[hard(a + eps)] = sigmoid'(a): the
op's sigmoid surrogate at c = 1 (at c = 1.2 it is 1.2 sigmoid'(a) inside |a| < ln 11, 0 outside).

The reference: local expectation gradients (Titsias & Lazaro-Gredilla 2015). Given every draw but
unit i's, the loss takes two values, L_i(1) with h_i = 1 and L_i(0), and P(h_i = 1) = F(a_i / sigma),
so exactly  dL/da_i = E[F'(a_i / sigma) / sigma * (L_i(1) - L_i(0))]  over the other draws. One draw
eps (the drawn network and, per hidden unit, the network with that unit flipped, propagated through
the later layers with the same eps) gives, per example and unbiasedly (h the drawn bits),

    hidden kernel l:  g_l = h_{l-1}^T delta_l / B,  delta_li = F'(a_li / sigma) / sigma * (L_i(1) - L_i(0))
    output kernel:    g = h_L^T dCE/dlogits / B.

Its mean over N draws estimates g_true with relative standard error ref_se = sqrt(v_ref / N) / ||g_true||
(v_ref the per-draw tr Cov), the reference's own error; grad_norm is ||g_true||.

The estimators: in every hidden unit the op (`sigmoid_or_binary`, training=True, the slope, cutoff
and granularity of the trained config) on z_l = a_l, its gradient g_hat = dCE/dW backpropagated
through the op's surrogate g(z), on the same weights and minibatch, with its own coins:
    "p=0"                  sat(z), g = sat'(z): the soft network (deterministic)
    "p=0.5"                coin B per draw (per granularity): B hard(z) + (1 - B) sat(z), g = sat'(z)
    "p=1"                  hard(z), g = sat'(z) (deterministic)
    "p=1 ste"              hard(z), g = 1[|z| <= 1] (deterministic)
    "p=1 noisy"            hard(z), g = sat'(z), z = a + sigma * eps: the SBN's own forward draw; the
                           op is given z (noise_std 0) as its noise is Gaussian and the SBN's logistic.
                           Its surrogate is taken at the noisy z, as the op does (not F'(a / sigma))
    "local expectation"    the reference's own estimator, fresh draws (an unbiased control)
The network the op trains with p < 1 is partly soft, not the SBN: the table asks how well each
gradient aligns with the SBN's at noise sigma, on the weights the training reached.

The statistics, for each kernel and for all kernels as one vector; M estimator and N reference draws,
v and v_ref their per-draw tr Cov (sample), the norms debiased for the noise of both means:

    bias      = ||E g_hat - g_true|| / ||g_true||  ~ sqrt(max(0, ||mean - ref||^2 - v/M - v_ref/N))
                                                     / sqrt(||ref||^2 - v_ref/N)
    variance  = tr Cov(g_hat) / ||g_true||^2,  mse = bias^2 + variance = E||g_hat - g_true||^2 / ||g_true||^2
    cos_draw  = E[cos(g_hat, g_true)] (one draw),   cos_mean = cos(E g_hat, g_true)

bias_floor = sqrt((v/M + v_ref/N) / ||g_true||^2) is the noise the bias is debiased for, below which
no bias is resolved. Standard errors by the grouped jackknife: draws go to G groups (draw k to group k mod G),
a group of the reference and the same group of the estimator left out together. A deterministic
estimator counts as G identical draws (variance 0; its errors are the reference's).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from study.activations import hard, sigmoid_or_binary
from study.config import TrialConfig, train_images
from study.moments import Moments, statistics
from study.provenance import git_state

Loss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (logits (..., C), labels (...)) -> losses (...)
ALL = "all"  # the row of all kernels together
MAX_ELEMENTS = 2**24  # floats of the largest tensor of a chunk of draws (the flipped pre-activations)


def cross_entropy(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


@dataclass(frozen=True)
class Estimator:
    """The op with coin probability p and `surrogate` on z = a (+ sigma logistic noise if `noisy`);
    with `local`, the reference's own estimator."""

    name: str
    p: float = 1.0
    surrogate: str = "sigmoid"
    noisy: bool = False
    local: bool = False

    @property
    def random(self) -> bool:
        return self.local or self.noisy or 0 < self.p < 1


ESTIMATORS = (Estimator("p=0", 0.0), Estimator("p=0.5", 0.5), Estimator("p=1"),
              Estimator("p=1 ste", surrogate="ste"), Estimator("p=1 noisy", noisy=True),
              Estimator("local expectation", local=True))


@dataclass(frozen=True)
class Unit:
    """The op's options shared by the estimators (the trained config's)."""

    slope: float = 1.0
    cutoff: float = 1.2
    granularity: str = "batch"


@dataclass(frozen=True)
class Mlp:
    """The MLP's weights, float32: kernels (in, out) and biases, the hidden layers' then the output's."""

    kernels: tuple[tf.Tensor, ...]
    biases: tuple[tf.Tensor, ...]

    @classmethod
    def of(cls, model: keras.Model) -> Mlp:
        """The weights of `study.models.mlp` without batch norm (Dense and SigmoidOrBinary layers)."""
        kinds = {type(layer).__name__ for layer in model.layers}
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
        if kinds - {"InputLayer", "Flatten", "Dense", "SigmoidOrBinary"} or len(dense) < 2:
            raise ValueError(f"not an MLP of sigmoid_or_binary units: {sorted(kinds)}")
        return cls(tuple(tf.constant(d.kernel.numpy()) for d in dense),
                   tuple(tf.constant(d.bias.numpy()) for d in dense))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(k.shape)) for k in self.kernels]


def logistic(shape, seed: tf.Tensor) -> tf.Tensor:
    """Standard logistic noise log(u / (1 - u)), u ~ U(0, 1) drawn from the stateless `seed` (2 ints)."""
    u = tf.random.stateless_uniform(shape, seed, minval=2.0**-24, maxval=1.0)
    return tf.math.log(u) - tf.math.log1p(-u)


def local_gradients(mlp: Mlp, x: tf.Tensor, y: tf.Tensor, eps: Sequence[tf.Tensor], sigma: float,
                    loss: Loss = cross_entropy) -> list[tf.Tensor]:
    """The reference's draws: per kernel (K, in, out), the local-expectation gradients of the SBN's
    minibatch loss for the K draws eps (one (K, B, units) per hidden layer)."""
    n = tf.cast(tf.shape(x)[0], tf.float32)
    hidden = len(eps)
    h, pre = [x], []
    for w, b, e in zip(mlp.kernels, mlp.biases, eps, strict=False):
        pre.append(h[-1] @ w + b)
        h.append(hard(pre[-1] + sigma * e))
    logits = h[-1] @ mlp.kernels[-1] + mlp.biases[-1]
    labels = tf.broadcast_to(y, tf.shape(logits)[:-1])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        base = loss(logits, labels)
    grads = [_outer(h[i], _local_delta(mlp, h, pre + [logits], base, labels, eps, i, sigma, loss) / n)
             for i in range(hidden)]
    return grads + [_outer(h[-1], tape.gradient(base, logits) / n)]


def _local_delta(mlp, h, pre, base, labels, eps, layer, sigma, loss) -> tf.Tensor:
    """F'(a / sigma) / sigma * (L_i(1) - L_i(0)) for every unit i of a hidden layer: (K, B, units)."""
    sign = 1 - 2 * h[layer + 1]  # flipping unit i moves the next pre-activations by sign_i W[i]
    out = pre[layer + 1][..., None, :] + sign[..., None] * mlp.kernels[layer + 1]
    for m in range(layer + 1, len(eps)):
        out = hard(out + sigma * eps[m][..., None, :]) @ mlp.kernels[m + 1] + mlp.biases[m + 1]
    flipped = loss(out, tf.broadcast_to(labels[..., None], tf.shape(out)[:-1]))
    fires = tf.sigmoid(pre[layer] / sigma)
    return fires * (1 - fires) / sigma * sign * (flipped - base[..., None])


def op_gradients(mlp: Mlp, x: tf.Tensor, y: tf.Tensor, eps: Sequence[tf.Tensor], sigma: float,
                 units: Sequence[Callable[[tf.Tensor], tf.Tensor]], loss: Loss = cross_entropy
                 ) -> list[tf.Tensor]:
    """An estimator's draws: per kernel (K, in, out), the gradients of the minibatch loss of the
    network with `units[l]` (the op) on z_l = a_l + sigma eps_l, for the K draws eps."""
    with tf.GradientTape() as tape:
        h, zs = [x], []
        for w, b, e, unit in zip(mlp.kernels, mlp.biases, eps, units, strict=False):
            zs.append(h[-1] @ w + b + sigma * e)
            tape.watch(zs[-1])
            h.append(unit(zs[-1]))
        logits = h[-1] @ mlp.kernels[-1] + mlp.biases[-1]
        total = tf.reduce_sum(tf.reduce_mean(loss(logits, tf.broadcast_to(y, tf.shape(logits)[:-1])),
                                             axis=-1))
    deltas = tape.gradient(total, zs + [logits])
    return [_outer(hl, d) for hl, d in zip(h, deltas, strict=True)]


def _outer(h: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """Per draw h^T delta: (K, in, out), h shared by the draws (B, in) or not (K, B, in)."""
    return tf.einsum("bi,kbj->kij" if h.shape.rank == 2 else "kbi,kbj->kij", h, delta)


def op_unit(estimator: Estimator, unit: Unit, seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """The op on z (K, B, units) with one coin per draw for each granularity: "batch" coins per row
    of (K, B * units), "example" per row of (K * B, units) (the op's example coin), "unit" each."""
    generator = keras.random.SeedGenerator(seed)
    options = dict(p=estimator.p, slope=unit.slope, cutoff=unit.cutoff, surrogate=estimator.surrogate,
                   training=True, seed=generator)

    def op(z):
        if not 0 < estimator.p < 1 or unit.granularity == "unit":
            return sigmoid_or_binary(z, granularity=unit.granularity, **options)
        rows = [tf.shape(z)[0], -1] if unit.granularity == "batch" else [-1, tf.shape(z)[-1]]
        return tf.reshape(sigmoid_or_binary(tf.reshape(z, rows), granularity="example", **options),
                          tf.shape(z))

    return op


def _seed(*parts: int) -> tf.Tensor:
    """A stateless seed (2 ints) for the stream named by `parts`."""
    return tf.constant(np.random.SeedSequence(list(parts)).generate_state(2).astype(np.int64))


def _chunk(mlp: Mlp, batch: int, draws: int, local: bool) -> int:
    """Draws per chunk: a draw's largest tensor (the flipped pre-activations of local expectation,
    else a kernel's gradient or a layer's activations) times the draws under MAX_ELEMENTS."""
    widths = [int(k.shape[1]) for k in mlp.kernels]
    if local:
        largest = max(batch * a * b for a, b in zip(widths, widths[1:], strict=False))
    else:
        largest = max(*mlp.sizes, batch * max(widths))
    return max(1, min(draws, MAX_ELEMENTS // largest))


def _sample(mlp: Mlp, gradients: Callable, local: bool, batch: int, draws: int, groups: int,
            seed: tuple[int, ...], reference: Moments | None = None) -> Moments:
    """`draws` draws of `gradients(kernels, biases, eps)`, chunk by chunk, eps logistic, as Moments."""
    moments = Moments.empty(mlp.sizes, groups)
    chunk = _chunk(mlp, batch, draws, local)
    traced = tf.function(gradients)
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        eps = [logistic([k, batch, int(w.shape[1])], _seed(*seed, start, layer))
               for layer, w in enumerate(mlp.kernels[:-1])]
        moments.add([g.numpy() for g in traced(list(mlp.kernels), list(mlp.biases), eps)],
                    reference)
    return moments


def _gradients(estimator: Estimator, hidden: int, x, y, sigma: float, unit: Unit,
               seed: tuple[int, ...], loss: Loss) -> Callable:
    """The draws of `estimator` as a function of (kernels, biases, eps)."""
    x, y = tf.constant(x, tf.float32), tf.constant(y)
    if estimator.local:
        return lambda kernels, biases, eps: local_gradients(Mlp(tuple(kernels), tuple(biases)), x, y,
                                                            eps, sigma, loss)
    units = [op_unit(estimator, unit, int(np.random.SeedSequence([*seed, i]).generate_state(1)[0]))
             for i in range(hidden)]
    scale = sigma if estimator.noisy else 0.0
    return lambda kernels, biases, eps: op_gradients(Mlp(tuple(kernels), tuple(biases)), x, y, eps,
                                                     scale, units, loss)


def reference(mlp: Mlp, x, y, *, samples: int, groups: int, sigma: float, seed: tuple[int, ...],
              loss: Loss = cross_entropy) -> Moments:
    """The local-expectation reference: `samples` draws of the SBN's gradient."""
    gradients = _gradients(Estimator("reference", local=True), 0, x, y, sigma, Unit(), seed, loss)
    return _sample(mlp, gradients, True, len(x), samples, groups, seed)


def estimate(mlp: Mlp, x, y, estimator: Estimator, ref: Moments, *, draws: int, sigma: float,
             unit: Unit, seed: tuple[int, ...], loss: Loss = cross_entropy) -> Moments:
    """`draws` draws of `estimator` (one, counted in every group, when it is deterministic)."""
    groups = len(ref.counts)
    gradients = _gradients(estimator, len(mlp.kernels) - 1, x, y, sigma, unit, seed, loss)
    if estimator.random:
        return _sample(mlp, gradients, estimator.local, len(x), draws, groups, seed, ref)
    once = _sample(mlp, gradients, False, len(x), 1, groups, seed)
    moments = Moments.empty(mlp.sizes, groups)
    for _ in range(groups):
        moments.add([s[:1] for s in once.sums], ref)
    return moments


def compare(mlp: Mlp, x, y, estimators: Sequence[Estimator], *, samples: int, draws: int,
            groups: int, sigma: float, unit: Unit, seed: tuple[int, ...],
            loss: Loss = cross_entropy) -> list[dict]:
    """One row per estimator and kernel ("dense_1", ..., and "all"): its statistics, samples, draws,
    seconds (the estimator's) and ref_seconds (the reference's)."""
    started = time.perf_counter()
    ref = reference(mlp, x, y, samples=samples, groups=groups, sigma=sigma, seed=(*seed, 0), loss=loss)
    ref_seconds = time.perf_counter() - started
    blocks = {f"dense_{i + 1}": [i] for i in range(len(mlp.kernels))}
    blocks[ALL] = list(range(len(mlp.kernels)))
    rows = []
    for index, est in enumerate(estimators, start=1):
        started = time.perf_counter()
        moments = estimate(mlp, x, y, est, ref, draws=draws, sigma=sigma, unit=unit,
                           seed=(*seed, index), loss=loss)
        seconds = time.perf_counter() - started
        for name, stats in statistics(ref, moments, blocks).items():
            rows.append({"estimator": est.name, "kernel": name, **stats, "samples": samples,
                         "draws": moments.draws if est.random else 1, "seconds": seconds,
                         "ref_seconds": ref_seconds})
    return rows


@dataclass(frozen=True)
class Settings:
    epochs: tuple[int, ...] = (0, 1, 5)  # checkpoints: epochs of training done
    samples: int = 4000  # reference draws per checkpoint
    draws: int = 400  # draws of each random estimator
    batch: int = 512  # minibatch images (a seeded choice of the training set)
    sigma: float = 1.0  # the SBN's logistic noise scale
    groups: int = 10  # jackknife groups
    seed: int = 0

    def __post_init__(self):
        if not self.epochs or min(self.epochs) < 0:
            raise ValueError(f"epochs must be a non-empty list of epochs >= 0, got {self.epochs}")
        if self.groups < 3 or min(self.samples, self.draws) < self.groups:
            raise ValueError(f"need groups >= 3 and samples, draws >= groups; got groups {self.groups}, "
                             f"samples {self.samples}, draws {self.draws}")
        if self.batch < 1 or not self.sigma > 0:
            raise ValueError(f"need batch >= 1 and sigma > 0; got {self.batch}, {self.sigma}")


def check(config: TrialConfig, settings: Settings) -> None:
    """Raise ValueError unless `config` trains the MLP of sigmoid_or_binary units the table needs."""
    if config.model.arch != "mlp" or config.model.batch_norm:
        raise ValueError("the table needs model.arch = mlp without batch norm")
    if config.activation.kind != "sigmoid_or_binary":
        raise ValueError("the table needs activation.kind = sigmoid_or_binary")
    images = config.data.train_size or train_images(config.data)
    if settings.batch > images:
        raise ValueError(f"batch {settings.batch} is more than the {images} training images")


TRAINING = {"activation.p": 0.5, "activation.cutoff": 1.2, "optim.name": "adam", "optim.lr": 1e-3}


def run(config: TrialConfig, settings: Settings, out: Path,
        progress: Callable[[str], None] = print) -> list[dict]:
    """Train `config` (study.train.Trainer), compare every estimator at each checkpoint, write the
    rows to `out` (CSV) and the settings to `out` with suffix .json."""
    from study.train import Trainer

    check(config, settings)
    code = git_state()  # of the code that runs, before this run writes its own outputs
    started, cpu = time.perf_counter(), time.process_time()
    trainer = Trainer(config)
    data = trainer.data
    pick = np.random.default_rng(settings.seed).choice(len(data.x_train), settings.batch, replace=False)
    x = (data.x_train[pick].reshape(settings.batch, -1) * data.scale).astype(np.float32)
    y = data.y_train[pick].astype(np.int32)
    a = config.activation
    unit = Unit(a.slope, a.cutoff, a.granularity)
    rows = []
    try:
        for epoch in range(max(settings.epochs) + 1):
            if epoch in settings.epochs:
                accuracy = trainer.evaluator(data.x_val, data.y_val, data.scale, diagnostics=False)
                for row in compare(Mlp.of(trainer.network.model), x, y, ESTIMATORS,
                                   samples=settings.samples, draws=settings.draws,
                                   groups=settings.groups, sigma=settings.sigma, unit=unit,
                                   seed=(settings.seed, epoch)):
                    rows.append({"epoch": epoch, "val_accuracy_binary": accuracy.accuracy_binary, **row})
                progress(f"epoch {epoch}: compared, {time.perf_counter() - started:.0f} s")
            if epoch < max(settings.epochs):
                trainer.step()
    finally:
        trainer.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {**asdict(settings), "config": config.to_flat(), "estimators": [asdict(e) for e in ESTIMATORS],
            "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
            **code, "ended": time.strftime("%Y-%m-%d", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=list))
    return rows
