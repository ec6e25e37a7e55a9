"""The model builder: every architecture, and the evaluator's binary and soft twins."""

import numpy as np
import pytest

from study.activations import SigmoidOrBinary
from study.config import ActivationConfig, ModelConfig
from study.models import build_network

X = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)


@pytest.mark.parametrize("arch,units", [("mlp", 256 + 128), ("cnn", 8 * 8 * 32 + 4 * 4 * 64 + 128),
                                        ("gated", 256 + 128), ("bottleneck", 64)])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_architectures_build_and_share_weights_with_their_twins(arch, units, batch_norm):
    network = build_network(ModelConfig(arch=arch, batch_norm=batch_norm),
                            ActivationConfig(p=0.5, cutoff=1.2), (8, 8, 1), 10)
    acts = [layer for layer in network.model.layers if isinstance(layer, SigmoidOrBinary)]
    assert len(acts) == {"mlp": 2, "cnn": 3, "gated": 2, "bottleneck": 1}[arch]
    assert len({layer.seed for layer in acts}) == len(acts)  # each unit layer draws its own coins
    binary, soft, pre = (t.numpy() for t in network.evaluator(X, training=False))
    assert binary.shape == soft.shape == (16, 10) and pre.shape == (16, units)
    # the trained model evaluates with eval_mode "binary": the same logits as the binary twin
    np.testing.assert_allclose(network.model(X, training=False), binary, rtol=1e-5, atol=1e-5)
    assert not np.allclose(binary, soft)
    assert {id(w) for w in network.evaluator.weights} == {id(w) for w in network.model.weights
                                                          if "seed_generator" not in w.path
                                                          and "steps" not in w.path}


def test_soft_eval_mode_matches_the_soft_twin():
    network = build_network(ModelConfig(), ActivationConfig(eval_mode="soft", slope=2.0, cutoff=1.5),
                            (8, 8, 1), 10)
    _, soft, _ = network.evaluator(X, training=False)
    np.testing.assert_allclose(network.model(X, training=False), soft, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "relu"])
def test_full_precision_baselines_are_binarized_after_training_by_the_binary_twin(kind):
    network = build_network(ModelConfig(), ActivationConfig(kind=kind), (8, 8, 1), 10)
    assert not [layer for layer in network.model.layers if isinstance(layer, SigmoidOrBinary)]
    binary, soft, _ = network.evaluator(X, training=False)
    np.testing.assert_allclose(network.model(X, training=False), soft, rtol=1e-5, atol=1e-6)
    assert not np.allclose(binary, soft)
