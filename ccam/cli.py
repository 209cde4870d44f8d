"""The `ccam` command line: one command per stage, plus `run`, `status` and `phantom`.

Every stage command takes ``--workdir``, ``--config FILE`` and ``--set section.key=value``;
the resolved config is saved as ``W/config.yaml`` and reused by later commands.
User errors print one line and exit with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
from pathlib import Path

import click

from ccam import __version__, options
from ccam import config as config_mod
from ccam.errors import Stopped, UserError

log = logging.getLogger("ccam")
_DEBUG = {"on": False}


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[ccam %(asctime)s] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    from ccam import distributed

    log.setLevel(logging.WARNING if quiet or not distributed.is_main() else logging.INFO)  # torchrun: rank 0 reports
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ccam")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
def cli(debug: bool, quiet: bool) -> None:
    """C-CAM: voxel masks from slice-level tags on 3D medical volumes.

    \b
    Typical use:
      ccam phantom --out demo_data --cases 12          # or bring your own manifest
      ccam run --manifest demo_data/manifest.json --workdir runs/demo --config configs/demo.yaml
      ccam status --workdir runs/demo
    """
    _DEBUG["on"] = debug
    _setup_logging(quiet)


def _make_stage_command(stage) -> click.Command:
    from ccam.parts import PER_CASE

    def callback(workdir, config_file, sets, force, part=None, merge=False, **options):
        from ccam.runner import WorkdirLock, run_stage

        if part is not None or merge:
            from ccam import parts

            if part is not None and merge:
                raise UserError("--part and --merge are separate steps", fix="run each --part i/n, then --merge once")
            cfg = config_mod.load_settings(workdir, config_file, sets, save_to_workdir=False)
            if merge:
                parts.merge(Path(workdir), cfg, stage.name, options)
            else:
                parts.run_part(Path(workdir), cfg, stage.name, part, options, force=force)
            return
        from ccam import distributed

        # under torchrun rank 0 holds the work-directory lock for the whole group
        with WorkdirLock(Path(workdir)) if distributed.is_main() else contextlib.nullcontext():
            cfg = config_mod.load_settings(workdir, config_file, sets, save_to_workdir=False)  # saved once the stage is done
            run_stage(Path(workdir), cfg, stage.name, options, force=force, save_config=True)

    help_text = stage.help + ("\n\n\b\nExamples:\n" + "\n".join("  " + line for line in stage.examples.splitlines()) if stage.examples else "")
    cmd = click.Command(stage.name, callback=callback, help=help_text, short_help=stage.help.split(". ")[0].rstrip("."))
    cmd.params = options.params("workdir", "config", "set", "force") + list(stage.options)
    if stage.name in PER_CASE:
        cmd.params += [
            click.Option(["--part"], metavar="I/N", help="Do every N-th case from the I-th (0-based, nnU-Net's convention), "
                         "for N parallel jobs; the last part to end writes the stage record."),
            click.Option(["--merge"], is_flag=True, help="Finish a stage whose parts all ended (the last part does this itself)."),
        ]
    return cmd


def _register_commands() -> None:
    """Every module of `ccam.commands` with a ``COMMANDS`` list, then a generated command for every other stage."""
    import ccam.commands
    from ccam.stages.base import STAGES
    import ccam.runner  # noqa: F401  (registers the stages)

    for info in pkgutil.iter_modules(ccam.commands.__path__):
        mod = importlib.import_module(f"ccam.commands.{info.name}")
        for cmd in getattr(mod, "COMMANDS", []):
            cli.add_command(cmd)
    for st in STAGES.values():
        if st.name not in cli.commands:
            cli.add_command(_make_stage_command(st))


_register_stage_commands = _register_commands  # the name tests and scripts used


@cli.command("status")
@options.shared("workdir")
@click.option("--pipeline", type=click.Path(dir_okay=False), help="Stage graph (default pipelines/ccam.yaml).")
def status_cmd(workdir: str, pipeline) -> None:
    """Show each stage of the pipeline as done / stale / missing.

    \b
    Examples:
      ccam status --workdir runs/demo
    """
    from ccam.runner import get_stage, load_pipeline, read_record, stage_status

    wd = Path(workdir)
    if not wd.is_dir():
        raise UserError("work directory does not exist", path=str(wd), fix="run `ccam prepare` or `ccam run` first")
    cfg = config_mod.resolve(wd)
    names = [s if isinstance(s, str) else s["stage"] for s in load_pipeline(pipeline)["stages"]]
    memo: dict = {}
    click.echo(f"{'stage':<14} {'status':<8} {'finished':<20} folder")
    for name in names:
        st = get_stage(name)
        s = stage_status(wd, cfg, name, memo)
        rec = read_record(wd, st) or {}
        click.echo(f"{name:<14} {s:<8} {rec.get('finished', '-'):<20} {wd / st.folder}")


@cli.command("run")
@click.option("--manifest", "-m", type=click.Path(dir_okay=False, resolve_path=True), help="Data manifest (needed until `prepare` is done).")
@options.shared()
@click.option("--pipeline", type=click.Path(dir_okay=False), help="Stage graph YAML (default pipelines/ccam.yaml).")
@click.option("--until", "until", metavar="STAGE", help="Stop after this stage.")
@click.option("--from", "from_", metavar="STAGE", help="Re-run from this stage on, even if up to date.")
def run_cmd(manifest, workdir, config_file, sets, pipeline, until, from_) -> None:
    """Run the whole pipeline with skip/resume: every stage whose record is current is skipped.

    \b
    Examples:
      ccam run --manifest data_manifests/abdomen_mr_ranges.json --workdir runs/mr --config configs/demo.yaml
      ccam run --workdir runs/demo --from train-ccam --set ccam.epochs=10
      ccam run --manifest m.json --workdir runs/x --until sample
    """
    from ccam.runner import WorkdirLock, run_pipeline

    with WorkdirLock(Path(workdir)):
        cfg = config_mod.load_settings(workdir, config_file, sets, save_to_workdir=False)  # saved by each stage that is done
        ran = run_pipeline(Path(workdir), cfg, pipeline, manifest=manifest, until=until, from_=from_, save_config=True)
    if not ran:
        click.echo("ccam run: every stage is up to date, nothing to do.", err=True)


@cli.command("phantom")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output folder (images/, masks/, manifest.json).")
@click.option("--cases", "-n", default=20, show_default=True, type=click.IntRange(1, 10000), help="Number of cases.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same cohort).")
@click.option("--modality", type=click.Choice(["MR", "CT"]), default="MR", show_default=True, help="MR-like or CT-like volumes.")
def phantom_cmd(out, cases, seed, modality) -> None:
    """Generate a synthetic abdominal cohort (liver, kidneys, spleen) with ground truth and a manifest.

    \b
    Examples:
      ccam phantom --out demo_data --cases 20 --seed 0
      ccam phantom --out ct_data --cases 8 --modality CT
    """
    from ccam.data.phantom import make_phantom_cohort

    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder ({e.strerror})", path=out, fix="choose a writable --out")
    path = make_phantom_cohort(Path(out), n_cases=cases, seed=seed, modality=modality)
    click.echo(str(path))


def _close_progress_bars() -> None:
    """End any progress bar left open by the failed stage, so the error starts on its own line."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # never hide the error behind a cosmetic failure
        pass


def _raise_stopped(signum, frame) -> None:
    raise Stopped()


def _default_sigterm_in_child() -> None:
    """A forked child (a DataLoader worker) is ended by SIGTERM as usual, not by ccam's handler."""
    if signal.getsignal(signal.SIGTERM) is _raise_stopped:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def _stopped_line() -> str:
    """What a SIGTERM'd command says: under torchrun, why every rank stops and how to go on."""
    from ccam import distributed

    if distributed.world() > 1:
        return (f"rank {distributed.rank()} of {distributed.world()} stopped: torchrun ends every rank when one fails or "
                "is interrupted (the failing rank's error and torchrun's report are around this line) -> fix that, then "
                "re-run the same torchrun command: every rank resumes after the last finished epoch (checkpoint_last.pt)")
    return "stopped by SIGTERM -> re-run the same command to resume where it stopped"


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another rank of this torchrun run died (gloo/NCCL connection errors)."""
    from ccam import distributed

    if distributed.world() <= 1 or not isinstance(e, RuntimeError):
        return False
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(w in text for w in ("gloo", "nccl", "connection", "peer"))


def main(argv=None) -> int:
    _register_commands()
    # SIGTERM (torchrun stopping its ranks, a scheduler's cancel) unwinds like Ctrl-C: partial state kept
    previous = signal.signal(signal.SIGTERM, _raise_stopped) if threading.current_thread() is threading.main_thread() else None
    try:
        cli.main(args=argv, prog_name="ccam", standalone_mode=False)
    except UserError as e:
        if _DEBUG["on"]:
            raise
        _close_progress_bars()
        click.echo(f"ccam: error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("ccam: aborted", err=True)
        return 130
    except click.exceptions.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("ccam: interrupted; re-run the same command to resume", err=True)
        return 130
    except Stopped:
        _close_progress_bars()
        click.echo(f"ccam: error: {_stopped_line()}", err=True)
        return 128 + signal.SIGTERM
    except RuntimeError as e:
        if _DEBUG["on"] or not _lost_peer(e):
            raise
        from ccam import distributed

        _close_progress_bars()
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        click.echo(f"ccam: error: rank {distributed.rank()} of {distributed.world()} lost contact with another rank "
                   f"({first[:200]}) -> see the failing rank's error and torchrun's report, then re-run the same torchrun "
                   "command: every rank resumes after the last finished epoch (checkpoint_last.pt)", err=True)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
