import json

import numpy as np
import pytest
import torch

from captioner.data.coco import load_split
from captioner.data.datamodule import CaptionBatches
from captioner.data.shapes import caption_for, make_shapes
from captioner.utils import CaptionerError
from captioner.data.vocab import END, PAD, START, Vocabulary, build_tokens, load_words


def test_shapes_dataset_is_deterministic_and_in_coco_layout(tmp_path):
    a = make_shapes(tmp_path / "a", {"train2017": 12, "val2017": 4})
    b = make_shapes(tmp_path / "b", {"train2017": 12, "val2017": 4})
    split = load_split(a, "train2017")
    assert len(split.image_ids) == 12 and all(len(c) == 1 for c in split.captions)
    for f in split.files:
        assert (a / "train2017" / f).read_bytes() == (b / "train2017" / f).read_bytes()
    assert split.captions == load_split(b, "train2017").captions
    vocab = {w for c in split.captions for w in c[0].split()}
    assert vocab <= {"a", "picture", "of", "one", "two", "three", "red", "green", "blue", "yellow", "circle", "circles", "square",
                     "squares", "triangle", "triangles"}
    assert caption_for(2, "red", "circle") == "a picture of two red circles"
    assert caption_for(1, "blue", "triangle") == "a picture of one blue triangle"
    mtime = (a / "annotations" / "captions_train2017.json").stat().st_mtime_ns
    make_shapes(a, {"train2017": 12, "val2017": 4})  # complete: reused, not rewritten
    assert (a / "annotations" / "captions_train2017.json").stat().st_mtime_ns == mtime


def batches(caption_idx, seed=0, per_image=1):
    # 4 images with 3, 1, 2 and 3 captions; caption c of image i is the single word id 10*i + c
    counts = np.array([3, 1, 2, 3])
    cap_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    words = np.array([10 * i + c for i, n in enumerate(counts) for c in range(n)])
    offsets = np.arange(len(words) + 1)
    feats = np.arange(4, dtype=np.float16)[:, None].repeat(2, 1)
    return CaptionBatches(feats, np.arange(4), words, offsets, cap_start, counts, caption_idx, seed,
                          per_image=per_image)


def test_fixed_caption_idx_picks_that_caption_every_epoch():
    ds = batches(caption_idx=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        targets = ds.__getitems__([0, 1, 2, 3])[2]
        assert targets[:, 0].tolist() == [1, 10, 21, 31]  # image 1 has one caption: index wraps around


def test_negative_caption_idx_draws_a_random_caption_per_image_per_epoch():
    ds = batches(caption_idx=-1)
    drawn = []
    for epoch in range(20):
        ds.set_epoch(epoch)
        drawn.append(ds.__getitems__([0, 1, 2, 3])[2][:, 0].tolist())
    ds.set_epoch(3)
    assert ds.__getitems__([0, 1, 2, 3])[2][:, 0].tolist() == drawn[3], "same epoch, same draw"
    assert {d[0] for d in drawn} == {0, 1, 2} and {d[1] for d in drawn} == {10}
    assert {d[3] for d in drawn} == {30, 31, 32}
    assert len(ds) == 4, "one sample per image per epoch"


def test_seq_per_img_three_gives_every_caption_of_an_image_once_per_epoch():
    ds = batches(caption_idx=-1, per_image=3)
    assert len(ds) == 12, "three samples per image"
    epochs = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        feats, _, targets, _ = ds.__getitems__(np.arange(12))
        assert feats[:, 0].tolist() == [0, 1, 2, 3] * 3, "sample i is image i % 4"
        words = targets[:, 0].view(3, 4).T.tolist()  # image -> its three samples' captions
        assert sorted(words[0]) == [0, 1, 2] and sorted(words[3]) == [30, 31, 32], "distinct: all three, once"
        assert words[1] == [10, 10, 10] and sorted(words[2]) in ([20, 20, 21], [20, 21, 21])  # fewer captions: wrap
        epochs.append(words)
    assert len({str(w) for w in epochs}) > 1, "a new order each epoch"
    fixed = batches(caption_idx=1, per_image=2)
    assert fixed.__getitems__(np.arange(8))[2][:, 0].tolist() == [1, 10, 21, 31, 2, 10, 20, 32]


def test_batches_are_padded_to_the_longest_caption_with_start_and_end():
    words = np.array([5, 6, 7, 8, 9])
    ds = CaptionBatches(np.zeros((2, 3), np.float16), np.arange(2), words, np.array([0, 3, 5]),
                        np.array([0, 1]), np.array([1, 1]))
    for on_device in (False, True):
        if on_device:
            ds.to_device("cpu")  # the resident-data path: the same batch from gathers of device tensors
        feats, inputs, targets, real = ds.__getitems__([0, 1])
        assert feats.dtype == torch.float32 and feats.shape == (2, 3)
        assert targets.tolist() == [[5, 6, 7, END], [8, 9, END, PAD]]
        assert inputs.tolist() == [[START, 5, 6, 7], [START, 8, 9, PAD]]
        assert real.tolist() == [0, 1, 2, 3, 4, 5, 6], "flat positions of the words and <end>, not of the pad"
        assert targets.dtype == inputs.dtype == torch.long


def test_vocabulary_keeps_most_frequent_training_words(tmp_path):
    root = make_shapes(tmp_path / "s", {"train2017": 30, "val2017": 6})
    splits = {"train": load_split(root, "train2017"), "val": load_split(root, "val2017")}
    folder = build_tokens(splits, tmp_path / "cache")
    meta = load_words(folder)
    assert meta["counts"] == sorted(meta["counts"], reverse=True)
    vocab = Vocabulary.from_words(meta["words"], meta["n_train_words"], 3)
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(vocab) == 7
    assert set(vocab.itos[4:]) == {"a", "picture", "of"}  # in every caption: the most frequent
    ids = vocab.encode(np.arange(len(meta["words"])))
    assert ids[:3].tolist() == [4, 5, 6] and set(ids[3:].tolist()) == {3}
    mtime = (folder / "words.json").stat().st_mtime_ns
    assert build_tokens(splits, tmp_path / "cache") == folder  # cached: not re-tokenized
    assert (folder / "words.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage, expected", [
    ("missing", "is missing"), ("json", "not valid JSON"), ("layout", "not a COCO captions file")])
def test_bad_datasets_stop_with_one_clear_sentence(tmp_path, damage, expected):
    root = make_shapes(tmp_path / "s", {"train2017": 3, "val2017": 2})
    ann = root / "annotations" / "captions_val2017.json"
    if damage == "missing":
        ann.unlink()
    elif damage == "json":
        ann.write_text('{"images": [')
    else:
        ann.write_text(json.dumps({"pictures": []}))
    with pytest.raises(CaptionerError, match=expected) as err:
        load_split(root, "val2017")
    assert str(ann) in str(err.value) and "\n" not in str(err.value)
