"""Default locations. Everything is overridable; all paths are made absolute because Ray jobs
run from an unpacked working dir where relative paths would land in Ray's temp folder."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Model cache (converted GGUF folders). `DISTALIGN_CACHE` overrides the user cache default."""
    root = os.environ.get("DISTALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distalign_ray"
    )
    return Path(root).absolute()


def home_dir() -> Path:
    """Project folder for runs, the MLflow store and Ray storage. `DISTALIGN_HOME` overrides ./.distalign."""
    return Path(os.environ.get("DISTALIGN_HOME", ".distalign")).absolute()
