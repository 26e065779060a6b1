"""The caption readers on hostile files: runaway captions, duplicate and shared image ids, escaping file names,
null captions and malformed Karpathy entries (issue 25)."""
import json
import logging

import numpy as np
import pytest

from captioner.data.coco import load_karpathy_split, load_split, load_splits
from captioner.data.vocab import build_tokens, load_words
from captioner.training.checks import check_data
from captioner.utils import CaptionerError


def coco_layout(root, splits: dict):
    """COCO layout: split -> {image id: [captions]}, file names <id>.jpg (the readers do not open the images)."""
    (root / "annotations").mkdir(parents=True)
    for split, images in splits.items():
        (root / split).mkdir()
        data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
                "annotations": [{"id": 10 * i + k, "image_id": i, "caption": c}
                                for i, caps in images.items() for k, c in enumerate(caps)]}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


def karpathy(tmp_path, entries):
    (tmp_path / "images").mkdir(exist_ok=True)
    split_file = tmp_path / "dataset_flickr8k.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "flickr8k"}))
    return split_file, tmp_path / "images"


def entry(imgid, filename=None, split="train", raw="a dog runs on the grass"):
    return {"filename": filename or f"{imgid}.jpg", "imgid": imgid, "split": split,
            "sentences": [{"raw": raw, "tokens": raw.split() if isinstance(raw, str) else []}]}


def test_a_runaway_caption_is_cut_to_max_words_with_one_warning_and_its_own_cache(tmp_path, caplog):
    runaway = " ".join(f"w{k}" for k in range(5000))
    root = coco_layout(tmp_path / "coco", {"train2017": {1: ["a red circle", runaway], 2: ["a blue square ."]}})
    split = load_split(root, "train2017")
    with caplog.at_level(logging.WARNING, logger="captioner.data.vocab"):
        folder = build_tokens({"train": split}, tmp_path / "cache", max_words=20)
    assert [r.getMessage() for r in caplog.records] == [
        "Cut 1 train captions longer than data.max_words=20 words to their first 20 words."]
    assert np.diff(np.load(folder / "train.offsets.npy")).tolist() == [3, 20, 3]  # "." is not a word
    words = load_words(folder)
    assert "w19" in words["words"] and "w20" not in words["words"]  # the cut-off tail is not in the vocabulary
    assert build_tokens({"train": split}, tmp_path / "cache", max_words=50) != folder  # a new cap rebuilds


def test_max_words_is_a_data_key_above_every_real_caption_and_checked(cfg_factory):
    """The cap is above the longest caption of coco-mini (41 words) and Flickr8k (38); COCO's longest is ~50."""
    for data in ("coco", "karpathy_coco", "karpathy_flickr8k", "karpathy_flickr30k", "shapes", "scenes"):
        assert cfg_factory(f"data={data}").data.max_words == 100
    with pytest.raises(CaptionerError, match=r"^data.max_words=0 must be a positive integer.$"):
        check_data(cfg_factory("data.max_words=0"))


@pytest.mark.parametrize("kind", ["coco", "karpathy"])
def test_an_image_id_listed_twice_in_a_file_is_one_sentence_naming_it(tmp_path, kind):
    if kind == "coco":
        root = coco_layout(tmp_path / "coco", {"val2017": {493652: ["a cat"], 7: ["a dog"]}})
        named = root / "annotations" / "captions_val2017.json"
        data = json.loads(named.read_text())
        data["images"].append({"id": 493652, "file_name": "other.jpg"})
        named.write_text(json.dumps(data))
        read = lambda: load_split(root, "val2017")  # noqa: E731
    else:
        named, images = karpathy(tmp_path, [entry(493652), entry(7), entry(493652, "other.jpg", split="val")])
        read = lambda: load_karpathy_split(named, images, ["train"])  # noqa: E731
    with pytest.raises(CaptionerError, match="image id 493652 twice") as err:
        read()
    assert str(named) in str(err.value) and "other.jpg" in str(err.value) and "\n" not in str(err.value)


def test_an_image_in_two_split_roles_gets_one_warning_naming_them_and_the_count(tmp_path, caplog):
    root = coco_layout(tmp_path / "coco", {"train2017": {1: ["a cat"], 2: ["a dog"], 3: ["a cow"]},
                                           "val2017": {2: ["a dog"], 3: ["a cow"], 4: ["a hen"]}})
    with caplog.at_level(logging.WARNING, logger="captioner.data.coco"):
        splits = load_splits(root, {"train": "train2017", "val": "val2017"})
    assert splits["val"].image_ids == [2, 3, 4]  # kept: validating on training images can be meant
    assert [r.getMessage() for r in caplog.records] == [
        "Split roles share images (by id or file), so scores on them are not on unseen images: 2 images are in "
        "both train (train2017) and val (val2017)."]


def test_karpathy_entries_naming_files_outside_the_image_folder_are_skipped_and_counted(tmp_path, caplog):
    (tmp_path / "secret.jpg").write_bytes(b"outside data.root")
    split_file, images = karpathy(tmp_path, [entry(1), entry(2, str(tmp_path / "secret.jpg")),
                                             entry(3, "../secret.jpg"), {**entry(4), "filepath": ".."}])
    (images / "1.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="captioner.data.coco"):
        split = load_karpathy_split(split_file, images, ["train"])
    assert split.image_ids == [1] and split.files == ["1.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{split_file} (train): dropped 0 empty captions, 0 images without captions, 0 captions of unknown images, "
        f"3 images whose file name leaves {images} (absolute or '..')."]


def test_null_and_non_text_captions_are_dropped_as_empty_not_trained_as_none(tmp_path, caplog):
    root = coco_layout(tmp_path / "coco", {"train2017": {1: ["a cat", None, 5], 2: [None]}})
    split_file, images = karpathy(tmp_path, [entry(1), entry(2, raw=None), entry(3, raw=5)])
    with caplog.at_level(logging.WARNING, logger="captioner.data.coco"):
        coco = load_split(root, "train2017")
        flickr = load_karpathy_split(split_file, images, ["train"], find_images=False)
    assert coco.image_ids == [1] and coco.captions == [["a cat"]]
    assert flickr.image_ids == [1] and flickr.captions == [["a dog runs on the grass"]]
    messages = [r.getMessage() for r in caplog.records]
    assert "dropped 3 empty captions, 1 images without captions" in messages[0]
    assert "dropped 2 empty captions, 2 images without captions" in messages[1]


@pytest.mark.parametrize("damage, key", [({"sentences": 5}, "sentences"), ({"sentences": [3]}, "sentences"),
                                         ({"filename": None}, "filename"), ({"imgid": "seven"}, "imgid")])
def test_a_malformed_karpathy_entry_names_the_field_in_one_plain_sentence(tmp_path, damage, key):
    split_file, images = karpathy(tmp_path, [entry(1), {**entry(7), **damage}])
    with pytest.raises(CaptionerError) as err:
        load_karpathy_split(split_file, images, ["train"])
    message = str(err.value)
    assert message.startswith(f"{split_file} has an entry without a valid '{key}' field (")
    assert "expected 'filename', 'imgid', 'split' and 'sentences'" in message and "\n" not in message
