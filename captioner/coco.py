"""Reading caption data in the official MS-COCO layout: root/annotations/captions_<split>.json + root/<split>/."""
import json
import logging
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


def annotation_path(root, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}.json"


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
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CaptionerError(f"{ann_file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except UnicodeDecodeError:
        raise CaptionerError(f"{ann_file} is not UTF-8 text; expected a COCO captions JSON file.") from None
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
            if not text:
                empty += 1
                continue
            captions.setdefault(int(ann["image_id"]), []).append(text)
    except (KeyError, TypeError, ValueError) as e:
        raise CaptionerError(f"{ann_file} has an entry without a valid {e} field; expected images with 'id' and "
                             f"'file_name', annotations with 'image_id' and 'caption'.") from None
    unknown = set(captions) - set(files)
    ids = sorted(i for i in files if i in captions)
    no_caption = len(files) - len(ids)
    if empty or no_caption or unknown:
        log.warning("%s: dropped %d empty captions, %d images without captions, %d captions of unknown images.",
                    ann_file, empty, no_caption, sum(len(captions[i]) for i in unknown))
    if not ids:
        raise CaptionerError(f"{ann_file} has no image with a usable caption.")
    return CaptionSplit(split, image_dir, ann_file, ids, [files[i] for i in ids], [captions[i] for i in ids])
