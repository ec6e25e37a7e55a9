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
# # The paper's tables and figures
#
# Reads the runs of the three paper sweeps (T1 main results, T2 the p x slope x cutoff grid, T3
# ablations) from the tracking store or the committed export `paper/runs`, and shows what
# `make tables` writes. `ANALYSIS_SOURCE` picks the source, `ANALYSIS_SIZE=quick|smoke` the sweeps of
# that size of the specs (`ANALYSIS_SMOKE=1` is `ANALYSIS_SIZE=smoke`),
# `ANALYSIS_SWEEPS` (sweep ids, space-separated) the sweeps to read instead of the latest complete ones.

# %%
import os
from pathlib import Path

from IPython.display import Image, Markdown, display

from analysis import paper, runs
from analysis.__main__ import PROJECT, default_source

size = os.environ.get("ANALYSIS_SIZE") or ("smoke" if os.environ.get("ANALYSIS_SMOKE") == "1" else "full")
names = paper.all_experiments(size)
source = os.environ.get("ANALYSIS_SOURCE") or default_source(names)
loaded = runs.load(source, names, os.environ.get("ANALYSIS_SWEEPS", "").split())
print(source, *loaded.selection, sep="\n")
loaded.trials.groupby(["experiment", "status"]).size()

# %% [markdown]
# ## Tables, checks and figures

# %%
out = Path(os.environ.get("ANALYSIS_OUT") or PROJECT / "runs" / "notebooks" / "paper")
tables, pngs, notes = paper.build(loaded, out, size=size)
for note in notes:
    print(note)
for table in tables:
    display(Markdown(table.markdown()))

# %%
for png in pngs:
    display(Markdown(f"**{png.stem}**"), Image(str(png)))
