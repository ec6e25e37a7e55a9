# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Per-epoch curves of a sweep's trials
#
# The long per-epoch frame (`run_id`, `key`, `step`, `value`) joined with the params of the trials that
# ran their whole budget: how binary- and soft-eval validation accuracy and the activation diagnostics
# evolve, per variant (T1). `ANALYSIS_T1_SWEEP` names the sweep to read instead of the latest complete one;
# `ANALYSIS_SIZE=quick|smoke` reads the T1 sweeps of that size of the spec (`ANALYSIS_SMOKE=1`: smoke).

# %%
import os

import matplotlib.pyplot as plt

from analysis import paper, runs
from analysis.__main__ import default_source
from analysis.tables import finished

size = os.environ.get("ANALYSIS_SIZE") or ("smoke" if os.environ.get("ANALYSIS_SMOKE") == "1" else "full")
experiments = list(paper.experiments(size)["t1"])
loaded = runs.load(os.environ.get("ANALYSIS_SOURCE") or default_source(experiments), experiments,
                   os.environ.get("ANALYSIS_T1_SWEEP", "").split())
print(*loaded.selection, sep="\n")
keys = ["val/accuracy_binary", "val/accuracy_soft", "act/bit_entropy", "act/flip_rate"]
curves = loaded.history[loaded.history["key"].isin(keys)].merge(
    finished(loaded)[["run_id", "params.model.arch", "tags.trial.variant"]], on="run_id")
curves.groupby(["params.model.arch", "tags.trial.variant", "key"])["value"].last().unstack().round(3)

# %%
mean = curves.groupby(["tags.trial.variant", "key", "step"])["value"].mean().reset_index()
fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
for ax, key in zip(axes, keys, strict=True):
    for variant, part in mean[mean["key"] == key].groupby("tags.trial.variant"):
        ax.plot(part["step"], part["value"], marker=".", label=variant)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("epoch")
axes[0].legend(fontsize=6)
fig.tight_layout()
