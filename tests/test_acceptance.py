"""Issue 2's acceptance on the real Fashion-MNIST: MLP 256-128, Adam, batch 128, 10 epochs, seed 0."""

import pytest

from study.config import TrialConfig
from study.train import train

pytestmark = pytest.mark.slow


def run(**flat):
    base = {"model.widths": [256, 128], "optim.name": "adam", "budget.batch_size": 128,
            "budget.epochs": 10, "seed": 0}
    return train(TrialConfig.from_flat({**base, **flat})).test


def test_sigmoid_adjusted_ste_closes_the_binary_gap_on_fashion_mnist():
    p0 = run(**{"activation.p": 0.0})
    p05 = run(**{"activation.p": 0.5, "activation.cutoff": 1.2})
    print(f"p=0: {p0}\np=0.5, c=1.2: {p05}")
    assert p0["test/accuracy_soft"] >= 0.86
    assert p05["test/accuracy_binary"] >= 0.85
    gap = {name: r["test/accuracy_soft"] - r["test/accuracy_binary"]
           for name, r in (("p0", p0), ("p05", p05))}
    assert gap["p05"] < gap["p0"]
