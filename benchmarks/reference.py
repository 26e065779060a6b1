"""Finding and running ../shared/bench/ref_limits.py, the plain-PyTorch yardstick, from the benchmarks.

The reference lives outside the repository; on a machine where only the checkout is copied, bring it along
(e.g. into the git-ignored `.bench/`) and point `CAPTIONER_REF` (or a benchmark's `--ref`) at it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ref_limits.py"


def reference_path(given=None):
    path = Path(given or os.environ.get("CAPTIONER_REF") or DEFAULT)
    return path if path.is_file() else None


def run_reference(path, *args):
    """The reference's JSON line, or None when it is not there."""
    if path is None:
        return None
    out = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
