"""The commit of the code that runs, for every record the project writes (MLflow runs, T6's data)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_state() -> dict[str, str]:
    """The commit of this code and whether its tree was dirty ("unknown" outside a git tree);
    STUDY_GIT_COMMIT / STUDY_GIT_DIRTY when the code was shipped without its .git (a Ray job's
    working directory)."""
    if os.environ.get("STUDY_GIT_COMMIT"):
        return {"git.commit": os.environ["STUDY_GIT_COMMIT"],
                "git.dirty": os.environ.get("STUDY_GIT_DIRTY", "unknown")}
    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, cwd=here).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                check=True, cwd=here).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(status.strip())).lower()}
