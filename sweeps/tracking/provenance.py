"""Provenance: the tags every run of a sweep carries (the sweep, its spec, the git state and the
library versions)."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata

from sweeps.spec import SweepSpec

LIBRARIES = ("tensorflow-cpu", "keras", "ray", "optuna", "mlflow", "numpy", "pandas")


def provenance(spec: SweepSpec) -> dict[str, str]:
    """Tags every run of the sweep carries: sweep, spec, git state and library versions."""
    git = git_state()
    tags = {
        "sweep.id": spec.sweep_id,
        "sweep.size": spec.size or "full",
        "spec.path": spec.path, "spec.hash": spec.digest, **git, **source_tags(spec, git),
    }
    for library in LIBRARIES:
        try:
            tags[f"lib.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            tags[f"lib.{library}"] = "absent"
    return tags


def source_tags(spec: SweepSpec, git: dict[str, str]) -> dict[str, str]:
    """MLflow's own source columns: the spec the sweep ran and the commit of the code."""
    tags = {"mlflow.source.name": spec.path, "mlflow.source.type": "LOCAL"}
    if git.get("git.commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git.commit"]
    return tags


def git_state() -> dict[str, str]:
    """The commit and whether the tree was dirty; STUDY_GIT_COMMIT / STUDY_GIT_DIRTY when the code
    was shipped without its .git (a Ray job's working directory)."""
    if os.environ.get("STUDY_GIT_COMMIT"):
        return {"git.commit": os.environ["STUDY_GIT_COMMIT"],
                "git.dirty": os.environ.get("STUDY_GIT_DIRTY", "unknown")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}
