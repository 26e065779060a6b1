"""The built-in default dataset: synthetic images of coloured shapes, written in the COCO layout.

Each image holds 1-3 shapes of one colour and one kind, at random sizes and places; its caption is a
deterministic function of that content ("a picture of two red circles"). A frozen ImageNet CNN sees count,
colour and shape well enough for the captions on held-out images to be right, so it is a real, learnable
task that runs in minutes on a laptop CPU and needs no download.
"""
import json
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from captioner.utils import atomic_write_text
from captioner.caches import cached_dir

log = logging.getLogger(__name__)

COUNTS = ["one", "two", "three"]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def caption_for(count: int, colour: str, shape: str) -> str:
    # a fixed lead-in makes captions long enough for 4-gram metrics (BLEU-4) to mean something
    return f"a picture of {COUNTS[count - 1]} {colour} {shape if count == 1 else SHAPES[shape]}"


def _draw(rng: random.Random, size: int, count: int, colour: str, shape: str) -> Image.Image:
    background = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    cell = size // 2  # four quadrants; each shape gets its own, so shapes never overlap
    for q in rng.sample(range(4), count):
        r = rng.randint(cell // 4, cell // 2 - 2)
        cx = (q % 2) * cell + rng.randint(r + 1, cell - r - 1)
        cy = (q // 2) * cell + rng.randint(r + 1, cell - r - 1)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _read_marker(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_dataset(root, splits: dict, spec: dict, name: str, example, rng_key: str) -> Path:
    """Write a generated dataset in the COCO layout under `root`, or reuse it when complete with the same `spec`.

    `example(rng, split)` draws one image and returns (PIL image, file suffix, its captions); each split has its
    own seeded generator (`rng_key` formatted with the split's position). The tree is built under a temporary
    name and renamed at the end, under a lock: an interrupted run never leaves a dataset that looks complete,
    and runs started together generate it once.
    """
    root = Path(root)
    complete = lambda folder: _read_marker(folder / "annotations" / ".complete.json") == spec
    if complete(root):
        return root

    def build(tmp):
        if root.exists():
            log.info("Rebuilding the %s dataset at %s (settings changed or incomplete).", name, root)
        (tmp / "annotations").mkdir()
        image_id, ann_id = 1, 1
        for split_i, (split, n_images) in enumerate(splits.items()):
            rng = random.Random(rng_key.format(split_i))
            (tmp / split).mkdir()
            images, annotations = [], []
            for _ in tqdm(range(n_images), desc=f"{name} {split}", unit="img", leave=False):
                img, suffix, captions = example(rng, split)
                file_name = f"{image_id:012d}{suffix}"
                img.save(tmp / split / file_name, **({"quality": 92} if suffix == ".jpg" else {}))
                images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
                for caption in captions:
                    annotations.append({"id": ann_id, "image_id": image_id, "caption": caption})
                    ann_id += 1
                image_id += 1
            coco = {"info": {"description": f"captioner synthetic {name}"}, "licenses": [],
                    "images": images, "annotations": annotations}
            (tmp / "annotations" / f"captions_{split}.json").write_text(json.dumps(coco))
        atomic_write_text(tmp / "annotations" / ".complete.json", json.dumps(spec))

    # data.root may hold a user's own dataset: cached_dir replaces only a folder captioner made
    cached_dir(root, build, marker="annotations/.complete.json", is_complete=complete, checksums=False,
               hint=f"point data.root at an empty or new folder for the {name} dataset, or use data=coco to train "
                    f"on the dataset it holds")
    log.info("Wrote the %s dataset to %s (%s).", name, root, ", ".join(f"{k}: {v}" for k, v in splits.items()))
    return root


def make_shapes(root, splits: dict, image_px: int = 128, seed: int = 0) -> Path:
    """Write the dataset under `root` (idempotent: an existing complete dataset is reused). `splits` maps a
    split name ("train2017") to its number of images."""
    combos = [(n, c, s) for n in (1, 2, 3) for c in COLOURS for s in SHAPES]

    def example(rng, split):
        count, colour, shape = combos[rng.randrange(len(combos))]
        return _draw(rng, image_px, count, colour, shape), ".png", [caption_for(count, colour, shape)]

    spec = {"splits": dict(splits), "image_px": image_px, "seed": seed, "version": 2}
    return write_dataset(root, splits, spec, "shapes", example, f"{seed}-{{}}")
