"""kill -9 at a random point of every training stage and of a per-case stage, then resume: the outputs
are bit-identical to an uninterrupted run (issue 10).

Each trial copies a small finished work directory, removes the stage's folder, and runs the stage
in a child process that is killed with SIGKILL a random moment (fixed seed) after its first
durable output appears (the first epoch's checkpoint, or the first case's CAMs); the same command
then resumes in this process. A reference run of the same stage in another copy, uninterrupted,
gives the expected files.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ccam.cli import main as ccam_main

# per stage: settings that make it run long enough to be killed in the middle, and the file whose
# appearance says it has done durable work
TRIALS = {
    "train-pcam": (("pcam.epochs=6",), "pcam/checkpoint_last.pt"),
    "sample": (("cam.scales=[1.0,0.5,1.5]",), "sample/cams"),
    "train-ccam": (("ccam.epochs=6",), "ccam/checkpoint_last.pt"),
    "refine": (("refine.enabled=true", "refine.epochs=4", "refine.batch_size=8", "refine.t=4"),
               "refined_masks/affinity/checkpoint_last.pt"),
    "train-seg": (("seg.epochs=6", "seg.slices_per_epoch=64", "seg.channels=[8,16]"), "seg/checkpoint_last.pt"),
}
RUNTIME = ("runtime.num_threads=1",)  # same threads in the child and here: identical float sums


@pytest.fixture(scope="module")
def base(through_pseudo_masks) -> Path:
    return through_pseudo_masks


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _argv(stage: str, w: Path, sets) -> list[str]:
    return [stage, "--workdir", str(w)] + [x for s in (*sets, *RUNTIME) for x in ("--set", s)]


def _fresh(base: Path, dst: Path, stage: str) -> Path:
    shutil.copytree(base, dst)
    from ccam.stages.base import folder_of

    shutil.rmtree(dst / folder_of(stage), ignore_errors=True)
    return dst


def _outputs(w: Path, stage: str) -> dict:
    """What the stage computed, comparable bit for bit: arrays of .npy files and label maps, model tensors."""
    from ccam.stages.base import folder_of

    folder = w / folder_of(stage)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.name.endswith(".npy"):
            out[rel] = np.load(p).tobytes()
        elif p.name.endswith(".nii.gz"):
            out[rel] = np.asarray(nib.load(str(p)).dataobj).tobytes()
        elif p.name == "checkpoint_final.pt":
            state = torch.load(p, weights_only=True)["model"]
            out[rel] = b"".join(state[k].numpy().tobytes() for k in sorted(state))
    return out


@pytest.mark.parametrize("stage", list(TRIALS))
def test_kill_9_then_resume_gives_identical_outputs(stage, base, tmp_path, capsys):
    sets, marker = TRIALS[stage]
    rng = random.Random(f"ccam-faults-{stage}")
    ref = _fresh(base, tmp_path / "ref", stage)
    assert ccam_main(_argv(stage, ref, sets)) == 0
    expected = _outputs(ref, stage)
    assert expected

    w = _fresh(base, tmp_path / "killed", stage)
    code = "import sys; from ccam.cli import main; sys.exit(main(sys.argv[1:]))"
    child = subprocess.Popen([sys.executable, "-c", code, *_argv(stage, w, sets)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.time() + 300
    while child.poll() is None and not (w / marker).exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.4))  # a random moment after the first durable output
    killed = child.poll() is None
    if killed:
        os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert killed, f"{stage} finished before it could be killed; make the trial longer"
    from ccam.stages.base import folder_of

    assert not (w / folder_of(stage) / "_stage.json").exists()
    capsys.readouterr()
    assert ccam_main(_argv(stage, w, sets)) == 0
    err = capsys.readouterr().err
    got = _outputs(w, stage)
    assert got.keys() == expected.keys()
    different = [k for k in expected if got[k] != expected[k]]
    assert not different, f"{stage}: resumed outputs differ from the uninterrupted run: {different[:5]}"
    assert "resuming" in err
    assert not list((w / folder_of(stage)).rglob(".*.part*")), "a temp file of the killed run is left"
