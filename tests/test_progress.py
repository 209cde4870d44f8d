"""Progress output (issue 12): bars on a terminal; a few plain lines when stderr is a file."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from ccam import progress
from ccam.progress import LineProgress


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def lines():
    logger, keep = logging.getLogger("ccam"), _Keep()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield lambda: keep.messages
    logger.removeHandler(keep)
    logger.setLevel(level)
    logger.propagate = propagate


def test_a_kept_bar_logs_every_ten_percent_and_at_the_end(lines):
    for _ in LineProgress(range(200), desc="cases", unit="case"):
        pass
    out = lines()
    assert len(out) == 10, out  # 10 %, 20 %, ... 90 %, then the final line
    assert out[0].startswith("cases: 20/200 case (10%)") and "ETA" in out[0]
    assert out[-1].startswith("cases: 200/200 case (100%)") and "ETA" not in out[-1]


def test_a_transient_bar_logs_one_line_with_its_postfix(lines):
    bar = LineProgress(range(50), desc="train 1/3", unit="batch", leave=False)
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
    out = lines()
    assert out == [out[0]] and out[0].startswith("train 1/3: 50/50 batch (100%)") and out[0].endswith("loss=0.0200")


def test_update_and_context_manager_as_tqdm(lines):
    with LineProgress(total=1000, desc="sample", unit="slice") as bar:
        for _ in range(10):
            bar.update(100)
    assert len(lines()) == 10 and lines()[-1].startswith("sample: 1000/1000 slice")


def test_bars_only_on_a_terminal(monkeypatch, tmp_path):
    monkeypatch.delenv(progress.ENV, raising=False)
    with open(tmp_path / "log", "w") as fh:
        assert not progress.use_bars(fh)
    monkeypatch.setattr(sys, "stderr", open(tmp_path / "err", "w"))
    assert isinstance(progress.bar(range(3)), LineProgress)
    monkeypatch.setenv(progress.ENV, "bars")
    assert not isinstance(progress.bar(range(3)), LineProgress)


def test_a_redirected_cli_log_has_one_line_per_epoch_and_no_redraws(prepared, tmp_path):
    w = prepared(32)
    env = {k: v for k, v in os.environ.items() if k != progress.ENV}
    with open(tmp_path / "stderr.log", "w") as err:
        p = subprocess.run([sys.executable, "-c", "import sys; from ccam.cli import main; sys.exit(main(sys.argv[1:]))",
                            "train-pcam", "--workdir", str(w), "--set", "pcam.epochs=3", "--set", "pcam.batch_size=8",
                            "--set", "pcam.width=0.25", "--set", "runtime.num_threads=1"],
                           stderr=err, stdout=subprocess.DEVNULL, env=env)
    log = (tmp_path / "stderr.log").read_text()
    assert p.returncode == 0, log[-2000:]
    assert "\r" not in log and "\x1b[" not in log, "progress-bar redraws in a redirected log"
    rows = log.splitlines()
    for e in (1, 2, 3):
        epoch_lines = [r for r in rows if f"train-pcam {e}/3: " in r]
        assert len(epoch_lines) == 1 and "batch" in epoch_lines[0] and "loss=" in epoch_lines[0], rows
    assert len(rows) <= 20, log
