"""The layering rule of docs/architecture.md, and cache keys that only hold what changes results.

- A stage module imports `ccam.stages.base`, `ccam.artifacts` and library modules: never another
  stage, the runner, a command or the CLI. No import cycle anywhere in `ccam/` (imports inside
  functions count too).
- Runtime keys (threads, device, workers) never make a stage stale; a result key does, and the
  staleness reaches everything downstream.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ccam
from ccam import config as config_mod
from ccam.config import REPO_CONFIGS

PKG = Path(ccam.__file__).resolve().parent
STAGE_ALLOWED = {"ccam.stages.base", "ccam.artifacts"}
STAGE_FORBIDDEN_PREFIXES = ("ccam.cli", "ccam.runner", "ccam.commands", "ccam.stages.")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """ccam modules imported anywhere in the file (``from ccam.x import y`` -> ccam.x.y when that is a module)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "ccam" or n.startswith("ccam."))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path, modules) if m in modules and m != name} for name, path in modules.items()}


def test_stage_modules_import_only_base_artifacts_and_library():
    graph = _graph()
    stages = [m for m in graph if m.startswith("ccam.stages.") and m != "ccam.stages.base"]
    assert len(stages) >= 10, stages
    bad = {}
    for m in stages:
        wrong = sorted(i for i in graph[m] if i not in STAGE_ALLOWED and i.startswith(STAGE_FORBIDDEN_PREFIXES))
        if wrong:
            bad[m] = wrong
    assert not bad, f"stage modules importing another stage, the runner, a command or the CLI: {bad}"
    # artifacts and base are below the stages: they import no stage either
    for m in ("ccam.artifacts", "ccam.stages.base"):
        assert not [i for i in graph[m] if i.startswith(STAGE_FORBIDDEN_PREFIXES) and i not in STAGE_ALLOWED], graph[m]


def test_the_rule_check_catches_a_violation(tmp_path):
    """The parser sees a stage-to-stage import, also one inside a function."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from ccam.stages.train_pcam import run\n")
    assert "ccam.stages.train_pcam" in _imports(f, _modules())


def test_no_import_cycle_in_the_package():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    counter = [0]

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_stage_is_in_the_table_and_registered():
    import ccam.runner  # noqa: F401  (registers the stages)
    from ccam.stages.base import SPECS, STAGES

    assert set(SPECS) <= set(STAGES)
    for name, spec in SPECS.items():
        assert STAGES[name].folder == spec.folder
        assert not [k for k in spec.keys if k.startswith("runtime.") and k != "runtime.seed"], name
        assert "runtime" not in spec.keys, name


# -- keys: runtime settings never make a stage stale -------------------------------------------------

FAST = ("data.slice_size=32", "pcam.epochs=1", "pcam.batch_size=8", "pcam.width=0.25", "ccam.epochs=1",
        "ccam.batch_size=8", "cam.scales=[1.0]", "seg.epochs=1", "seg.channels=[8,16]", "seg.slices_per_epoch=16",
        "evaluate.surface_distances=false", "evaluate.localisation=false")
RUNTIME_ONLY = ("runtime.num_threads=1", "runtime.device=cpu", "runtime.num_workers=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phantom_manifest):
    """Every stage of pipelines/ccam.yaml and the ablation done on a tiny run."""
    from ccam.cli import main

    w = tmp_path_factory.mktemp("all_done")
    sets = [x for s in FAST for x in ("--set", s)]
    assert main(["run", "--manifest", str(phantom_manifest), "--workdir", str(w), *sets]) == 0
    assert main(["ablation", "--workdir", str(w)]) == 0
    return w


def _stage_names() -> list[str]:
    from ccam.stages.base import SPECS

    return list(SPECS)


@pytest.mark.parametrize("stage", _stage_names())
def test_runtime_keys_leave_the_stage_done(finished_run, stage):
    from ccam.stages.base import stage_status

    assert stage_status(finished_run, config_mod.resolve(finished_run), stage) == "done"
    cfg = config_mod.resolve(finished_run, None, RUNTIME_ONLY)
    assert stage_status(finished_run, cfg, stage) == "done", f"{stage} is stale after changing {RUNTIME_ONLY}"


def test_status_command_after_a_runtime_change_shows_all_done(finished_run, cli):
    rc, _, err = cli("run", "--workdir", finished_run, *[x for s in RUNTIME_ONLY for x in ("--set", s)])
    assert rc == 0 and "nothing to do" in err, err[-1500:]
    rc, out, _ = cli("status", "--workdir", finished_run)
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert rows and all(r[1] == "done" for r in rows), out


def test_a_result_key_makes_everything_downstream_stale(finished_run):
    from ccam.stages.base import stage_status

    cfg = config_mod.resolve(finished_run, None, ["cam.tau=0.31"])
    memo: dict = {}
    status = {s: stage_status(finished_run, cfg, s, memo) for s in _stage_names()}
    assert status["prepare"] == status["train-pcam"] == "done"
    for s in ("sample", "train-ccam", "pseudo-masks", "refine", "train-seg", "predict", "evaluate", "ablation"):
        assert status[s] == "stale", status


def test_repo_pipelines_name_registered_stages():
    from ccam.runner import load_pipeline

    for p in (REPO_CONFIGS.parent / "pipelines").glob("*.yaml"):
        assert load_pipeline(p)["stages"]
