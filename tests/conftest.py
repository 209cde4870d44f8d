"""Shared fixtures: a small synthetic cohort and prepared work directories built from it.

Building is done once per session and copied per test, so every test gets its own work
directory in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

# tiny tensors: one thread avoids oversubscription (and is as fast as two at these sizes)
torch.set_num_threads(1)

from ccam.cli import main as ccam_main  # noqa: E402

SMALL_SHAPE = (64, 64, 16)


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory) -> Path:
    """8-case MR cohort, (64, 64, 16) base shape, seed 0, splits train/val/test, RAS/LPS/slice-first files."""
    from ccam.data.phantom import make_phantom_cohort

    out = tmp_path_factory.mktemp("phantom")
    return make_phantom_cohort(out, n_cases=8, seed=0, modality="MR", shape=SMALL_SHAPE)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: ``rc, out, err = cli("prepare", "--workdir", ...)``."""

    def run(*args: str):
        rc = ccam_main([str(a) for a in args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    return run


_PREPARED: dict = {}


@pytest.fixture
def prepared(tmp_path, phantom_manifest, tmp_path_factory):
    """``prepared(slice_size=32, *sets) -> Path``: a fresh work dir whose `prepare` stage is done."""

    def make(slice_size: int = 32, *sets: str) -> Path:
        key = (slice_size,) + tuple(sets)
        if key not in _PREPARED:
            src = tmp_path_factory.mktemp("prepared")
            args = ["prepare", "--manifest", str(phantom_manifest), "--workdir", str(src),
                    "--set", f"data.slice_size={slice_size}"]
            for s in sets:
                args += ["--set", s]
            assert ccam_main(args) == 0
            _PREPARED[key] = src
        dst = tmp_path / f"work{len(list(tmp_path.iterdir()))}"
        shutil.copytree(_PREPARED[key], dst)
        return dst

    return make


FAST_PIPELINE = ("data.slice_size=32", "pcam.epochs=1", "pcam.batch_size=8", "pcam.width=0.25", "ccam.epochs=1",
                 "ccam.batch_size=8", "cam.scales=[1.0]")


@pytest.fixture(scope="session")
def through_pseudo_masks(tmp_path_factory, phantom_manifest) -> Path:
    """A small work dir with prepare, train-pcam, sample, train-ccam and pseudo-masks done (S = 32, one epoch
    each). Copy it before changing anything."""
    w = tmp_path_factory.mktemp("through_pseudo") / "w"
    sets = [x for s in FAST_PIPELINE for x in ("--set", s)]
    assert ccam_main(["run", "--manifest", str(phantom_manifest), "--workdir", str(w), "--until", "pseudo-masks", *sets]) == 0
    return w
