"""Markdown tables of the reports (evaluation, demo, ablation, localisation): one renderer.

Values are fractions in the JSON reports; the tables show Dice and rates in %. ``None`` / NaN
shows as ``-``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def fmt(v: Optional[float], scale: float = 100.0, digits: int = 1) -> str:
    """A number for a table cell: scaled, fixed digits; '-' for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{float(v) * scale:.{digits}f}"


def fmt_mean_std(ms: dict, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' of a {mean, std, n} summary; '-' when it has no value."""
    if ms.get("n", 1) == 0 or ms.get("mean") is None or math.isnan(ms["mean"]):
        return "-"
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: Optional[int] = None) -> list[str]:
    """Lines of a Markdown table; columns from ``numeric_from`` on are right-aligned (default: all left)."""
    align = ["---:" if numeric_from is not None and i >= numeric_from else "---" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] + ["| " + " | ".join(r) + " |" for r in rows]


def stage_dice_table(report: dict, metric: str = "dice", std: bool = True, oracle: bool = False) -> list[str]:
    """Per stage and split of an evaluation report (``reports/evaluation.json``): the metric per class and
    the case mean; ``std`` adds ± std; ``oracle`` appends the oracle-tau rows of the tau sweep (Dice only)."""
    classes = report["classes"]
    scale = 100.0 if metric == "dice" else 1.0
    cell = (lambda ms: fmt_mean_std(ms, scale)) if std else (lambda ms: fmt(ms.get("mean"), scale))
    rows = []
    for name, st in report["stages"].items():
        for split, s in st["summary"].items():
            rows.append([name, split, str(s["n_cases"])] + [cell(s[metric][c]) for c in list(classes) + ["mean"]])
    if oracle:
        for name, sw in report.get("tau_sweep", {}).items():
            o = sw["oracle"]
            rows.append([f"{name} CAMs, oracle tau={o['tau']}", "train", str(sw["n_cases"])]
                        + [fmt(o["dice"][c]) for c in classes] + [fmt(o["mean_dice"])])
    if not rows:
        rows.append(["(no stage has produced masks yet)", "", ""] + ["" for _ in classes] + [""])
    return markdown_table(["masks", "split", "cases"] + list(classes) + ["mean"], rows, numeric_from=2)
