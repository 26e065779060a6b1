"""Reading caption data: the official MS-COCO layout (root/annotations/captions_<split>.json + root/<split>/), or
a Karpathy split file (dataset_{coco,flickr8k,flickr30k}.json: the train/restval/val/test splits of the literature).
"""
import itertools
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


def caption_text(value) -> str:
    """A caption's text; null or another non-text value is "" (dropped as empty), not the word "None"."""
    return value.strip() if isinstance(value, str) else ""


def outside(file_name: str) -> bool:
    """A file name that would be read from outside the image folder: absolute, or climbing out with `..`."""
    return os.path.isabs(file_name) or ".." in file_name.split("/")  # strings, not Paths: 123k names in COCO


def sentence_text(sentence: dict) -> str:
    """A Karpathy sentence's text: its raw text, else its tokens joined."""
    raw, tokens = caption_text(sentence.get("raw")), sentence.get("tokens")
    if raw or not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return raw
    return " ".join(tokens).strip()


def _string(value) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def field(entry, key, convert, file, expected):
    """entry[key] through `convert`, or one sentence naming the file, the key and the entry."""
    try:
        return convert(entry[key])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):
        raise CaptionerError(f"{file} has an entry without a valid '{key}' field ({entry!r:.80}); "
                             f"expected {expected}.") from None


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


def _split(name, image_dir, ann_file, files: dict, captions: dict, empty: int, escaping=()) -> CaptionSplit:
    """Keep the images that have a usable caption, sorted by id; say what was dropped (`escaping`: the ids of
    images left out because their file name leaves the image folder)."""
    unknown = set(captions) - set(files) - set(escaping)
    ids = sorted(i for i in files if captions.get(i))
    no_caption = len(files) - len(ids)
    if empty or no_caption or unknown or escaping:
        leaving = f", {len(escaping)} images whose file name leaves {image_dir} (absolute or '..')" if escaping else ""
        log.warning("%s (%s): dropped %d empty captions, %d images without captions, %d captions of unknown images%s.",
                    ann_file, name, empty, no_caption, sum(len(captions[i]) for i in unknown), leaving)
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
    expected = "images with 'id' and 'file_name', annotations with 'image_id' and 'caption'"
    files, captions, empty = {}, {}, 0
    for img in data["images"]:
        i = field(img, "id", lambda v: image_id(v, ann_file, f"image {img.get('file_name')!r:.60}"), ann_file,
                  expected)
        name = field(img, "file_name", _string, ann_file, expected)
        if i in files:  # COCO lists each image once: a second entry would silently replace the first
            raise CaptionerError(f"{ann_file} lists image id {i} twice ({files[i]} and {name}); expected each "
                                 f"image once.")
        files[i] = name
    escaping = {i for i, name in files.items() if outside(name)}
    for i in escaping:
        del files[i]
    for ann in data["annotations"]:
        i = field(ann, "image_id", lambda v: image_id(v, ann_file, f"caption {ann.get('id')!r:.30}"), ann_file,
                  expected)
        text = field(ann, "caption", caption_text, ann_file, expected)
        if not has_words(text):
            empty += 1
            continue
        captions.setdefault(i, []).append(text)
    return _split(split, image_dir, ann_file, files, captions, empty, escaping)


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
    fields = "'filename', 'imgid', 'split' and 'sentences' with 'raw' text"
    files, captions, empty, seen, coco_ids, escaping, listed = {}, {}, 0, set(), set(), set(), {}
    for img in data["images"]:
        split = field(img, "split", str, split_file, fields)
        file = field(img, "filename", _string, split_file, fields)
        if img.get("filepath"):
            file = f"{field(img, 'filepath', _string, split_file, fields)}/{file}"
        i = field(img, "cocoid" if "cocoid" in img else "imgid", lambda v: image_id(v, split_file, file), split_file,
                  fields)
        if i in listed:  # Karpathy's files list each image once, in one split: a second entry would replace it
            raise CaptionerError(f"{split_file} lists image id {i} twice ({listed[i]} and {file}); expected each "
                                 f"image once, in one split.")
        listed[i] = file
        seen.add(split)
        if split not in names:
            continue
        if "cocoid" in img:
            coco_ids.add(i)
        texts = field(img, "sentences", lambda s: [sentence_text(x) for x in s], split_file, fields)
        captions[i] = [t for t in texts if has_words(t)]
        empty += len(texts) - len(captions[i])
        if outside(file):
            escaping.add(i)
        else:
            files[i] = file
    if not files:
        raise CaptionerError(f"{split_file} has no image in split {name}; its splits are "
                             f"{', '.join(sorted(map(str, seen))) or 'none'}.")
    if find_images:
        files = locate_images(image_root, files, coco_ids, name, split_file)
    return _split(name, image_root, split_file, files, captions, empty, escaping)


def warn_shared_images(splits: dict):
    """One warning when split roles share images (by id, or by file): scores on a role that shares images with
    train overstate quality. A warning, not an error: validating on training images can be meant (an overfit check)."""
    paths = {r: {f"{s.image_dir}/{f}" for f in s.files} for r, s in splits.items()}
    shared = []
    for a, b in itertools.combinations(splits, 2):
        ids, other = set(splits[a].image_ids), splits[b]
        n = sum(i in ids or f"{other.image_dir}/{f}" in paths[a] for i, f in zip(other.image_ids, other.files))
        if n:
            shared.append(f"{n} images are in both {a} ({splits[a].name}) and {b} ({other.name})")
    if shared:
        log.warning("Split roles share images (by id or file), so scores on them are not on unseen images: %s.",
                    "; ".join(shared))


def load_splits(root, splits: dict, split_file=None, find_images=True) -> dict:
    """Role ('train', 'val', ...) -> CaptionSplit: from the COCO layout under `root`, or, with `split_file`, from a
    Karpathy split file, where each role names a list of its splits (train: [train, restval])."""
    if split_file:
        data = _read_json(Path(split_file), "a Karpathy split file") if Path(split_file).is_file() else None
        out = {role: load_karpathy_split(split_file, root, names, find_images, data) for role, names in splits.items()}
    else:
        out = {role: load_split(root, name) for role, name in splits.items()}
    warn_shared_images(out)
    return out
