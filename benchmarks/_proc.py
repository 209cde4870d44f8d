"""Shared by the benchmarks: run a command in its own process and measure it."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd`` in a fresh process via a tiny wrapper; (wall seconds, peak RSS MB, stderr tail).

    Peak RSS is the child's own ru_maxrss, so the benchmark's own memory is not counted.
    """
    wrapper = (
        "import resource, subprocess, sys, json, time; t=time.time(); "
        "p=subprocess.run(sys.argv[1:], stderr=subprocess.PIPE, text=True); "
        "print(json.dumps({'rc': p.returncode, 'wall': time.time()-t, 'err': p.stderr[-3000:], "
        "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024}))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper] + [str(c) for c in cmd], capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    if rec["rc"] != 0:
        sys.exit(f"command failed: {' '.join(str(c) for c in cmd)}\n{rec['err']}")
    return rec["wall"], rec["rss"], rec["err"]
