"""Prebuilt shapes caches for the GPU machine, which has no spaCy and no EfficientNet-Lite0 weights.

    python benchmarks/gpu_data.py build     # here: build at FIXED, copy to .bench/gpudata with a manifest
    python benchmarks/gpu_data.py restore   # there: copy back to FIXED, restore modification times
    python benchmarks/gpu_data.py site      # here: pycocoevalcap's Python files into .bench/site (no jars, 0.1 MB):
                                            # BLEU, ROUGE-L and CIDEr there (no java there: no METEOR, SPICE)

Cache keys hold the absolute path, size and modification time of the annotation files (until caches are
content-keyed), so the caches are built at a fixed absolute path and put back at the same path with the same
modification times; then `CAPTIONER_DATA_DIR=/tmp/captioner-gpudata` finds them. Word vectors are left out
(the GPU run uses embeddings=learned).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXED = Path("/tmp/captioner-gpudata")
REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / ".bench" / "gpudata"


def build():
    env = dict(os.environ, CAPTIONER_DATA_DIR=str(FIXED))
    subprocess.run([sys.executable, "-m", "captioner.run", "experiment=shapes", "embeddings=learned", "iterations=1",
                    "eval_every=0", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none",
                    f"hydra.run.dir={FIXED.parent / 'captioner-gpudata-run'}"], cwd=REPO, env=env, check=True)
    shutil.rmtree(CARRIED, ignore_errors=True)
    shutil.copytree(FIXED, CARRIED, ignore=shutil.ignore_patterns("vectors", "*.lock"))
    times = {str(p.relative_to(CARRIED)): (FIXED / p.relative_to(CARRIED)).stat().st_mtime_ns
             for p in CARRIED.rglob("*") if p.is_file()}
    (CARRIED.parent / "gpudata.json").write_text(json.dumps(times))
    size = sum((CARRIED / f).stat().st_size for f in times)
    print(f"{len(times)} files, {size / 2**20:.1f} MiB in {CARRIED}")


def restore():
    times = json.loads((CARRIED.parent / "gpudata.json").read_text())
    shutil.rmtree(FIXED, ignore_errors=True)
    shutil.copytree(CARRIED, FIXED)
    for name, ns in times.items():
        os.utime(FIXED / name, ns=(ns, ns))
    print(f"restored {len(times)} files into {FIXED}")


def site():
    import pycocoevalcap

    src = Path(list(pycocoevalcap.__path__)[0])
    dest = CARRIED.parent / "site" / "pycocoevalcap"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if not (n.endswith(".py") or
                                                                                  (Path(d) / n).is_dir())])
    print(f"{sum(1 for _ in dest.rglob('*.py'))} files in {dest}")


if __name__ == "__main__":
    {"build": build, "restore": restore, "site": site}[sys.argv[1]]()
