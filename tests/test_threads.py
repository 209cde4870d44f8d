"""Threads (issue 12): how many compute threads, and how idle OpenMP threads wait."""

from __future__ import annotations

import os

import pytest
import torch

from ccam import threads


def test_zero_means_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=None: None)
    assert threads.available_cores() == len(os.sched_getaffinity(0))
    assert threads.resolve_threads(0) == len(os.sched_getaffinity(0))
    assert threads.resolve_threads(3) == 3  # an explicit number wins


def test_quota_omp_num_threads_and_the_host_program_lower_the_automatic_count(monkeypatch, tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=None: 1.5)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda root=None: None)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.resolve_threads(0) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.resolve_threads(0, host=1) == 1
    assert threads.resolve_threads(0) == 8


def test_workers_never_outnumber_the_spare_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.resolve_workers(0) == 0
    assert threads.resolve_workers(4) == 1


def test_auto_workers_take_the_cores_the_threads_leave(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    assert threads.resolve_workers("auto", 2, "cpu") == 0  # every core computes: load in the main process
    assert threads.resolve_workers("auto", 1, "cpu") == 1
    assert threads.resolve_workers("auto", 2, "cuda") == 1
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    assert threads.resolve_workers("auto", 16, "cuda") == 4
    assert threads.resolve_workers("auto", 12, "cpu") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks share the 16 cores
    assert threads.resolve_workers("auto", 1, "cpu") == 7
    assert threads.resolve_workers("auto", 8, "cpu") == 0
    assert threads.resolve_workers("auto", 8, "cuda") == 4


def test_stage_logs_the_workers_it_chose(prepared, cli):
    """Through the CLI: auto workers follow the thread count, the stage logs the choice, and training
    with a worker process gives the same weights as loading in the main process."""
    import torch

    cores = threads.available_cores()
    sets = ["--set", "pcam.epochs=1", "--set", "pcam.batch_size=8", "--set", "pcam.width=0.25", "--set", "runtime.num_threads=1"]
    w1, w0 = prepared(32), prepared(32)
    rc, _, err = cli("train-pcam", "--workdir", w1, *sets)
    assert rc == 0, err
    assert f"1 compute thread(s) on {cores} usable core(s)" in err and f"{cores - 1} DataLoader worker(s) (auto)" in err
    rc, _, err = cli("train-pcam", "--workdir", w0, *sets, "--set", "runtime.num_workers=0")
    assert rc == 0 and "0 DataLoader worker(s), device" in err
    a = torch.load(w1 / "pcam" / "checkpoint_final.pt", weights_only=True)["model"]
    b = torch.load(w0 / "pcam" / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_openmp_waits_passively_unless_the_user_chose():
    env: dict = {}
    assert threads.prepare_openmp(env) == "spin 1000 then sleep" and env["GOMP_SPINCOUNT"] == "1000"
    assert "OMP_WAIT_POLICY" not in env
    env = {"CCAM_OMP_WAIT": "passive"}
    assert threads.prepare_openmp(env) == "passive" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_openmp(env).startswith("active") and env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {threads.OPT_OUT: "default"}
    assert "default" in threads.prepare_openmp(env) and "OMP_WAIT_POLICY" not in env


def test_the_stage_command_applies_and_logs_its_choice(prepared, cli):
    before = torch.get_num_threads()
    w = prepared(32)
    rc, _, err = cli("train-pcam", "--workdir", w, "--set", "pcam.epochs=1", "--set", "pcam.width=0.25",
                     "--set", "runtime.num_threads=1")
    assert rc == 0, err
    assert "runtime: 1 compute thread(s)" in err and "OpenMP wait" in err and "DataLoader worker(s)" in err
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_is_a_runtime_setting(precision):
    from ccam.config import resolve

    assert resolve(None, None, [f"runtime.precision={precision}"]).runtime.precision == precision


def test_bf16_makes_the_cam_stages_stale_and_fp32_keeps_their_keys(through_pseudo_masks):
    from ccam.config import resolve
    from ccam.stages.base import stage_status

    w = through_pseudo_masks
    memo: dict = {}
    fp32 = {s: stage_status(w, resolve(w), s, memo) for s in ("sample", "pseudo-masks")}
    assert fp32 == {"sample": "done", "pseudo-masks": "done"}
    cfg = resolve(w, None, ["runtime.precision=bf16"])
    assert stage_status(w, cfg, "sample") == "stale" and stage_status(w, cfg, "pseudo-masks") == "stale"


def test_bf16_cams_are_close_to_fp32_and_fp32_is_untouched():
    from ccam.cam import cams_for_slices
    from ccam.models.pcam import PCAM

    torch.manual_seed(0)
    from ccam.config import PCAMConfig

    model = PCAM.from_config(PCAMConfig(width=0.25), 2, ["liver", "spleen"]).eval()
    x = torch.rand(4, 32, 32)
    tags = torch.ones(4, 2)
    a = cams_for_slices(model, x, tags, scales=(1.0, 0.5))
    b = cams_for_slices(model, x, tags, scales=(1.0, 0.5), precision="fp32")
    c = cams_for_slices(model, x, tags, scales=(1.0, 0.5), precision="bf16")
    assert torch.equal(a, b)
    assert c.dtype == torch.float16 and float((a.float() - c.float()).abs().mean()) < 0.05
