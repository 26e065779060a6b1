"""Datasets at scale: Karpathy split files, the bad-input policy (on broken copies of real data), the extract CLI."""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from captioner.cli import compose_config
from captioner.data.coco import load_karpathy_split, load_split, load_splits
from captioner.data.datamodule import CaptionDataModule
from captioner.training.prepare import prepare
from captioner.utils import CaptionerError
from captioner.data.vocab import build_tokens, load_words
from conftest import require_coco_mini, run_module

LITE0 = {"name": "efficientnet_lite0", "weights": None, "image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
         "batch_size": 8, "num_workers": 0}


def coco_copy(root: Path, n: dict) -> Path:
    """The first n[split] images of coco-mini with their captions, in the COCO layout."""
    mini = require_coco_mini()
    (root / "annotations").mkdir(parents=True)
    for split, count in n.items():
        data = json.loads((mini / "annotations" / f"captions_{split}.json").read_text())
        images = data["images"][:count]
        ids = {img["id"] for img in images}
        (root / split).mkdir()
        for img in images:
            shutil.copy(mini / split / img["file_name"], root / split / img["file_name"])
        anns = [a for a in data["annotations"] if a["image_id"] in ids]
        ann = {"images": images, "annotations": anns}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(ann))
    return root


def add_image(root, split, image_id, file_name, captions, source=None):
    """Register one more image (with captions) in a split's annotation file; `source` is written as its file."""
    ann = root / "annotations" / f"captions_{split}.json"
    data = json.loads(ann.read_text())
    data["images"].append({"id": image_id, "file_name": file_name})
    data["annotations"] += [{"id": 10**6 + image_id * 10 + k, "image_id": image_id, "caption": c}
                            for k, c in enumerate(captions)]
    ann.write_text(json.dumps(data, ensure_ascii=False))
    if source is not None:
        source(root / split / file_name)


def break_and_oddify(root: Path) -> dict:
    """Add to a COCO-layout copy: the four kinds of unreadable file, every odd image mode, an image without
    captions, empty/whitespace captions and non-ASCII text. Returns what the policy should report."""
    split = "train2017"
    photo = Image.open(next((root / split).glob("*.jpg"))).convert("RGB")
    whole = next((root / split).glob("*.jpg")).read_bytes()
    bad = {"missing.jpg": None, "empty.jpg": lambda p: p.write_bytes(b""),
           "truncated.jpg": lambda p: p.write_bytes(whole[: len(whole) // 3]),
           "not-an-image.jpg": lambda p: p.write_text("<html>404</html>")}
    odd = {"cmyk.jpg": lambda p: photo.convert("CMYK").save(p), "gray.png": lambda p: photo.convert("L").save(p),
           "palette.png": lambda p: photo.convert("P").save(p), "rgba.png": lambda p: photo.convert("RGBA").save(p)}
    for k, (name, make) in enumerate({**bad, **odd}.items()):
        add_image(root, split, 900 + k, name, [f"a picture stored as {name}"], make)
    add_image(root, split, 950, "no-captions.jpg", [], lambda p: photo.save(p))
    add_image(root, split, 951, "blank-captions.jpg", ["", "   ", "Un café près de la fenêtre, très joli."],
              lambda p: photo.save(p))
    return {"unreadable": [str(root / split / name) for name in bad], "empty_captions": 2, "no_captions": 1}


def test_captions_policy_empty_dropped_uncaptioned_left_out_non_ascii_kept(tmp_path, caplog):
    root = coco_copy(tmp_path / "coco", {"train2017": 3})
    photo = lambda p: shutil.copy(next((root / "train2017").glob("*.jpg")), p)  # noqa: E731
    add_image(root, "train2017", 950, "no-captions.jpg", [], photo)
    captions = ["", " \t", "...", "?!", "Ein Hund läuft über die Straße.", "狗在跑"]  # punctuation alone is empty too
    add_image(root, "train2017", 951, "x.jpg", captions, photo)
    with caplog.at_level(logging.WARNING, logger="captioner.data.coco"):
        split = load_split(root, "train2017")
    assert 950 not in split.image_ids and 951 in split.image_ids and len(split.image_ids) == 4
    assert split.captions[split.image_ids.index(951)] == ["Ein Hund läuft über die Straße.", "狗在跑"]
    assert any("dropped 4 empty captions, 1 images without captions" in r.getMessage() for r in caplog.records)
    words = load_words(build_tokens({"train": split}, tmp_path / "cache"))["words"]
    assert {"über", "straße", "狗在跑"} <= set(words)  # no spaces: one English token


@pytest.mark.parametrize("damage, expected", [
    ("no-root", "does not exist"), ("no-annotations", "is missing"), ("no-images-folder", "Image folder"),
    ("json", "not valid JSON"), ("not-utf8", "not UTF-8"), ("layout", "not a COCO captions file"),
    ("fields", "without a valid"), ("no-captions", "no image with a usable caption")])
def test_broken_coco_layout_stops_with_one_sentence_naming_the_path(tmp_path, damage, expected):
    root = coco_copy(tmp_path / "coco", {"val2017": 2})
    ann = root / "annotations" / "captions_val2017.json"
    named = ann
    if damage == "no-root":
        named = root = tmp_path / "nowhere"
    elif damage == "no-annotations":
        ann.unlink()
    elif damage == "no-images-folder":
        shutil.rmtree(root / "val2017")
        named = root / "val2017"
    elif damage == "json":
        ann.write_text(ann.read_text()[:-20])
    elif damage == "not-utf8":
        ann.write_bytes(b'{"images": [], "annotations": [{"caption": "caf\xe9"}]}')
    elif damage == "layout":
        ann.write_text(json.dumps([{"file_name": "a.jpg"}]))
    elif damage == "fields":
        ann.write_text(json.dumps({"images": [{"file": "a.jpg"}], "annotations": []}))
    else:
        data = json.loads(ann.read_text())
        ann.write_text(json.dumps({"images": data["images"], "annotations": [{"image_id": 1, "caption": " "}]}))
    with pytest.raises(CaptionerError, match=expected) as err:
        load_split(root, "val2017")
    assert str(named) in str(err.value) and "\n" not in str(err.value)


def karpathy_file(tmp_path) -> tuple:
    """A tiny dataset_coco.json over copied coco-mini photos: COCO 2014 folders, every Karpathy split."""
    mini = coco_copy(tmp_path / "mini", {"val2017": 6})
    root = tmp_path / "coco2014"
    photos = sorted((mini / "val2017").glob("*.jpg"))
    entries = []
    for k, (split, folder) in enumerate([("train", "train2014"), ("train", "train2014"), ("restval", "val2014"),
                                         ("val", "val2014"), ("val", "val2014"), ("test", "val2014")]):
        name = f"COCO_{folder}_{k:012d}.jpg"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(photos[k], root / folder / name)
        sentences = [{"raw": f"A photo number {k} of the {split} split.", "tokens": ["a", "photo"]},
                     {"raw": "Une deuxième légende.", "tokens": []}]
        entries.append({"filepath": folder, "filename": name, "imgid": k, "split": split, "sentences": sentences,
                        "cocoid": 5000 - k})
    entries[0]["sentences"].append({"raw": "  ", "tokens": []})  # an empty one: dropped
    split_file = root / "caption_datasets" / "dataset_coco.json"  # where captioner.download puts it
    split_file.parent.mkdir()
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}, ensure_ascii=False))
    return split_file, root


def test_karpathy_split_file_gives_train_restval_val_test(tmp_path):
    split_file, root = karpathy_file(tmp_path)
    train = load_karpathy_split(split_file, root, ["train", "restval"])
    assert train.name == "train+restval" and train.image_ids == [4998, 4999, 5000]  # COCO ids, sorted
    assert train.files == ["val2014/COCO_val2014_000000000002.jpg", "train2014/COCO_train2014_000000000001.jpg",
                           "train2014/COCO_train2014_000000000000.jpg"]
    assert train.captions[2] == ["A photo number 0 of the train split.", "Une deuxième légende."]
    assert train.image_dir == root and train.annotation_file == split_file
    assert all((root / f).is_file() for f in train.files)
    assert load_karpathy_split(split_file, root, ["val"]).image_ids == [4996, 4997]
    assert load_karpathy_split(split_file, root, "test").files == ["val2014/COCO_val2014_000000000005.jpg"]


def test_karpathy_images_come_from_the_2017_layout_by_id_or_the_2014_layout(tmp_path, caplog):
    split_file, root = karpathy_file(tmp_path)
    for k, old, new in [(0, "train2014", "train2017"), (2, "val2014", "val2017"), (5, "val2014", "train2017")]:
        (root / new).mkdir(exist_ok=True)  # moved to its 2017 name: the COCO id
        shutil.move(root / old / f"COCO_{old}_{k:012d}.jpg", root / new / f"{5000 - k:012d}.jpg")
    (root / "val2014" / "COCO_val2014_000000000004.jpg").unlink()  # in neither layout
    train = load_karpathy_split(split_file, root, ["train", "restval"])
    assert train.files == ["val2017/000000004998.jpg", "train2014/COCO_train2014_000000000001.jpg",
                           "train2017/000000005000.jpg"]
    assert load_karpathy_split(split_file, root, "test").files == ["train2017/000000004995.jpg"]
    assert all((root / f).is_file() for f in train.files)
    assert not [r for r in caplog.records if "neither" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        val = load_karpathy_split(split_file, root, ["val"])
    assert val.image_ids == [4996, 4997] and val.files[0] == "val2014/COCO_val2014_000000000004.jpg"
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"1 of 2 images of split val listed in {split_file} are in neither the 2014 layout")
    assert "COCO_val2014_000000000004.jpg" in message and "\n" not in message
    assert load_karpathy_split(split_file, root, ["val"], find_images=False).files[0] == val.files[0]


def test_karpathy_flickr_entries_have_no_filepath_or_cocoid(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "1000268201_693b08cb0e.jpg")
    entry = {"filename": "1000268201_693b08cb0e.jpg", "imgid": 7, "split": "train",
             "sentences": [{"tokens": ["a", "child", "in", "pink"], "raw": "A child in a pink dress ."}]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [entry], "dataset": "flickr8k"}))
    split = load_karpathy_split(tmp_path / "dataset_flickr8k.json", tmp_path / "images", ["train"])
    assert split.image_ids == [7] and split.files == ["1000268201_693b08cb0e.jpg"]
    assert split.captions == [["A child in a pink dress ."]]


@pytest.mark.parametrize("damage, expected", [
    ("missing", "is missing"), ("json", "not valid JSON"), ("layout", "not a Karpathy split file"),
    ("fields", "without a valid"), ("split", "no image in split train\\+restval; its splits are")])
def test_broken_karpathy_file_stops_with_one_sentence_naming_it(tmp_path, damage, expected):
    split_file, root = karpathy_file(tmp_path)
    if damage == "missing":
        split_file.unlink()
    elif damage == "json":
        split_file.write_text("{\"images\": [")
    elif damage == "layout":
        split_file.write_text(json.dumps({"annotations": []}))
    elif damage == "fields":
        split_file.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train"}]}))
    else:
        data = json.loads(split_file.read_text())
        data["images"] = [img for img in data["images"] if img["split"] not in ("train", "restval")]
        split_file.write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=expected) as err:
        load_karpathy_split(split_file, root, ["train", "restval"])
    assert str(split_file) in str(err.value) and "\n" not in str(err.value)


def test_karpathy_config_trains_on_train_plus_restval(tmp_path):
    split_file, root = karpathy_file(tmp_path)
    cfg = compose_config("config", ["data=karpathy_coco", f"data.root={root}", "paths.run_dir=."])
    assert Path(cfg.data.split_file) == split_file
    assert {r: s.image_ids for r, s in load_splits(root, cfg.data.splits, cfg.data.split_file).items()} == \
        {"train": [4998, 4999, 5000], "val": [4996, 4997]}
    prepared = prepare(cfg.data, OmegaConf.create(LITE0), tmp_path / "cache")
    vocab = prepared.vocabulary(100)
    dm = CaptionDataModule(prepared.datasets(vocab), batch_size=2)
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 2
    assert {"photo", "légende", "restval"} <= set(vocab.itos)
    feats, _, targets, _ = next(iter(dm.train_dataloader()))
    assert feats.shape == (2, 1280) and targets.shape[0] == 2


def test_extract_in_process_lists_each_split_and_its_cache(data_dir, capsys):
    """captioner.extract's main (fast tier; the CLI as a subprocess is the slow test below)."""
    from captioner import extract

    extract.main(["experiment=smoke", f"paths.data_dir={data_dir}", "encoder.num_workers=0"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["train", "val"]
    for line in lines:
        folder = Path(line.split(" -> ")[1])
        assert (folder / "meta.json").is_file() and "0 unreadable" in line


@pytest.mark.slow
def test_training_on_a_broken_copy_follows_the_policy(cfg_factory, tmp_path, caplog):
    from captioner.run import train

    root = coco_copy(tmp_path / "coco", {"train2017": 10, "val2017": 5})
    expect = break_and_oddify(root)
    (root / "val2017" / sorted(p.name for p in (root / "val2017").iterdir())[0]).write_bytes(b"")
    cfg = cfg_factory("data=coco", f"data.root={root}", "data.generate=null", "iterations=3", "batch_size=8",
                      "data.image_size=96")
    with caplog.at_level(logging.WARNING):
        ppl = train(cfg)
    assert np.isfinite(ppl)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Skipping unreadable image" in m for m in messages) == 5  # 4 in train, 1 in val: one line each
    assert any("4 of 19 images of train2017 could not be read" in m for m in messages)
    assert any("dropped 2 empty captions, 1 images without captions" in m for m in messages)
    cache = Path(cfg.paths.cache_dir) / "features"
    train_dir = next(d for d in cache.glob("train2017-*") if d.is_dir() and json.loads(
        (d / "meta.json").read_text())["images"] == str(root / "train2017"))
    listed = [line.split("\t")[0] for line in (train_dir / "skipped.txt").read_text().splitlines()]
    assert sorted(listed) == sorted(expect["unreadable"])
    assert json.loads((train_dir / "meta.json").read_text())["n_images"] == 10 + 4 + 1  # good + odd modes + blanks
    assert (Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_extract_command_prints_each_split_folder_and_reuses_it(tmp_path, capsys):
    from captioner.extract import main

    root = coco_copy(tmp_path / "coco", {"train2017": 3, "val2017": 2})
    args = ["data=coco", f"data.root={root}", f"paths.data_dir={tmp_path / 'data'}", "encoder.num_workers=1",
            "data.image_size=64"]
    done = run_module("captioner.extract", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ->")[0] for line in lines] == ["train (train2017): 3 images, 0 unreadable",
                                                         "val (val2017): 2 images, 0 unreadable"]
    folders = [Path(line.split("-> ")[1]) for line in lines]
    assert all((f / "features.npy").is_file() and (f / "meta.json").is_file() for f in folders)
    assert "Extracting efficientnet_lite0 features" in done.stderr
    main(args)  # again: served from the cache
    assert capsys.readouterr().out.strip().splitlines() == lines
    shutil.rmtree(root / "annotations")
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert str(exit_.value).startswith("error: Annotation file") and str(root / "annotations") in str(exit_.value)
