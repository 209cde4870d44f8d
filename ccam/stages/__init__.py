"""One module per pipeline stage; `load_all` imports them, which registers each with `ccam.stages.base`.

A stage module imports `ccam.stages.base`, `ccam.artifacts` and library modules only: never
another stage, the runner or the CLI (docs/architecture.md; `tests/test_architecture.py`).
Importing this package imports no stage, so `ccam.stages.base` stays light.
"""

from __future__ import annotations

import importlib

# pipeline order
MODULES = ("prepare", "train_pcam", "sample", "train_ccam", "pseudo_masks", "refine", "train_seg", "predict",
           "evaluate", "ablation")


def load_all() -> list:
    """Import every stage module (each registers its Stage); returns the modules."""
    return [importlib.import_module(f"ccam.stages.{m}") for m in MODULES]
