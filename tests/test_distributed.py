"""Two CPU processes with gloo (torchrun) train P-CAM: the run finishes, rank 0 alone writes the
checkpoints and the record, the checkpoint loads into a single-process model, and its validation
figures are within a stated tolerance of a single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ccam import artifacts
from ccam import config as config_mod
from ccam.cli import main as ccam_main
from ccam.data.cohort import Cohort

SETS = ("pcam.epochs=4", "pcam.batch_size=8", "pcam.width=0.25", "runtime.num_threads=1")
# tolerance against the single-process run (same global batch 8, same seed): the two runs see the
# same slices per epoch in another order and split over two ranks (batch-norm statistics per rank),
# so the figures are close, not equal
VAL_LOSS_TOL = 0.15


def _log(w: Path) -> list[dict]:
    return [json.loads(line) for line in (w / "pcam" / "log.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_two_process_gloo_training_matches_one_process(prepared, tmp_path):
    w0 = prepared(32)
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(w0, one)
    shutil.copytree(w0, two)
    sets = [x for s in SETS for x in ("--set", s)]
    assert ccam_main(["train-pcam", "--workdir", str(one), *sets]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ccam.cli", "train-pcam", "--workdir", str(two), *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]

    rec = json.loads((two / "pcam" / "_stage.json").read_text())
    assert rec["stage"] == "train-pcam" and not (two / "pcam" / "_started.json").exists()
    assert len(_log(two)) == 4 and [h["epoch"] for h in _log(two)] == [0, 1, 2, 3]
    # the checkpoint is a plain model's: it loads into the single-process P-CAM
    model = artifacts.load_pcam(two, config_mod.resolve(two), Cohort(two).num_classes)
    assert isinstance(model, torch.nn.Module)
    a, b = _log(one)[-1], _log(two)[-1]
    assert abs(a["val_loss"] - b["val_loss"]) < VAL_LOSS_TOL, (a["val_loss"], b["val_loss"])
    # the same settings make the two-process run up to date for a later single-process command
    assert ccam_main(["train-pcam", "--workdir", str(two), *sets]) == 0
    assert json.loads((two / "pcam" / "_stage.json").read_text())["finished"] == rec["finished"]


def test_per_case_stage_refuses_torchrun(prepared, monkeypatch, capsys):
    w = prepared(32)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rc = ccam_main(["sample", "--workdir", str(w)])
    assert rc == 2 and "does not run under torchrun" in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_refine_affinitynet_under_torchrun(through_pseudo_masks, tmp_path):
    """refine under torchrun: rank 0 makes the seeds, both ranks train AffinityNet with DDP, rank 0
    walks every case and writes the record; the weights load into a single-process AffinityNet."""
    pytest.importorskip("pydensecrf")
    w = tmp_path / "w"
    shutil.copytree(through_pseudo_masks, w)
    sets = ["--set", "refine.enabled=true", "--set", "refine.epochs=2", "--set", "refine.batch_size=8", "--set", "refine.t=4",
            "--set", "runtime.num_threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "ccam.cli", "refine", "--workdir", str(w), *sets], capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((w / "refined_masks" / "_stage.json").read_text())
    assert rec["outputs"]["enabled"] is True and rec["outputs"]["cases"] == len(Cohort(w).cases)
    assert all((w / "refined_masks" / f"{c.id}.nii.gz").exists() for c in Cohort(w).cases)
    from ccam.models.affinity import AffinityNet
    from ccam.training import load_model_weights

    cfg = config_mod.resolve(w, None, sets[1::2])
    load_model_weights(AffinityNet(cfg.refine.backbone, cfg.refine.width), w / "refined_masks" / "affinity" / "checkpoint_final.pt")
    assert ccam_main(["refine", "--workdir", str(w), *sets]) == 0
    assert json.loads((w / "refined_masks" / "_stage.json").read_text())["finished"] == rec["finished"]


def _torchrun(w: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "ccam.cli", "train-pcam", "--workdir", str(w), *sets]


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of ``rank`` (a child of ``launcher`` with RANK in its environment)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_killed_rank_ends_the_run_clearly_and_every_rank_resumes(prepared, tmp_path):
    """SIGKILL one rank mid-training: the run ends (torchrun stops the other rank) with ccam's one-line
    message, no record is written, and the same command then resumes on every rank from the same
    checkpoint_last.pt, ending bit-identical to an uninterrupted two-process run."""
    w0 = prepared(32)
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    shutil.copytree(w0, whole)
    shutil.copytree(w0, crashed)
    epochs = 12
    sets = [x for s in (f"pcam.epochs={epochs}", *SETS[1:]) for x in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    r = subprocess.run(_torchrun(whole, sets), capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(_torchrun(crashed, sets), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        log = crashed / "pcam" / "log.jsonl"
        deadline = time.time() + 300
        while not (log.exists() and log.read_text().strip()) and p.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # rank 0 has written the checkpoint of epoch 0
        victim = _worker_pid(p.pid, 1)
        assert victim is not None and p.poll() is None, "the run ended before rank 1 could be killed"
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=120)  # the run ends: torchrun stops rank 0, nothing hangs
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("ccam: error: rank 0 of 2")]
    assert len(ours) == 1 and "re-run the same torchrun command" in ours[0], err[-3000:]
    assert "Traceback" not in err.split("ccam: error: rank 0 of 2")[0], err[-3000:]  # rank 0 printed no traceback of its own
    assert not (crashed / "pcam" / "_stage.json").exists() and (crashed / "pcam" / "checkpoint_last.pt").exists()
    done = len(_log(crashed))
    assert 1 <= done < epochs

    r = subprocess.run(_torchrun(crashed, sets), capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"all 2 ranks resume after epoch {done}" in r.stderr, r.stderr[-3000:]
    assert [h["epoch"] for h in _log(crashed)] == list(range(epochs))
    a = torch.load(whole / "pcam" / "checkpoint_final.pt", weights_only=False)["model"]
    b = torch.load(crashed / "pcam" / "checkpoint_final.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(300)
def test_sigterm_stops_with_one_line_and_resumes(prepared):
    """A scheduler's cancel (SIGTERM) of a one-process stage: one line, exit 143, partial state kept, resume finishes."""
    w = prepared(32)
    sets = [x for s in ("pcam.epochs=12", *SETS[1:]) for x in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "ccam.cli", "train-pcam", "--workdir", str(w), *sets],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log = w / "pcam" / "log.jsonl"
    deadline = time.time() + 240
    while not (log.exists() and log.read_text().strip()) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the stage ended before it could be stopped"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("ccam: error: stopped by SIGTERM") and "Traceback" not in err
    assert not (w / "pcam" / "_stage.json").exists() and (w / "pcam" / "checkpoint_last.pt").exists()
    done = len(_log(w))
    assert ccam_main(["train-pcam", "--workdir", str(w), *sets]) == 0
    assert [h["epoch"] for h in _log(w)] == list(range(12)) and done >= 1
