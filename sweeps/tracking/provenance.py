"""Provenance: the tags every run of a sweep carries (the sweep, its spec, the git state and the
library versions)."""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from study.provenance import git_state
from sweeps.spec import SweepSpec

LIBRARIES = ("tensorflow-cpu", "keras", "ray", "optuna", "mlflow", "numpy", "pandas")


def provenance(spec: SweepSpec) -> dict[str, str]:
    """Tags every run of the sweep carries: sweep, spec, git state and library versions."""
    git = git_state()
    tags = {
        "sweep.id": spec.sweep_id,
        "sweep.size": spec.size or "full",
        "spec.path": spec.path, "spec.hash": spec.digest, **git, **source_tags(spec, git),
        "git.commits": git["git.commit"],
    }
    for library in LIBRARIES:
        try:
            tags[f"lib.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            tags[f"lib.{library}"] = "absent"
    return tags


def continued(run_tags: Mapping[str, str], tags: Mapping[str, str]) -> dict[str, str]:
    """The provenance tags of a run that a later launch continues (a resumed sweep's parent run, a
    resumed or retried trial's run), from the run's tags and the launch's `tags`: the launch's
    commit and libraries; `git.commits`, every commit that ran it in order (comma-separated);
    `git.dirty` true if any launch ran from a dirty tree. Nothing for a launch without a git state."""
    if "git.commit" not in tags:
        return {}
    commits = [c for c in run_tags.get("git.commits", run_tags.get("git.commit", "")).split(",") if c]
    if tags["git.commit"] not in commits:
        commits.append(tags["git.commit"])
    dirty = "true" if "true" in (run_tags.get("git.dirty"), tags["git.dirty"]) else tags["git.dirty"]
    return {**{k: v for k, v in tags.items()
               if k.startswith("lib.") or k in ("git.commit", "mlflow.source.git.commit")},
            "git.commits": ",".join(commits), "git.dirty": dirty}


def source_tags(spec: SweepSpec, git: dict[str, str]) -> dict[str, str]:
    """MLflow's own source columns: the spec the sweep ran and the commit of the code."""
    tags = {"mlflow.source.name": spec.path, "mlflow.source.type": "LOCAL"}
    if git.get("git.commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git.commit"]
    return tags
