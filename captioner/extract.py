"""Extract image features ahead of training: `python -m captioner.extract data=coco data.root=data/coco`.

Takes the training command's overrides (data, encoder, paths: `encoder=resnet152`, `data=karpathy_coco`, ...),
runs the encoder once over every image of every split and prints each split's cache folder. The model (`model=`)
says which features: pooled, or grid for attention models (show_attend_tell). `captioner.run`
does the same on first use; this does it beforehand, e.g. on a GPU machine for training elsewhere.
"""
import json
import sys

from captioner.training.checks import check_data
from captioner.cli import compose_config, one_line_errors, show_help
from captioner.features.extraction import extract_split
from captioner.models import feature_kind
from captioner.training.prepare import read_splits


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__):  # its keys are the training config's: python -m captioner.run --help
        return
    # the training config's paths.run_dir needs Hydra's runtime; nothing is written there, so any value does
    cfg = compose_config("config", ["paths.run_dir=.", *argv])
    check_data(cfg)
    data, encoder = cfg.data, cfg.encoder
    splits, unchanged = read_splits(data)
    for role, split in splits.items():
        folder = extract_split(split, encoder, cfg.paths.cache_dir, data.get("image_size"), encoder.batch_size,
                               encoder.num_workers, before_publish=unchanged, kind=feature_kind(cfg.model.name))
        meta = json.loads((folder / "meta.json").read_text())
        print(f"{role} ({split.name}): {meta['n_images']} images, {meta['skipped']} unreadable -> {folder}",
              flush=True)


if __name__ == "__main__":
    main()
