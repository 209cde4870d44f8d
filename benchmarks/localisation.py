"""Benchmark issue 13: does each configuration's CAM find the organs? One markdown row per configuration.

For every configuration (a name, an optional ``--config`` file, ``--set`` overrides; default: one
configuration "default" = the current defaults with configs/demo.yaml):

1. the cohort: ``--manifest M``, or the demo phantom ``ccam phantom --cases 20 --seed 0 --out
   <workroot>/data`` (generated once, then reused);
2. ``ccam run --manifest M --workdir <workroot>/<name> --config C --set ... --until evaluate`` in a
   subprocess (pipelines/ccam.yaml, or ``--pipeline``; skip/resume: a work directory that already
   ran the same settings only re-runs what changed). ``evaluate.localisation=true`` is added so
   the localisation section is always there;
3. reads ``W/reports/evaluation.json`` (Dice per mask source, the localisation section) and
   ``W/pcam/_stage.json`` (train-pcam seconds; the subprocess's wall time when there is no
   record), and computes the left/right swap rates of the pseudo-masks against ground truth
   (pooled voxel counts, as the ablation table does: `ccam.metrics.swap_rates`).

Dice, swap rates and localisation are on the ``--split`` cases (default train: the pseudo-masks of
the training cases are what the segmenter learns from). All figures are against ground truth:
benchmark use only. Prints the table header, then one row per configuration as it finishes, to
stdout (the pipeline's own output goes to stderr), and appends each row with all its numbers as a
JSON line to ``benchmarks/results/localisation.jsonl``, failed runs included, so no row is lost.

    .venv/bin/python benchmarks/localisation.py
    .venv/bin/python benchmarks/localisation.py --config-name base --config-name os16 --set pcam.output_stride=16
    .venv/bin/python benchmarks/localisation.py --configs benchmarks/my_configs.yaml --workroot runs/localisation
    .venv/bin/python benchmarks/localisation.py --manifest data_manifests/ct.json --workroot runs/loc_ct --config-name ct --config configs/ct.yaml

A ``--configs`` file is a YAML list of ``{name, config (optional), set (list of key=value)}``, or a
mapping ``name: {config, set}`` / ``name: [key=value, ...]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from ccam.data.cohort import Cohort, left_right_pairs  # noqa: E402
from ccam.io.atomic import append_jsonl  # noqa: E402
from ccam.io.volume import read_volume  # noqa: E402
from ccam.metrics import confusion, read_ground_truth, swap_rates  # noqa: E402

CCAM = [sys.executable, "-m", "ccam.cli"]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
RESULTS = REPO / "benchmarks" / "results" / "localisation.jsonl"


# -- configurations --------------------------------------------------------------------------------

class _NewConfig(argparse.Action):
    """--config-name NAME starts a configuration; the --config / --set after it belong to it."""

    def __call__(self, parser, ns, value, option_string=None):
        ns.named.append({"name": value, "config": None, "set": []})


class _ToLast(argparse.Action):
    """--set / --config: add to the configuration named last (a first one is called "default")."""

    def __call__(self, parser, ns, value, option_string=None):
        if not ns.named:
            ns.named.append({"name": "default", "config": None, "set": []})
        if option_string == "--set":
            if "=" not in value or "." not in value.split("=", 1)[0]:
                parser.error(f"--set {value!r} must look like section.key=value")
            ns.named[-1]["set"].append(value)
        else:
            ns.named[-1]["config"] = value


def read_configs_file(path: Path) -> list[dict]:
    """Configurations of a ``--configs`` YAML file (list or mapping, see the module docstring)."""
    data = yaml.safe_load(Path(path).read_text()) or []
    items = []
    if isinstance(data, dict):
        for name, v in data.items():
            v = {"set": v} if isinstance(v, list) else dict(v or {})
            items.append({"name": name, **v})
    elif isinstance(data, list):
        items = [dict(x) for x in data]
    else:
        sys.exit(f"{path}: expected a list or a mapping of configurations")
    out = []
    for it in items:
        if "name" not in it:
            sys.exit(f"{path}: every configuration needs a name ({it})")
        sets = it.get("set", it.get("sets", [])) or []
        if isinstance(sets, dict):  # {section.key: value}
            sets = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]
        out.append({"name": str(it["name"]), "config": it.get("config"), "set": [str(s) for s in sets]})
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._") or "config"


# -- running ---------------------------------------------------------------------------------------

def ensure_phantom(data: Path, cases: int, seed: int) -> Path:
    """The demo phantom's manifest in ``data`` (``ccam phantom``), generated unless the same cohort is there."""
    manifest = data / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if len(m.get("cases", [])) == cases and m.get("name") == f"phantom-MR-{seed}":
            return manifest
        sys.exit(f"{data} holds another cohort ({m.get('name')}, {len(m.get('cases', []))} cases); use another --workroot")
    rc = subprocess.run(CCAM + ["phantom", "--out", str(data), "--cases", str(cases), "--seed", str(seed)], cwd=REPO,
                        stdout=sys.stderr).returncode
    if rc != 0:
        sys.exit(f"ccam phantom failed (exit {rc})")
    return manifest


def run_pipeline(manifest: Path, workdir: Path, config: Path, sets: list[str], pipeline: str | None) -> tuple[int, float]:
    """``ccam run ... --until evaluate`` in a subprocess, its output on stderr; (exit status, wall seconds)."""
    cmd = CCAM + ["run", "--manifest", str(manifest), "--workdir", str(workdir), "--config", str(config), "--until", "evaluate"]
    if pipeline:
        cmd += ["--pipeline", pipeline]
    for s in sets:
        cmd += ["--set", s]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    t = time.time()
    rc = subprocess.run(cmd, cwd=REPO, stdout=sys.stderr).returncode
    return rc, time.time() - t


def pseudo_swap_rates(workdir: Path, split: str) -> dict:
    """Left/right swaps of the pseudo-masks against ground truth, pooled over the ``split`` cases with a mask."""
    co = Cohort(workdir)
    pairs = left_right_pairs(co.classes)
    c = co.num_classes + 1
    cm = np.zeros((c, c), dtype=np.int64)
    n = 0
    for case in co.split(split):
        path = workdir / "pseudo_masks" / f"{case.id}.nii.gz"
        if not case.mask_path or not path.exists() or not pairs:
            continue
        gt = read_ground_truth(case, co.num_classes).array
        cm += confusion(np.asarray(read_volume(path, case=case.id).array).astype(np.int64), gt, c)
        n += 1
    return {"cases": n, "rates": swap_rates(cm, pairs, co.classes) if n else {}}


def _dice(report: dict, source: str, split: str, classes: list[str]) -> dict:
    s = report.get("stages", {}).get(source, {}).get("summary", {}).get(split)
    if not s:
        return {}
    return {c: s["dice"][c]["mean"] for c in list(classes) + ["mean"]}


def measure(workdir: Path, rc: int, wall: float, split: str) -> dict:
    """Everything the row and the JSON line need, read from the finished work directory."""
    out: dict = {"rc": rc, "wall_s": round(wall, 1)}
    rec = workdir / "pcam" / "_stage.json"
    dur = json.loads(rec.read_text()).get("duration_s") if rec.exists() else None
    out["train_pcam_s"], out["train_pcam_s_from"] = (dur, "pcam/_stage.json") if dur is not None else (round(wall, 1), "wall time")
    ev = workdir / "reports" / "evaluation.json"
    if rc != 0 or not ev.exists():
        return out
    report = json.loads(ev.read_text())
    classes = report["classes"]
    loc = report.get("localisation") or {}
    coarse = (loc.get("sources") or {}).get("coarse") or {}
    out.update({
        "classes": classes, "split": split,
        "coarse_dice": _dice(report, "coarse", split, classes), "pseudo_dice": _dice(report, "pseudo", split, classes),
        "seg_test_dice": _dice(report, "predicted", "test", classes),
        "pointing_hit_rate": {c: coarse["classes"][c]["pointing_hit_rate"] for c in classes} if coarse else {},
        "cam_mass_inside_mean": (coarse.get("mean") or {}).get("cam_mass_inside"),
        "occlusion_drop_mean": ((coarse.get("mean") or {}).get("occlusion") or {}).get("drop"),
        "swap": pseudo_swap_rates(workdir, split),
        "localisation": loc,
    })
    return out


# -- table -----------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def header(classes: list[str], swap_names: list[str]) -> str:
    cols = (["config", "coarse Dice mean"] + [f"coarse {c}" for c in classes] + ["pseudo Dice mean", "segmenter Dice (test)"]
            + [f"pointing {c}" for c in classes] + ["CAM mass inside (mean)", "occlusion drop (mean)"]
            + [f"swap {s}" for s in swap_names] + ["train-pcam s"])
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def row(name: str, m: dict, classes: list[str], swap_names: list[str]) -> str:
    if "classes" not in m:
        cells = [name, f"FAILED (exit {m['rc']})"] + [""] * (len(classes) * 2 + 5 + len(swap_names)) + [str(m.get("train_pcam_s"))]
        return "| " + " | ".join(cells) + " |"
    cd, pd = m["coarse_dice"], m["pseudo_dice"]
    drop = m["occlusion_drop_mean"]
    rates = m["swap"]["rates"]
    cells = ([name, _pct(cd.get("mean"))] + [_pct(cd.get(c)) for c in classes] + [_pct(pd.get("mean")), _pct(m["seg_test_dice"].get("mean"))]
             + [_pct(m["pointing_hit_rate"].get(c)) for c in classes]
             + [_pct(m["cam_mass_inside_mean"]), "-" if drop is None else f"{drop:.3f}"]
             + [_pct(rates.get(s)) for s in swap_names] + [f"{m['train_pcam_s']:.0f}" if m["train_pcam_s"] is not None else "-"])
    return "| " + " | ".join(cells) + " |"


def _git() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.set_defaults(named=[])
    ap.add_argument("--config-name", action=_NewConfig, metavar="NAME", help="start a configuration (repeatable)")
    ap.add_argument("--set", action=_ToLast, metavar="SECTION.KEY=VALUE", help="override for the configuration named last (repeatable)")
    ap.add_argument("--config", action=_ToLast, metavar="FILE", help=f"YAML settings of the configuration named last (default {DEFAULT_CONFIG.relative_to(REPO)})")
    ap.add_argument("--configs", dest="configs_file", type=Path, metavar="FILE.yaml", help="YAML file of named configurations")
    ap.add_argument("--workroot", type=Path, default=REPO / "runs" / "localisation", help="work directories go to WORKROOT/<name>")
    ap.add_argument("--manifest", type=Path, help="cohort manifest (default: the demo phantom in WORKROOT/data)")
    ap.add_argument("--cases", type=int, default=20, help="phantom cases when no --manifest (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed when no --manifest (default 0)")
    ap.add_argument("--pipeline", help="stage graph for `ccam run` (default pipelines/ccam.yaml)")
    ap.add_argument("--split", default="train", choices=("train", "val", "test"), help="cases the Dice and swap figures are on")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    configs = list(a.named) + (read_configs_file(a.configs_file) if a.configs_file else [])
    if not configs:
        configs = [{"name": "default", "config": None, "set": []}]
    names = [_safe(c["name"]) for c in configs]
    if len(set(names)) != len(names):
        sys.exit(f"configuration names must be distinct: {names}")

    workroot = a.workroot.resolve()
    manifest = a.manifest.resolve() if a.manifest else ensure_phantom(workroot / "data", a.cases, a.seed)
    git = _git()
    printed = False
    failed = 0
    for cfg, name in zip(configs, names):
        config = Path(cfg["config"]).resolve() if cfg["config"] else DEFAULT_CONFIG
        sets = list(cfg["set"])
        if not any(s.split("=", 1)[0].strip() == "evaluate.localisation" for s in sets):
            sets.append("evaluate.localisation=true")  # the section this benchmark reads
        workdir = workroot / name
        rc, wall = run_pipeline(manifest, workdir, config, sets, a.pipeline)
        m = measure(workdir, rc, wall, a.split)
        classes = m.get("classes") or []
        swap_names = list(m.get("swap", {}).get("rates", {}))
        if not printed and classes:
            print(header(classes, swap_names), flush=True)
            printed = True
        line = row(cfg["name"], m, classes, swap_names)
        print(line, flush=True)
        failed += rc != 0
        append_jsonl(a.results, {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "name": cfg["name"], "config": str(config),
                                 "set": sets, "manifest": str(manifest), "workdir": str(workdir), "pipeline": a.pipeline,
                                 "git": git, **m, "row": line})
    print(f"rows appended to {a.results}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
