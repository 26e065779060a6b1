"""Flickr8k (issue 27): data=flickr8k and its download (from a loopback server), split roles given on the command
line in every data config, and the vocab_min_count vocabulary."""
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner import download as dl
from captioner import extract
from captioner.checkpoint import load_checkpoint
from captioner.cli import compose_config
from captioner.data.coco import load_splits
from captioner.data.vocab import SPECIALS, build_tokens, load_words
from captioner.run import train
from captioner.training import checks as training_checks
from captioner.training.prepare import Prepared, read_splits
from captioner.utils import CaptionerError
from conftest import SHARED, make_cfg
from test_download import make_zip, server  # noqa: F401 (the loopback server fixture)

FLICKR8K = Path(os.environ.get("CAPTIONER_FLICKR8K", SHARED / "datasets" / "flickr8k"))
DATA_CONFIGS = ["coco", "karpathy_coco", "karpathy_flickr30k", "karpathy_flickr8k", "flickr8k", "scenes", "shapes"]


def jpeg(seed) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# The mirror's zips as published: the photos under the misspelt Flicker8k_Dataset/ (plus macOS metadata), and
# Karpathy's caption_datasets.zip with the split files at its top level
PHOTOS = {f"{i}_{i:x}.jpg": jpeg(i) for i in range(1000, 1006)}
SPLIT_FILE = json.dumps({"dataset": "flickr8k", "images": [
    {"filename": name, "imgid": i, "split": ["train", "train", "train", "val", "val", "test"][i],
     "sentences": [{"raw": f"A dog number {i} runs .", "tokens": ["a", "dog", "runs"]}] * 5}
    for i, name in enumerate(PHOTOS)]}).encode()
MIRROR = {**{f"Flicker8k_Dataset/{k}": v for k, v in PHOTOS.items()}, "__MACOSX/Flicker8k_Dataset/._x": b"x"}
FLICKR_ZIPS = {"/flickr8k/Flickr8k_Dataset.zip": make_zip(MIRROR),
               "/karpathy/caption_datasets.zip": make_zip({"dataset_flickr8k.json": SPLIT_FILE,
                                                           "dataset_coco.json": b"{}"})}


def fetch_flickr8k(data_dir, server, *overrides):  # noqa: F811
    dl.main([f"paths.data_dir={data_dir}", "data=flickr8k", f"flickr8k_url={server.url}/flickr8k",
             f"karpathy_url={server.url}/karpathy/caption_datasets.zip", "progress=false", "retries=0",
             *overrides])


def test_download_flickr8k_into_the_layout_data_flickr8k_reads(tmp_path, server):  # noqa: F811
    server.files = dict(FLICKR_ZIPS)
    fetch_flickr8k(tmp_path, server)
    root = tmp_path / "flickr8k"
    assert sorted(p.name for p in root.iterdir()) == ["dataset_flickr8k.json", "images"]  # no zips, no temp folders
    assert (root / "dataset_flickr8k.json").read_bytes() == SPLIT_FILE
    assert {p.name: p.read_bytes() for p in (root / "images").glob("*.jpg")} == PHOTOS
    assert (root / "images" / dl.MARKER).is_file()
    cfg = compose_config("config", [f"paths.data_dir={tmp_path}", "data=flickr8k", "paths.run_dir=.",
                                    "data.splits.test=[test]"])
    splits = load_splits(cfg.data.root, cfg.data.splits, cfg.data.split_file)
    assert {role: len(s.image_ids) for role, s in splits.items()} == {"train": 3, "val": 2, "test": 1}
    server.requests.clear()
    fetch_flickr8k(tmp_path, server)
    assert server.requests == []  # both parts are complete: no request at all


def test_flickr8k_download_resumes_and_checks_the_published_md5(tmp_path, server, monkeypatch):  # noqa: F811
    server.files = dict(FLICKR_ZIPS)
    url = f"{server.url}/flickr8k/Flickr8k_Dataset.zip"
    monkeypatch.setitem(dl.KNOWN, url, dl.KNOWN[f"{dl.FLICKR8K}/Flickr8k_Dataset.zip"])  # the real file's MD5
    server.cut_once.add("/flickr8k/Flickr8k_Dataset.zip")
    with pytest.raises(SystemExit, match="stopped at .* run the same command again"):
        fetch_flickr8k(tmp_path, server, "parts=[images]")
    half = (tmp_path / "flickr8k" / "Flickr8k_Dataset.zip.part").stat().st_size
    with pytest.raises(SystemExit, match="but the official file has f18a1e2920de5bd84dae7cf08ec78978"):
        fetch_flickr8k(tmp_path, server, "parts=[images]")  # resumed, then refused: not the published bytes
    assert server.requests[-1] == ("/flickr8k/Flickr8k_Dataset.zip", f"bytes={half}-")
    assert not (tmp_path / "flickr8k" / "images").exists()


def test_two_parts_of_one_zip_fetch_it_once(tmp_path, server):  # noqa: F811
    server.files = dict(FLICKR_ZIPS)
    dl.download(tmp_path, ["caption_datasets", "dataset_flickr8k.json"], timeout=5, retries=0, progress=False,
                karpathy_url=f"{server.url}/karpathy/caption_datasets.zip")
    assert len(server.requests) == 1
    assert (tmp_path / "dataset_flickr8k.json").read_bytes() == SPLIT_FILE
    assert (tmp_path / "caption_datasets" / "dataset_flickr8k.json").read_bytes() == SPLIT_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caption_datasets", "dataset_flickr8k.json"]


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_split_roles_from_the_command_line(data):
    for roles in ("data.splits.test=[test]", "data.splits={train:[train],val:[val],test:[test]}"):
        cfg = compose_config("config", [f"data={data}", "paths.run_dir=.", roles])
        assert list(cfg.data.splits["test"]) == ["test"] and "train" in cfg.data.splits, roles


@pytest.mark.slow
def test_split_roles_reach_a_real_extraction(data_dir, capsys):
    """Both override forms, through captioner.extract on the smoke shapes (features cached once per session)."""
    common = ["experiment=smoke", f"paths.data_dir={data_dir}", "encoder.num_workers=0"]
    extract.main([*common, "data.splits.test=val2017"])
    extract.main([*common, "data.splits={train:train2017,val:val2017,test:val2017}"])
    roles = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()]
    assert roles == ["train", "val", "test"] * 2


def test_vocab_min_count_on_real_counts(data_dir, tmp_path, caplog):
    cfg = make_cfg(data_dir, tmp_path, "experiment=smoke")
    splits, _ = read_splits(cfg.data)
    tokens = build_tokens(splits, cfg.paths.cache_dir)
    prepared = Prepared(splits, {}, tokens, {})
    words, counts = load_words(tokens)["words"], load_words(tokens)["counts"]
    assert len(set(counts)) > 2  # a threshold inside the range of counts: it keeps some words, not all
    min_count = sorted(set(counts))[len(set(counts)) // 2]
    frequent = [w for w, c in zip(words, counts) if c >= min_count]
    caplog.set_level(logging.INFO)
    assert prepared.vocabulary(10000, min_count).itos == SPECIALS + frequent
    assert f"Vocabulary: {len(frequent)} words (vocab_size=10000, vocab_min_count={min_count})" in caplog.text
    assert prepared.vocabulary(2, min_count).itos == SPECIALS + frequent[:2]  # both apply
    assert len(prepared.vocabulary(10000, None)) == len(prepared.vocabulary(10000, 1)) == len(SPECIALS) + len(counts)


def test_vocab_min_count_is_checked(cfg_factory, tmp_path):
    from captioner.run import check_config

    for bad in ("0", "abc"):
        with pytest.raises(CaptionerError, match=f"vocab_min_count={bad} must be a positive integer or null"):
            check_config(cfg_factory(f"vocab_min_count={bad}"))


def twenty_real_photos(tmp_path):
    """A split file of the shared copy's first 20 entries (not all 7,000): 12 train, 4 val, 4 test."""
    if not (FLICKR8K / "dataset_flickr8k.json").is_file():
        pytest.skip(f"the Flickr8k copy is not present at {FLICKR8K} (set CAPTIONER_FLICKR8K to its folder)")
    entries = json.loads((FLICKR8K / "dataset_flickr8k.json").read_text())["images"][:20]
    for i, entry in enumerate(entries):  # the copy has no test images (and its first 20 are train)
        entry["split"] = "train" if i < 12 else "val" if i < 16 else "test"
    split_file = tmp_path / "dataset_flickr8k.json"
    split_file.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return entries, split_file


def test_the_flickr8k_experiment_composes_its_recipe_and_passes_the_checks(tmp_path):
    cfg = make_cfg(tmp_path / "data", tmp_path / "run", "experiment=flickr8k")
    assert cfg.data.name == "flickr8k" and str(cfg.data.root).endswith("flickr8k/images")
    assert (cfg.vocab_min_count, cfg.caption_idx, cfg.seq_per_img, cfg.checkpoint_monitor) == (5, -1, 5, "val/CIDEr")
    training_checks.check_run(cfg)
    training_checks.check_recipes(cfg)
    scst = make_cfg(tmp_path / "data", tmp_path / "run", "experiment=flickr8k_scst", "init_from=some.ckpt")
    assert (scst.objective, scst.seq_per_img, scst.data.name, scst.label_smoothing) == ("scst", 1, "flickr8k", 0.0)
    training_checks.check_run(scst)


@pytest.mark.slow
def test_the_flickr8k_experiment_trains_on_real_photos(tmp_path):
    _, split_file = twenty_real_photos(tmp_path)
    cfg = make_cfg(tmp_path / "data", tmp_path / "run", "experiment=flickr8k", f"data.root={FLICKR8K / 'images'}",
                   f"data.split_file={split_file}", "epochs=2", "eval_every=1", "hidden_size=32",
                   "encoder.num_workers=0", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
    train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")  # chosen by val/CIDEr
    words = len(ckpt["hyper_parameters"]["itos"]) - len(SPECIALS)
    counts = {}
    for entry in json.loads(split_file.read_text())["images"][:12]:
        for sentence in entry["sentences"]:
            for word in sentence["tokens"]:
                counts[word] = counts.get(word, 0) + 1
    assert 0 < words <= sum(c >= 5 for c in counts.values())  # vocab_min_count=5 reached the vocabulary
    # its SCST stage, as benchmarks/flickr8k.py runs it: from that checkpoint, one epoch, scored on val
    scst = make_cfg(tmp_path / "data", tmp_path / "scst", "experiment=flickr8k_scst", f"data.root={FLICKR8K / 'images'}",
                    f"data.split_file={split_file}", "epochs=1", "hidden_size=32", "encoder.num_workers=0",
                    f"init_from={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", "trainer.enable_progress_bar=false",
                    "trainer.enable_model_summary=false")
    train(scst)
    metrics = json.loads((tmp_path / "scst" / "metrics.json").read_text())
    assert metrics["steps"] == 1 and 0 <= metrics["val/CIDEr"] < 10  # 12 images: one batch of 5 samples each


@pytest.mark.slow
def test_extract_twenty_real_flickr8k_photos(tmp_path, capsys):
    """The shared Flickr8k copy through data=flickr8k."""
    entries, split_file = twenty_real_photos(tmp_path)
    extract.main(["data=flickr8k", f"data.root={FLICKR8K / 'images'}", f"data.split_file={split_file}",
                  f"paths.data_dir={tmp_path / 'data'}", "data.splits.test=[test]", "encoder.num_workers=0"])
    lines = capsys.readouterr().out.splitlines()
    counts = {line.split(" ")[0]: int(line.split(": ")[1].split(" ")[0]) for line in lines}
    want = {role: sum(e["split"] == role for e in entries) for role in ("train", "val", "test")}
    assert counts == want and sum(want.values()) == 20 and all("0 unreadable" in line for line in lines)
