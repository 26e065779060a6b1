"""From nothing to a Karpathy-test table, as a user runs it: download (from a loopback server) -> run
data=karpathy_coco -> evaluate data=karpathy_coco split=test, on a small Karpathy-format copy of coco-mini."""
import json
import logging
import zipfile
from pathlib import Path

import pytest

from captioner.evaluate import main
from conftest import require_coco_mini, run_module
from test_download import make_zip, server  # noqa: F401 (the loopback server fixture)

SPLITS = {"train": 14, "restval": 6, "val": 5, "test": 6}


def karpathy_zips(mini: Path) -> dict:
    """The COCO 2017 zips and caption_datasets.zip for the first 20 train2017 and 11 val2017 coco-mini photos.
    dataset_coco.json names them as Karpathy's file does, by their 2014 file names, which the 2017 zips lack."""
    members, annotations, entries = {}, {}, []
    for split, count in [("train2017", 20), ("val2017", 11)]:
        data = json.loads((mini / "annotations" / f"captions_{split}.json").read_text())
        images = data["images"][:count]
        ids = {img["id"] for img in images}
        members[split] = {f"{split}/{img['file_name']}": (mini / split / img["file_name"]).read_bytes()
                          for img in images}
        anns = [a for a in data["annotations"] if a["image_id"] in ids]
        annotations[f"annotations/captions_{split}.json"] = json.dumps({"images": images, "annotations": anns})
        old = "train2014" if split == "train2017" else "val2014"
        for img in images:
            caps = [a["caption"] for a in anns if a["image_id"] == img["id"]]
            sentences = [{"raw": c, "tokens": c.lower().split()} for c in caps]
            entries.append({"filepath": old, "filename": f"COCO_{old}_{img['id']:012d}.jpg", "cocoid": img["id"],
                            "imgid": len(entries), "sentences": sentences})
    roles = [s for s, n in SPLITS.items() for _ in range(n)]
    for entry, role in zip(entries, roles):
        entry["split"] = role
    split_file = json.dumps({"images": entries, "dataset": "coco"})
    return {"/annotations/annotations_trainval2017.zip": make_zip(annotations, zipfile.ZIP_DEFLATED),
            "/zips/train2017.zip": make_zip(members["train2017"]), "/zips/val2017.zip": make_zip(members["val2017"]),
            "/karpathy/caption_datasets.zip": make_zip({"dataset_coco.json": split_file})}


def ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_download_run_evaluate_karpathy_test(tmp_path, server, monkeypatch, caplog):  # noqa: F811
    server.files = karpathy_zips(require_coco_mini())
    monkeypatch.setenv("CAPTIONER_DATA_DIR", str(tmp_path / "data"))
    ok(run_module("captioner.download", f"base_url={server.url}", "progress=false",
                  f"karpathy_url={server.url}/karpathy/caption_datasets.zip", cwd=tmp_path))
    assert (tmp_path / "data" / "coco" / "caption_datasets" / "dataset_coco.json").is_file()
    small = ["hidden_size=64", "batch_size=8", "epochs=2", "learning_rate=3e-3", "embeddings=learned",
             "embeddings.dim=32", "data.image_size=64", "encoder.num_workers=0", "eval_every=0", "trainer=cpu",
             "trainer.enable_progress_bar=false"]
    ok(run_module("captioner.run", "data=karpathy_coco", *small, cwd=tmp_path))
    ckpt = next((tmp_path / "outputs").glob("runs/*/checkpoints/last.ckpt"))

    # README's command: the data the checkpoint was trained on (karpathy_coco at its root), its test split
    done = ok(run_module("captioner.evaluate", "ckpt_path=last", "split=test", "beam_size=2", "extract.num_workers=0",
                         cwd=tmp_path))
    assert "Evaluating on karpathy_coco at " in done.stderr
    assert "Extracting efficientnet_lite0 features for 6 images" in done.stderr  # test was not extracted in training
    eval_dir = ckpt.parents[1] / "eval"
    report = json.loads((eval_dir / "karpathy_coco-test-last-beam2-len20-nr2-metrics.json").read_text())
    results = json.loads((eval_dir / "karpathy_coco-test-last-beam2-len20-nr2-results.json").read_text())
    assert report["split"] == "test" and report["images"] == len(results) == SPLITS["test"]
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(report["metrics"]) and "CIDEr\t" in done.stdout
    assert set(report["seconds"]) == {"features", "decoding", "scoring"}
    test_ids = {e["cocoid"] for e in json.loads((tmp_path / "data" / "coco" / "caption_datasets" /
                                                 "dataset_coco.json").read_text())["images"] if e["split"] == "test"}
    assert {r["image_id"] for r in results} == test_ids

    caplog.set_level(logging.INFO)
    main([f"ckpt_path={ckpt}", "data=karpathy_coco", "split=val"])  # in-process: no second start-up
    assert not [r for r in caplog.records if r.getMessage().startswith("Extracting")]  # training's val features
    assert json.loads((eval_dir / "karpathy_coco-val-last-beam3-len20-nr2-metrics.json").read_text())["images"] == SPLITS["val"]
