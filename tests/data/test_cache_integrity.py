"""Cache reliability: captioner replaces only folders it made, rebuilds a damaged cache once (one warning), keeps
no cache of a dataset rebuilt while it was read, and stops on a full disk with one sentence."""
import errno
import logging
import shutil
import subprocess
from collections import namedtuple

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from captioner import caches
from captioner.data.shapes import make_shapes
from captioner.features.extraction import extract_split
from captioner.training.prepare import read_splits
from captioner.utils import CaptionerError
from captioner.caches import cached_dir
from conftest import make_cfg, run_module

LITE0 = OmegaConf.create({"name": "efficientnet_lite0", "weights": None, "image_size": 32, "mean": [0.5] * 3,
                          "std": [0.5] * 3})


def users_folder(path):
    """A folder of the user's own: a photo and notes, no marker of captioner's."""
    path.mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(path / "photo.jpg")
    (path / "notes.txt").write_text("notes")
    return sorted(p.name for p in path.iterdir())


@pytest.mark.slow
def test_a_folder_captioner_did_not_make_is_left_intact_with_one_sentence(tmp_path):
    before = users_folder(tmp_path / "coco")
    res = run_module("captioner.run", "experiment=smoke", f"data.root={tmp_path / 'coco'}", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == before
    last = res.stderr.strip().splitlines()[-1]
    assert str(tmp_path / "coco") in last and "data=coco" in last and "empty" in last
    assert not (tmp_path / "coco.tmp").exists()


def test_a_leftover_temporary_folder_is_removed_only_when_captioner_made_it(tmp_path):
    before = users_folder(tmp_path / "shapes.tmp")  # the name cached_dir would build in
    with pytest.raises(CaptionerError, match="was not made by captioner"):
        make_shapes(tmp_path / "shapes", {"train2017": 2})
    assert sorted(p.name for p in (tmp_path / "shapes.tmp").iterdir()) == before
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: the dataset goes there
    make_shapes(tmp_path / "empty", {"train2017": 2})
    make_shapes(tmp_path / "empty", {"train2017": 3})  # its own dataset, other settings: replaced
    assert len(list((tmp_path / "empty" / "train2017").iterdir())) == 3


class Rebuilding(torch.nn.Module):
    """An encoder during whose first batch another run rebuilds the dataset with other settings."""

    def __init__(self, root=None):
        super().__init__()
        self.root, self.calls = root, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1 and self.root:
            make_shapes(self.root, {"train2017": 5, "val2017": 4})
        return x.mean((2, 3))


def test_features_of_a_dataset_rebuilt_while_they_were_extracted_are_not_kept(tmp_path):
    data = OmegaConf.create({"name": "shapes", "root": str(tmp_path / "shapes"), "splits": {"val": "val2017"},
                             "generate": {"train2017": 4, "val2017": 4}})
    splits, unchanged = read_splits(data)
    with pytest.raises(CaptionerError, match="rebuilt by another run") as err:
        extract_split(splits["val"], LITE0, tmp_path / "cache", batch_size=2, num_workers=0,
                      encoder=Rebuilding(data.root), before_publish=unchanged)
    assert "\n" not in str(err.value)
    assert not [p for p in (tmp_path / "cache" / "features").iterdir() if p.suffix != ".lock"]
    splits, unchanged = read_splits(data)  # a run after it: the same settings rebuild it and it extracts
    assert extract_split(splits["val"], LITE0, tmp_path / "cache", batch_size=2, num_workers=0,
                         encoder=Rebuilding(), before_publish=unchanged).is_dir()


@pytest.fixture
def read_only(tmp_path):
    """Makes a folder read-only for real (a read-only bind mount: chmod does not stop root) until the test ends."""
    mounted = []

    def make(folder):
        for cmd in (["mount", "--bind", folder, folder], ["mount", "-o", "remount,bind,ro", folder]):
            if subprocess.run(cmd, capture_output=True).returncode:
                pytest.skip("needs a read-only bind mount (root with CAP_SYS_ADMIN)")
            mounted.append(folder) if cmd[1] == "--bind" else None
    yield make
    for folder in mounted:
        subprocess.run(["umount", folder])


def test_a_read_only_cache_is_read_and_a_missing_cache_in_it_is_one_sentence(tmp_path, read_only, monkeypatch):
    splits, _ = read_splits(OmegaConf.create({"name": "shapes", "root": str(tmp_path / "shapes"), "splits": {
        "train": "train2017", "val": "val2017"}, "generate": {"train2017": 3, "val2017": 2}}))
    folder = extract_split(splits["val"], LITE0, tmp_path / "cache", num_workers=0, encoder=Rebuilding())
    shutil.rmtree(tmp_path / "cache" / "hashes")  # as for a copied data folder: its files' hashes are not recorded
    monkeypatch.setattr(caches, "_HASHES", {})  # a new process: nothing hashed yet
    read_only(tmp_path / "cache")
    assert extract_split(splits["val"], LITE0, tmp_path / "cache", num_workers=0, encoder=Rebuilding()) == folder
    with pytest.raises(CaptionerError, match="Cannot write .*choose a writable folder") as err:
        extract_split(splits["train"], LITE0, tmp_path / "cache", num_workers=0, encoder=Rebuilding())
    assert "\n" not in str(err.value)


Usage = namedtuple("Usage", "total used free")


def test_extraction_checks_free_space_first(tmp_path, monkeypatch):
    splits, _ = read_splits(OmegaConf.create({"name": "shapes", "root": str(tmp_path / "shapes"), "splits": {
        "val": "val2017"}, "generate": {"val2017": 3}}))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 ** 9, 10 ** 9 - 1000, 1000))  # the OS's, not ours
    with pytest.raises(CaptionerError, match=r"needs 4,114 bytes .* only 1,000 are free") as err:
        extract_split(splits["val"], LITE0, tmp_path / "cache", num_workers=0, encoder=Rebuilding())
    assert "\n" not in str(err.value)  # 3 images x 3 channels x 2 bytes + the header
    assert not [p for p in (tmp_path / "cache" / "features").iterdir() if p.suffix != ".lock"]


def test_a_full_disk_while_building_a_cache_is_one_sentence_and_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half.npy").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CaptionerError, match="the disk is full") as err:
        cached_dir(tmp_path / "cache" / "c", build)
    assert str(tmp_path / "cache" / "c") in str(err.value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["c.lock"]


def damage_caches(cache, files: dict):
    """Zero-fill ("zero") or cut in half ("cut") cache files, as a disk or a crash would."""
    for pattern, how in files.items():
        for f in cache.glob(pattern):
            data = f.read_bytes()
            f.write_bytes(bytes(len(data)) if how == "zero" else data[:len(data) // 2])


@pytest.mark.slow
def test_damaged_caches_are_rebuilt_once_with_a_warning_and_train_as_before(tmp_path, caplog):
    from captioner.run import train

    cfg = lambda run: make_cfg(tmp_path / "data", tmp_path / run, "experiment=smoke", "epochs=1",
                               "data.image_size=32", "encoder.num_workers=0", "trainer.enable_progress_bar=false",
                               "trainer.enable_model_summary=false")
    clean = train(cfg("clean"))
    cache = tmp_path / "data" / "cache"
    rounds = [{"features/train2017-*/features.npy": "zero", "features/val2017-*/features.npy": "cut",
               "tokens/*/words.json": "cut"}, {"tokens/*/train.tokens.npy": "zero"}]
    for i, files in enumerate(rounds):
        damage_caches(cache, files)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert train(cfg(f"again{i}")) == pytest.approx(clean, rel=1e-5)
        warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(warned) == len(files), warned
        assert all(np.load(f).size for f in cache.glob("features/*/features.npy"))


@pytest.mark.parametrize("how", ["zero", "cut"])
@pytest.mark.parametrize("name", ["data.npy", caches.OWNER])
def test_a_damaged_file_or_checksum_record_is_rebuilt_once_with_one_warning(tmp_path, caplog, name, how):
    builds = []

    def build(tmp):
        builds.append(tmp)
        np.save(tmp / "data.npy", np.arange(100))
        (tmp / ".complete").write_text("done")

    out = cached_dir(tmp_path / "c", build)
    damage_caches(out, {name: how})
    with caplog.at_level(logging.WARNING):
        assert cached_dir(tmp_path / "c", build) == out and cached_dir(tmp_path / "c", build) == out
    assert len(builds) == 2 and np.load(out / "data.npy").tolist() == list(range(100))
    (warning,) = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(out) in warning and name in warning
