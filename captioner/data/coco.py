"""Reading caption data: the official MS-COCO layout (root/annotations/captions_<split>.json + root/<split>/), or
a Karpathy split file (dataset_{coco,flickr8k,flickr30k}.json: the train/restval/val/test splits of the literature).
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from captioner.utils import CaptionerError

log = logging.getLogger(__name__)


@dataclass
class CaptionSplit:
    name: str
    image_dir: Path
    annotation_file: Path
    image_ids: list  # images that have at least one usable caption, sorted by id
    files: list  # file name per image, same order
    captions: list  # list of caption strings per image, same order


def has_words(caption: str) -> bool:
    """Whether a caption has a word to learn from: "" and "..." do not (they would teach an empty caption)."""
    return any(ch.isalnum() for ch in caption)


def annotation_path(root, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}.json"


def _read_json(path: Path, expected: str):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             f"expected {expected}.") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{path} is not UTF-8 text; expected {expected}.") from None


def _split(name, image_dir, ann_file, files: dict, captions: dict, empty: int) -> CaptionSplit:
    """Keep the images that have a usable caption, sorted by id; say what was dropped."""
    unknown = set(captions) - set(files)
    ids = sorted(i for i in files if captions.get(i))
    no_caption = len(files) - len(ids)
    if empty or no_caption or unknown:
        log.warning("%s (%s): dropped %d empty captions, %d images without captions, %d captions of unknown images.",
                    ann_file, name, empty, no_caption, sum(len(captions[i]) for i in unknown))
    if not ids:
        raise CaptionerError(f"{ann_file} has no image with a usable caption in split '{name}'.")
    return CaptionSplit(name, image_dir, ann_file, ids, [files[i] for i in ids], [captions[i] for i in ids])


def load_split(root, split: str) -> CaptionSplit:
    """Read one split; stop with one clear sentence when the layout or the JSON is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise CaptionerError(f"Dataset root {root} does not exist; expected a folder in the COCO layout "
                             f"(annotations/captions_<split>.json and one image folder per split).")
    ann_file = annotation_path(root, split)
    if not ann_file.is_file():
        raise CaptionerError(f"Annotation file {ann_file} is missing; expected the COCO layout "
                             f"{root}/annotations/captions_{split}.json.")
    image_dir = root / split
    if not image_dir.is_dir():
        raise CaptionerError(f"Image folder {image_dir} is missing; expected the images of split '{split}' there.")
    data = _read_json(ann_file, "a COCO captions JSON file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise CaptionerError(f"{ann_file} is not a COCO captions file; expected a JSON object with "
                             f"'images' and 'annotations' lists.")
    try:
        files = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
        captions: dict = {}
        empty = 0
        for ann in data["annotations"]:
            text = str(ann["caption"]).strip()
            if not has_words(text):
                empty += 1
                continue
            captions.setdefault(int(ann["image_id"]), []).append(text)
    except (KeyError, TypeError, ValueError) as e:
        raise CaptionerError(f"{ann_file} has an entry without a valid {e} field; expected images with 'id' and "
                             f"'file_name', annotations with 'image_id' and 'caption'.") from None
    return _split(split, image_dir, ann_file, files, captions, empty)


def image_id(value, path, entry) -> int:
    """An image id as read from `path`: an integer that numpy's int64 (the feature caches' ids) can hold."""
    i = int(value)
    if i != value and str(i) != str(value).strip() or not -2**63 <= i < 2**63:
        raise CaptionerError(f"{path} gives {entry} the image id {value}; expected an integer from -2**63 to 2**63-1.")
    return i


def _listing(folder: Path) -> set:
    return set(os.listdir(folder)) if folder.is_dir() else set()


def locate_images(image_root: Path, files: dict, coco_ids: set, name: str, split_file) -> dict:
    """COCO entries of a Karpathy file name 2014 files (`val2014/COCO_val2014_<id>.jpg`); the 2017 download holds
    the same photos as `train2017/<id>.jpg` or `val2017/<id>.jpg`. Each image is taken from whichever layout has
    it (folders listed once, not 123k stats); images in neither are kept (extraction skips and lists them)."""
    listings = {d: _listing(image_root / d) for d in {f.split("/")[0] for f in files.values() if "/" in f}}
    listings.update({d: _listing(image_root / d) for d in ("train2017", "val2017")})
    missing = []
    for i, f in files.items():
        folder, _, base = f.rpartition("/")
        if base in listings.get(folder, ()) or (not folder and (image_root / f).exists()):
            continue
        new = f"{i:012d}.jpg"
        where = next((d for d in ("train2017", "val2017") if new in listings[d]), None) if i in coco_ids else None
        if where:
            files[i] = f"{where}/{new}"
        else:
            missing.append(f)
    if missing:
        log.warning("%d of %d images of split %s listed in %s are in neither the 2014 layout (%s) nor the 2017 "
                    "layout (%s/train2017/ or val2017/ <id>.jpg), e.g. %s; they are skipped as unreadable.",
                    len(missing), len(files), name, split_file, image_root / missing[0], image_root,
                    ", ".join(missing[:3]))
    return files


def load_karpathy_split(split_file, image_root, split_names, find_images=True, data=None) -> CaptionSplit:
    """The images of a Karpathy split file whose `split` is one of `split_names` (e.g. ["train", "restval"]).

    Image ids are the COCO ids where the file has them (`cocoid`), else its own `imgid`; files are
    `filepath/filename` relative to `image_root` (Flickr entries have no filepath), or for COCO the same photo in
    the 2017 layout when the 2014 file is absent (`find_images=False`: as listed, without looking at the disk);
    captions are the raw sentences.
    """
    split_file, image_root = Path(split_file), Path(image_root)
    names = [split_names] if isinstance(split_names, str) else list(split_names)
    name = "+".join(names)
    expected = "a Karpathy split file (dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json)"
    if not split_file.is_file():
        raise CaptionerError(f"Split file {split_file} is missing; expected {expected} (data.split_file).")
    if not image_root.is_dir():
        raise CaptionerError(f"Image folder {image_root} does not exist; expected the images named in {split_file} "
                             f"under it (data.root).")
    data = _read_json(split_file, expected) if data is None else data  # COCO's takes ~5 s to parse: pass it once
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CaptionerError(f"{split_file} is not a Karpathy split file; expected a JSON object with an 'images' "
                             f"list of {{filename, split, sentences}} entries.")
    files, captions, empty, seen, coco_ids = {}, {}, 0, set(), set()
    try:
        for img in data["images"]:
            seen.add(img["split"])
            if img["split"] not in names:
                continue
            i = image_id(img["cocoid"] if "cocoid" in img else img["imgid"], split_file, img["filename"])
            if "cocoid" in img:
                coco_ids.add(i)
            files[i] = f"{img['filepath']}/{img['filename']}" if img.get("filepath") else str(img["filename"])
            texts = [str(s.get("raw") or " ".join(s.get("tokens", []))).strip() for s in img["sentences"]]
            captions[i] = [t for t in texts if has_words(t)]
            empty += len(texts) - len(captions[i])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CaptionerError(f"{split_file} has an image entry without a valid {e} field; expected 'filename', "
                             f"'imgid', 'split' and 'sentences' with 'raw' text.") from None
    if not files:
        raise CaptionerError(f"{split_file} has no image in split {name}; its splits are "
                             f"{', '.join(sorted(map(str, seen))) or 'none'}.")
    if find_images:
        files = locate_images(image_root, files, coco_ids, name, split_file)
    return _split(name, image_root, split_file, files, captions, empty)


def load_splits(root, splits: dict, split_file=None, find_images=True) -> dict:
    """Role ('train', 'val', ...) -> CaptionSplit: from the COCO layout under `root`, or, with `split_file`, from a
    Karpathy split file, where each role names a list of its splits (train: [train, restval])."""
    if split_file:
        data = _read_json(Path(split_file), "a Karpathy split file") if Path(split_file).is_file() else None
        return {role: load_karpathy_split(split_file, root, names, find_images, data)
                for role, names in splits.items()}
    return {role: load_split(root, name) for role, name in splits.items()}
