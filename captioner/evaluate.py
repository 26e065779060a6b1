"""Score captions the COCO way (BLEU, METEOR, ROUGE-L, CIDEr, SPICE when installed).

    python -m captioner.evaluate results=preds.json annotations=captions_val2017.json output=metrics.json
    python -m captioner.evaluate ckpt_path=run/checkpoints/last.ckpt split=val   # [data=coco data.root=...]

The first scores an existing COCO results file. The second captions every image of a split with a checkpoint
and writes the COCO results file and the metrics into output_dir (default: <run_dir>/eval/). The split is one of
the data the checkpoint was trained on unless `data=` names another: a role of data.splits (`split=val`), a
Karpathy split (`data=karpathy_coco split=test`), a COCO split folder (`data=coco split=val2017`). The split's cached
features for the checkpoint's encoder and preprocessing are used (extracted once when missing), so a second
evaluation costs decoding only. Overrides are those of conf/evaluate.yaml.
"""
import json
import logging
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from captioner import checks
from captioner.cli import compose_config, one_line_errors, show_help
from captioner.data.coco import CaptionSplit, load_splits
from captioner.models.decoding import decode_options
from captioner.utils import CaptionerError, atomic_write_json, atomic_write_text, finite

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
    """A COCO captions file -> {image_id: [caption, ...]} for its listed images, like captioner.data.coco.load_split but
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


def score(results, references, spice=True, per_image=None) -> dict:
    """captioner.evaluation.metrics.score, or a note when pycocoevalcap is not installed (e.g. a bare GPU machine)."""
    try:
        from captioner.evaluation.metrics import score as coco_score
    except ImportError as e:
        log.warning("Caption metrics skipped: %s (pip install pycocoevalcap).", e)
        return {"metrics_skipped": f"{e}; pip install pycocoevalcap"}
    return coco_score(results, references, spice=spice, per_image=per_image)


def evaluate_split(captioner, split: CaptionSplit, max_images=None, batch_size=64, spice=True, per_image=None,
                   **decode):
    """Caption the split's images (the first `max_images`) -> (COCO results list, metrics dict). `per_image`: a
    dict to fill with each image's CIDEr."""
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
    return results, score(results, references, spice=spice, per_image=per_image)


def checkpoint_split(cfg) -> CaptionSplit:
    """The split that `split=` names: a role of data.splits (train, val, test), else a split of the dataset itself
    (a Karpathy split such as `test`, a COCO split folder such as `val2017`)."""
    names = OmegaConf.select(cfg.data.splits, str(cfg.split), default=cfg.split)
    names = OmegaConf.to_container(names) if OmegaConf.is_config(names) else str(names)
    return load_splits(cfg.data.root, {"eval": names}, cfg.data.get("split_file"))["eval"]


def evaluate_cached(captioner, split: CaptionSplit, cache_dir, max_images=None, batch_size=64, spice=True,
                    extract=None, per_image=None, **decode):
    """Like evaluate_split, from the split's cached features (extracted once, with the checkpoint's encoder and
    preprocessing, when missing) -> (results, metrics, seconds per stage)."""
    import numpy as np
    import torch

    from captioner.features.extraction import extract_split, load_features

    extract = dict(extract or {})
    start = time.perf_counter()
    folder = extract_split(split, None, cache_dir, device=captioner.device, encoder=captioner.encoder,
                           spec=captioner.preprocess, **extract)
    feats, feat_ids = load_features(folder)
    n = len(split.image_ids) if max_images is None else min(max_images, len(split.image_ids))
    wanted = np.asarray(split.image_ids[:n], dtype=np.int64)
    rows = np.minimum(np.searchsorted(feat_ids, wanted), len(feat_ids) - 1)  # both sorted by image id
    if (unreadable := wanted[feat_ids[rows] != wanted]).size:  # scoring without them would be misleading
        raise CaptionerError(f"{unreadable.size} images of split {split.name} could not be read (listed in "
                             f"{folder / 'skipped.txt'}, e.g. id {unreadable[0]}); fix or remove them to score it.")
    seconds = {"features": time.perf_counter() - start}
    start, results = time.perf_counter(), []
    for s in range(0, n, batch_size):
        x = torch.from_numpy(np.asarray(feats[rows[s:s + batch_size]], dtype=np.float32))
        for i, caps in zip(wanted[s:s + batch_size].tolist(), captioner.caption_features(x, **decode)):
            results.append({"image_id": i, "caption": caps[0][0]})
    seconds["decoding"] = time.perf_counter() - start
    log.info("Captioned %d images of %s from cached features in %.1f s.", n, split.name, seconds["decoding"])
    start = time.perf_counter()
    metrics = score(results, dict(zip(split.image_ids[:n], split.captions[:n])), spice=spice, per_image=per_image)
    seconds["scoring"] = time.perf_counter() - start
    return results, metrics, {k: round(v, 3) for k, v in seconds.items()}


def evaluate_checkpoint(cfg, checkpoint=None):
    """Checkpoint mode: caption a split, write the COCO results file -> (metrics, report, metrics output path).
    `checkpoint`: cfg.ckpt_path's contents when already loaded (compose_evaluate)."""
    from captioner.serving.inference import Captioner

    split = checkpoint_split(cfg)
    captioner = Captioner(cfg.ckpt_path, cfg.device, checkpoint)
    decode = decode_options(cfg)
    seconds, cider = None, {}
    if cfg.cached_features:
        extract = dict(batch_size=cfg.extract.batch_size, num_workers=cfg.extract.num_workers)
        results, metrics, seconds = evaluate_cached(captioner, split, cfg.paths.cache_dir, cfg.max_images,
                                                    cfg.batch_size, cfg.spice, extract, cider, **decode)
    else:
        results, metrics = evaluate_split(captioner, split, cfg.max_images, cfg.batch_size, cfg.spice, cider,
                                          **decode)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(captioner.ckpt_path)
    # one file per dataset, split, checkpoint and decoding: a beam-1 run must not overwrite a beam-2 run's results
    stem = f"{cfg.data.name}-{split.name}-{captioner.ckpt_path.stem}-{decode_tag(decode)}"
    results_file = out_dir / f"{stem}-results.json"
    atomic_write_text(results_file, json.dumps(results, indent=0))
    samples = out_dir / f"{stem}-samples.html" if cider else None
    if samples:  # the images, captions and per-image CIDEr to look at (none when pycocoevalcap is missing)
        from captioner.evaluation.samples import write_samples

        notes = [f"checkpoint {captioner.ckpt_path}", f"{len(results)} images, corpus CIDEr {metrics['CIDEr']:.3f}"]
        write_samples(samples, split, results, cider, f"{cfg.data.name} {split.name}, {decode_tag(decode)}", notes)
    report = {"checkpoint": str(captioner.ckpt_path), "split": split.name, "annotations": str(split.annotation_file),
              "results": str(results_file), "samples": samples and str(samples), "images": len(results),
              "decode": decode, "seconds": seconds}
    return metrics, report, cfg.output or out_dir / f"{stem}-metrics.json"


def decode_tag(decode: dict) -> str:
    """The decoding options that change the captions, for file names: beam3-len20, sample-t0.7-k0-seed0-len20."""
    if decode.get("temperature") is not None:
        tag = f"sample-t{decode['temperature']:g}-k{decode['top_k']}-seed{decode['seed']}"
    else:
        tag = f"beam{decode['beam_size']}" + (f"-lp{decode['length_penalty']:g}" if decode["length_penalty"] else "")
    nr = decode.get("no_repeat_ngram_size")
    return f"{tag}-len{decode['max_len']}" + (f"-nr{nr}" if nr else "")


def default_output_dir(ckpt_path: Path) -> Path:
    """<run_dir>/eval for <run_dir>/checkpoints/x.ckpt; else an eval/ folder beside the checkpoint."""
    parent = ckpt_path.parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def compose_evaluate(overrides):
    """(the evaluate config, its keys checked; the loaded checkpoint or None). In checkpoint mode without a `data=`
    choice, `data` is the config the checkpoint was trained on (its dataset, root and splits, as recorded in it),
    with any `data.key=value` overrides applied; the checkpoint read for it is returned, to be loaded only once,
    and `ckpt_path` names that file (`last` is resolved once)."""
    overrides = list(overrides)
    chosen = any(o.split("=")[0].lstrip("+") == "data" for o in overrides)
    own = {} if chosen else {o.split("=")[0][len("data."):]: o for o in overrides if o.startswith("data.")}
    cfg = compose_config("evaluate", [o for o in overrides if o not in own.values()])
    checks.check_evaluate(cfg)  # every key, and that the outputs can be written, before any work
    if chosen or cfg.results is not None:
        return (compose_config("evaluate", overrides) if own else cfg), None
    from captioner.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(cfg.ckpt_path)
    checkpoint = load_checkpoint(path)
    data = (checkpoint["hyper_parameters"].get("config") or {}).get("data")
    if not data:  # a checkpoint that does not record its data: the default of conf/evaluate.yaml
        cfg = compose_config("evaluate", overrides)
        cfg.ckpt_path = str(path)
        return cfg, checkpoint
    data = OmegaConf.create(data)  # resolved when saved: Karpathy's split_file is a path under the old root
    old_root = str(data.root)
    OmegaConf.set_struct(data, True)  # a misspelt data.key is an error, as with data=<config>
    for override in own.values():
        try:
            data.merge_with(OmegaConf.from_dotlist([override[len("data."):]]))
        except OmegaConfBaseException:
            raise CaptionerError(f"{override}: there is no such key in the data {path} was trained on (its keys: "
                                 f"{', '.join(data)}); check its spelling.") from None
    for key, value in data.items():  # a new data.root moves the paths that were under the old one
        if isinstance(value, str) and value.startswith(f"{old_root}/") and key not in own:
            data[key] = f"{data.root}{value[len(old_root):]}"
    cfg.data, cfg.ckpt_path = data, str(path)
    log.info("Evaluating on %s at %s, the data %s was trained on (data=<config> chooses another).",
             data.get("name"), data.root, path)
    return cfg, checkpoint


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, "evaluate"):
        return
    cfg, checkpoint = compose_evaluate(argv)
    if cfg.results:
        if not cfg.annotations:
            raise CaptionerError("results= needs annotations=<COCO captions JSON> to score against.")
        results = read_json(cfg.results, 'a COCO results file ([{"image_id": ..., "caption": ...}])')
        metrics = score(results, read_references(cfg.annotations), spice=cfg.spice)
        report = {"results": str(cfg.results), "annotations": str(cfg.annotations), "images": len(results)}
        output = cfg.output
    else:
        metrics, report, output = evaluate_checkpoint(cfg, checkpoint)
    for name, value in metrics.items():
        print(f"{name}\t{value:.4f}" if isinstance(value, float) else f"{name}\t{value}")
    if output:
        atomic_write_json(output, {**report, "metrics": {k: finite(v) if isinstance(v, float) else v
                                                         for k, v in metrics.items()}})
        print(f"Wrote metrics to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
