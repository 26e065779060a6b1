"""benchmarks/coco_rehearsal.py at 1/100 of COCO's size on the CPU: prepare here, then the whole run."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "coco_rehearsal.py"
SMALL = ["--scale", "0.01", "--encoder", "resnet18", "--image-size", "64", "--hidden-size", "64", "--workers", "1"]


def rehearse(*args, cwd):
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def digests(root: Path) -> dict:
    files = [*root.glob("annotations/*.json"), *root.glob("caption_datasets/*.json")]
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_rehearsal_at_one_hundredth_prepares_then_runs_extract_train_evaluate(tmp_path):
    root, cache = tmp_path / "coco", tmp_path / "cache"
    prepared = rehearse("--stage", "prepare", "--root", str(root), "--cache-dir", str(cache), cwd=tmp_path)
    assert not list(root.glob("*2017/*.jpg")), "prepare writes no images"
    annotations = digests(root)
    assert set(annotations) == {"captions_train2017.json", "captions_val2017.json", "dataset_coco.json"}
    karpathy = json.loads((root / "caption_datasets" / "dataset_coco.json").read_text())["images"]
    counts = {s: sum(e["split"] == s for e in karpathy) for s in ("train", "restval", "val", "test")}
    assert counts == {"train": 828, "restval": 305, "val": 50, "test": 50}  # 113,287 / 5,000 / 5,000 at 1/100
    assert len(json.loads((root / "annotations" / "captions_val2017.json").read_text())["images"]) == 50

    # another machine: a fresh root (the annotations are generated again), the token cache carried along
    root2 = tmp_path / "elsewhere"
    figures = rehearse("--root", str(root2), "--cache-dir", str(cache), cwd=tmp_path)
    assert digests(root2) == annotations, "the generator must give byte-identical files"
    assert figures["stages"]["tokens"]["folder"] == prepared["stages"]["tokens"]["folder"]
    assert figures["stages"]["train"]["tokenized_here"] is False  # the carried token cache was used
    assert figures["images"] == len(list(root2.glob("*2017/*.jpg"))) == 1233
    stages = figures["stages"]
    assert stages["extract"]["images"] == 1233 and stages["extract"]["images_per_s"] > 0
    assert stages["train"]["train_images"] == 1133 and 0 < stages["train"]["fit_seconds"] < stages["train"]["seconds"]
    assert stages["evaluate"]["images"] == 50 and stages["evaluate"]["decoding_seconds"] > 0
    assert "CIDEr" in stages["evaluate"]["metrics"] and figures["peak_host_rss_mib"] > 100
    assert (root2 / "out" / "eval" / "karpathy_coco-test-last-beam3-len20-nr2-results.json").is_file()
