"""Score captions the COCO way (BLEU, METEOR, ROUGE-L, CIDEr, SPICE when installed).

    python -m captioner.evaluate results=preds.json annotations=captions_val2017.json output=metrics.json
    python -m captioner.evaluate ckpt_path=run/checkpoints/last.ckpt data=coco data.root=... split=val2017

The first scores an existing COCO results file. The second captions every image of a split with a checkpoint
and writes the COCO results file and the metrics into output_dir (default: <run_dir>/eval/). Overrides are
those of conf/evaluate.yaml.
"""
import json
import logging
import sys
import time
from pathlib import Path

from captioner import checks
from captioner.cli import compose_config, one_line_errors
from captioner.coco import CaptionSplit, load_split
from captioner.metrics import score
from captioner.utils import CaptionerError, atomic_write_text

log = logging.getLogger(__name__)


def read_json(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"{path} does not exist; expected {what}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionerError(f"{path} is not valid JSON ({type(e).__name__}); expected {what}.") from None


def read_references(path) -> dict:
    """A COCO captions file -> {image_id: [caption, ...]} for its listed images, like captioner.coco.load_split but
    without needing the images: empty captions and images left without any are dropped (pycocoevalcap's scorers
    need at least one reference per image)."""
    data = read_json(path, "a COCO captions file")
    try:
        images = {int(img["id"]) for img in data["images"]}
        references = {}
        for ann in data["annotations"]:
            if str(ann["caption"]).strip() and int(ann["image_id"]) in images:
                references.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
    except (KeyError, TypeError, ValueError):
        raise CaptionerError(f"{path} is not a COCO captions file; expected 'images' with 'id' and "
                             f"'annotations' with 'image_id' and 'caption'.") from None
    if not references:
        raise CaptionerError(f"{path} has no image with a usable caption.")
    return references


def evaluate_split(captioner, split: CaptionSplit, max_images=None, batch_size=64, spice=True, **decode):
    """Caption the split's images (the first `max_images`) -> (COCO results list, metrics dict)."""
    from captioner.caption import caption_files  # torch and Lightning load only when captioning (~10 s)

    n = len(split.image_ids) if max_images is None else min(max_images, len(split.image_ids))
    id_of = {split.image_dir / f: i for i, f in zip(split.image_ids[:n], split.files[:n])}
    start, results = time.perf_counter(), []
    for path, caps, error in caption_files(captioner, list(id_of), batch_size, **decode):
        if error:  # a broken validation image is a broken dataset: scoring without it would be misleading
            raise CaptionerError(f"cannot read {path}: {error}")
        results.append({"image_id": id_of[path], "caption": caps[0][0]})
    log.info("Captioned %d images of %s in %.1f s.", n, split.name, time.perf_counter() - start)
    references = dict(zip(split.image_ids[:n], split.captions[:n]))
    return results, score(results, references, spice=spice)


def default_output_dir(ckpt_path: Path) -> Path:
    """<run_dir>/eval for <run_dir>/checkpoints/x.ckpt; else an eval/ folder beside the checkpoint."""
    parent = ckpt_path.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


@one_line_errors
def main(argv=None):
    cfg = compose_config("evaluate", sys.argv[1:] if argv is None else argv)
    checks.check_evaluate(cfg)  # every key, and that the outputs can be written, before any work
    if cfg.results:
        if not cfg.annotations:
            raise CaptionerError("results= needs annotations=<COCO captions JSON> to score against.")
        results = read_json(cfg.results, 'a COCO results file ([{"image_id": ..., "caption": ...}])')
        metrics = score(results, read_references(cfg.annotations), spice=cfg.spice)
        report = {"results": str(cfg.results), "annotations": str(cfg.annotations), "images": len(results)}
        output = cfg.output
    else:
        from captioner.inference import Captioner

        split = load_split(cfg.data.root, cfg.data.splits.get(cfg.split, cfg.split))
        captioner = Captioner(cfg.ckpt_path, cfg.device)
        decode = dict(beam_size=cfg.beam_size, max_len=cfg.max_len, length_penalty=cfg.length_penalty,
                      temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)
        results, metrics = evaluate_split(captioner, split, cfg.max_images, cfg.batch_size, cfg.spice, **decode)
        out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(captioner.ckpt_path)
        stem = f"{split.name}-{captioner.ckpt_path.stem}"
        results_file = out_dir / f"{stem}-results.json"
        atomic_write_text(results_file, json.dumps(results, indent=0))
        report = {"checkpoint": str(captioner.ckpt_path), "split": split.name,
                  "annotations": str(split.annotation_file),
                  "results": str(results_file), "images": len(results), "decode": decode}
        output = cfg.output or out_dir / f"{stem}-metrics.json"
    for name, value in metrics.items():
        print(f"{name}\t{value:.4f}" if isinstance(value, float) else f"{name}\t{value}")
    if output:
        atomic_write_text(output, json.dumps({**report, "metrics": metrics}, indent=1))
        print(f"Wrote metrics to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
