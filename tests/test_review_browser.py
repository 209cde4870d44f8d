"""The review report in a real browser: headless Chromium (Debian package `chromium`) loads
index.html and a case page from disk, every case id is shown, every picture loads (naturalWidth > 0,
so no broken image), and the decision buttons keep a decision. Skipped when Chromium is absent.

``CCAM_DOCS_SCREENSHOTS=1`` also refreshes the screenshots in docs/review/ linked from the README.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from ccam.commands.review import review_cmd

from test_review import gt_masks, liver_on_untagged_slice, split_liver, swap_kidneys, write_stage  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium); "
                                                         "the browser check of the review report is skipped")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "review"

# appended to a copy of a page: after load, write what the browser saw into the DOM for --dump-dom
PROBE = """
<script>
window.addEventListener("load", function () {
  const result = {images: Array.from(document.images).map(function (i) {
    return {src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth}; })};
  const radio = document.querySelector("input[name=decision][value=edit]");
  if (radio) {
    radio.checked = true;
    radio.dispatchEvent(new Event("change"));
    result.stored = loadDecisions();
  }
  const pre = document.createElement("pre");
  pre.id = "ccam-probe";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script>
"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--allow-file-access-from-files", f"--user-data-dir={profile}", "--virtual-time-budget=8000", *args]
    # chromium may print non-UTF-8 bytes on stderr (GPU and font probes): decode leniently
    return subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def probe(page: Path, profile: Path) -> tuple[dict, str]:
    """Load a copy of ``page`` (same folder, so relative links hold) and return (probe result, DOM)."""
    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    res = chromium("--dump-dom", copy.as_uri(), profile=profile)
    copy.unlink()
    m = re.search(r'<pre id="ccam-probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page did not finish loading in Chromium: {res.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")), res.stdout


def screenshot(page: Path, png: Path, profile: Path, size: str = "1280,900") -> None:
    res = chromium(f"--screenshot={png}", f"--window-size={size}", "--hide-scrollbars", page.as_uri(), profile=profile)
    assert png.exists() and png.stat().st_size > 10_000, res.stderr[-2000:]


def test_report_in_chromium(prepared, tmp_path):
    work = prepared(32)
    from ccam.data.cohort import Cohort
    from ccam.io.volume import read_volume

    co = Cohort(work)
    masks = gt_masks(work)
    masks["case000"] = swap_kidneys(masks["case000"])
    masks["case001"], _ = liver_on_untagged_slice(masks["case001"], co.case("case001"))
    masks["case003"] = split_liver(masks["case003"], read_volume(co.case("case003").mask_path).affine)
    write_stage(work, masks)
    out = tmp_path / "report"
    res = CliRunner().invoke(review_cmd, ["--workdir", str(work), "--stage", "pseudo-masks", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ids = [c.id for c in co.cases]
    profile = tmp_path / "profile"

    seen, dom = probe(out / "index.html", profile)
    rows = re.findall(r'<tr data-case="([^"]+)"', dom)
    assert sorted(rows) == sorted(ids) and rows[0] == "case000"  # every case, worst first
    shown = re.sub(r"<[^>]+>", " ", dom.split("<tbody>")[1])
    assert all(cid in shown for cid in ids)
    assert len(seen["images"]) == len(ids) and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen

    seen, dom = probe(out / "cases" / "case000.html", profile)
    assert len(seen["images"]) >= 3 and all(i["complete"] and i["width"] > 0 for i in seen["images"]), seen
    assert "wrong side" in dom and "case000" in dom
    assert seen["stored"]["case000"]["decision"] == "edit"  # the page keeps the decision for decisions.json

    shots = {"index": (out / "index.html", "1280,1000"), "case": (out / "cases" / "case000.html", "1280,1500")}
    for name, (page, size) in shots.items():
        png = tmp_path / f"{name}.png"
        screenshot(page, png, profile, size)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("CCAM_DOCS_SCREENSHOTS"):
            DOCS.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, DOCS / f"review_{name}.png")
