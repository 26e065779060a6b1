import json
import math
import random
from pathlib import Path

import numpy as np

from captioner.data.coco import load_split
from captioner.data.scenes import (COLOURS, HELD_OUT, NOUNS, RELATIONS, _relation, captions_for, draw_scene,
                              make_scenes)


def test_scenes_are_written_in_the_coco_layout_with_five_different_captions(tmp_path):
    root = make_scenes(tmp_path / "scenes", {"train2017": 60, "val2017": 40}, image_px=96)
    split = load_split(root, "val2017")  # the existing COCO reader serves it unchanged
    assert len(split.image_ids) == 40 and all(len(caps) == 5 for caps in split.captions)
    assert all(len(set(caps)) == 5 for caps in split.captions), "the five references must differ"
    assert (root / "val2017" / split.files[0]).stat().st_size > 0
    words = {w for caps in split.captions for c in caps for w in c.split()}
    assert {"left", "background"} & words and len(words) > 30  # relations, backgrounds, synonyms
    # reused when complete: same marker, no rebuild
    marker = (root / "annotations" / ".complete.json").stat().st_mtime_ns
    make_scenes(tmp_path / "scenes", {"train2017": 60, "val2017": 40}, image_px=96)
    assert (root / "annotations" / ".complete.json").stat().st_mtime_ns == marker


def test_held_out_pairs_never_appear_in_training_scenes():
    rng = random.Random(0)
    seen_train, seen_val = set(), set()
    for _ in range(400):
        _, objects, _ = draw_scene(rng, 64, held_out_ok=False)
        seen_train |= {(o["colour"], o["shape"]) for o in objects}
        _, objects, _ = draw_scene(rng, 64, held_out_ok=True)
        seen_val |= {(o["colour"], o["shape"]) for o in objects}
        assert 2 <= len(objects) <= 4
    assert not seen_train & HELD_OUT
    assert HELD_OUT <= seen_val


def test_captions_name_what_is_drawn():
    rng = random.Random(1)
    for _ in range(50):
        _, objects, background = draw_scene(rng, 64, held_out_ok=True)
        caps = captions_for(rng, objects, background)
        colours = {o["colour"] for o in objects}
        for c in caps:
            named = {w for w in c.split() if w in {"red", "green", "blue", "yellow", "purple", "orange"}}
            assert named <= colours, (c, objects)
        for c in caps:
            assert not (set(c.split()) & {"white", "grey", "black", "beige"}) - {background}, (c, background)
        shapes = {o["shape"] for o in objects}
        for c in caps:  # every shape noun (or its synonym, or plural) is one of the drawn shapes
            named = {shape for w in c.replace(",", "").split() for shape, nouns in NOUNS.items()
                     if w in nouns or w in {n + ("es" if n.endswith("x") else "s") for n in nouns}}
            assert named <= shapes, (c, objects)
        assert any({w for w in c.split()} & {n for o in objects for n in NOUNS[o["shape"]]} for c in caps)


def test_each_object_is_drawn_in_its_cell_in_its_colour():
    rng = random.Random(2)
    for _ in range(30):
        image, objects, _ = draw_scene(rng, 96, held_out_ok=True)
        pixels = np.asarray(image)
        for o in objects:
            x, y = o["cell"]
            cell = pixels[y * 32:(y + 1) * 32, x * 32:(x + 1) * 32].reshape(-1, 3)
            assert (cell == COLOURS[o["colour"]]).all(-1).sum() > 20, o  # its fill, in its own cell


def test_relations_follow_the_grid():
    """Cells are (column, row), rows counted from the top: what is said to be left of, above, ... is so."""
    at = lambda column, row: {"cell": (column, row)}  # noqa: E731
    assert _relation(at(0, 1), at(2, 1)) == "left" and _relation(at(2, 1), at(0, 1)) == "right"
    assert _relation(at(1, 0), at(1, 2)) == "above" and _relation(at(1, 2), at(1, 0)) == "below"
    assert _relation(at(0, 0), at(2, 2)) == "near"
    red, blue = {"colour": "red", "shape": "circle", "size": "big", "cell": (0, 1)}, \
        {"colour": "blue", "shape": "square", "size": "small", "cell": (2, 1)}
    rng, checked = random.Random(3), 0
    for _ in range(40):  # whichever object a caption names first, the relation says where it is from the other
        for c in captions_for(rng, [red, blue], "white"):
            for side, first, second in (("left", "red", "blue"), ("right", "blue", "red")):
                phrase = next((f" {r} " for r in RELATIONS[side] if f" {r} " in c), None)
                if phrase:
                    before, after = c.split(phrase, 1)
                    assert first in before and second in after, c
                    checked += 1
    assert checked > 20


def test_data_scenes_config_generates_and_trains(cfg_factory):
    from captioner.run import train

    cfg = cfg_factory("data=scenes", "data.root=${paths.data_dir}/scenes-smoke",
                      "data.generate={train2017: 64, val2017: 16}", "epochs=1", "eval_every=0")
    assert math.isfinite(train(cfg))
    refs = json.loads((Path(cfg.data.root) / "annotations" / "captions_train2017.json").read_text())
    assert len(refs["annotations"]) == 5 * 64
