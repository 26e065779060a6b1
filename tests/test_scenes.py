import json
import random
from pathlib import Path

from captioner.coco import load_split
from captioner.scenes import HELD_OUT, captions_for, draw_scene, make_scenes


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


def test_data_scenes_config_generates_and_trains(cfg_factory):
    from captioner.run import train

    cfg = cfg_factory("data=scenes", "data.root=${paths.data_dir}/scenes-smoke",
                      "data.generate={train2017: 64, val2017: 16}", "epochs=1", "eval_every=0")
    assert train(cfg) > 1.0
    refs = json.loads((Path(cfg.data.root) / "annotations" / "captions_train2017.json").read_text())
    assert len(refs["annotations"]) == 5 * 64
