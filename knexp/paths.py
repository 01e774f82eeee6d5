"""Project locations, found from the ``.project-root`` marker (the lightning-hydra-template convention).

Everything knexp writes by default lives under the project root: ``runs/`` for job outputs and
``runs/cache`` for converted weights and generated data. Each location can be moved from the config.
"""

from __future__ import annotations

import os
from pathlib import Path

_MARKER = ".project-root"


def project_root() -> Path:
    """The directory holding ``.project-root``; ``KNEXP_ROOT`` overrides it."""
    env = os.environ.get("KNEXP_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / _MARKER).exists():
            return parent
    raise FileNotFoundError(
        f"no {_MARKER} marker above {here}; set KNEXP_ROOT to the knexp checkout (the folder with conf/)"
    )


def conf_dir() -> Path:
    return project_root() / "conf"


def default_cache_dir() -> Path:
    """Where converted weights and generated datasets go unless ``paths.cache_dir`` says otherwise."""
    return Path(os.environ.get("KNEXP_CACHE", project_root() / "runs" / "cache"))
