"""Content-keyed caches: a copied or moved data folder keeps every cache; an edited caption or image does not."""
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from captioner import caches as cachelib
from captioner.training.prepare import prepare as prepare_caches
from conftest import make_cfg


def caches(data_dir: Path) -> dict:
    """Cache folder name -> the modification time of its completion file (a rebuilt one gets a new one)."""
    found = {}
    for kind, marker in [("features", "meta.json"), ("tokens", "words.json")]:
        for d in (data_dir / "cache" / kind).glob("*"):
            if (d / marker).is_file():
                found[f"{kind}/{d.name}"] = (d / marker).stat().st_mtime_ns
    return found


def prepare(data_dir, caplog):
    cfg = make_cfg(data_dir, data_dir / "run", "experiment=smoke", "encoder.num_workers=0", "data.image_size=64")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        prepare_caches(cfg.data, cfg.encoder, cfg.paths.cache_dir)
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("Extracting", "Tokenized"))]


def test_a_copied_data_folder_reuses_every_cache_and_edits_invalidate_what_depends_on_them(tmp_path, caplog):
    first = tmp_path / "disk1" / "data"
    built = prepare(first, caplog)
    assert len(built) == 3  # train and val features, one token cache
    before = caches(first)
    assert len(before) == 3
    moved = tmp_path / "scratch" / "elsewhere"
    shutil.copytree(first, moved)  # new path, new mtimes
    shutil.rmtree(first)
    assert prepare(moved, caplog) == [] and caches(moved) == before, "a copy must reuse every cache"

    root = moved / "shapes-smoke"
    ann = root / "annotations" / "captions_val2017.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["caption"] += " again"
    ann.write_text(json.dumps(data))
    rebuilt = prepare(moved, caplog)
    assert sorted(m.split()[0] for m in rebuilt) == ["Extracting", "Tokenized"]  # tokens and val features
    assert "/val2017 into" in next(m for m in rebuilt if m.startswith("Extracting"))
    after_caption = caches(moved)
    assert len(set(after_caption) - set(before)) == 2

    img = sorted((root / "train2017").iterdir())[0]
    Image.new("RGB", (90, 70), "white").save(img)  # another picture, another size
    rebuilt = prepare(moved, caplog)
    assert len(rebuilt) == 1 and rebuilt[0].startswith("Extracting") and "/train2017 into" in rebuilt[0]
    assert len(set(caches(moved)) - set(after_caption)) == 1  # train features only: tokens are kept


def test_file_hash_is_computed_once_per_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "captions.json"
    f.write_bytes(os.urandom(1 << 20))
    first = cachelib.file_fingerprint(f, tmp_path / "cache")
    assert list((tmp_path / "cache" / "hashes").iterdir())
    monkeypatch.setattr(cachelib, "_HASHES", {})  # a new process: only the record on disk is left
    monkeypatch.setattr(cachelib, "_digest", lambda p: pytest.fail("hashed again although unchanged"))
    assert cachelib.file_fingerprint(f, tmp_path / "cache") == first
    shutil.copy(f, tmp_path / "copy.json")
    monkeypatch.undo()
    assert cachelib.file_fingerprint(tmp_path / "copy.json", tmp_path / "cache") == first  # same bytes, same key
    time.sleep(0.01)
    f.write_bytes(f.read_bytes()[:-1] + b"x")
    assert cachelib.file_fingerprint(f, tmp_path / "cache") != first
