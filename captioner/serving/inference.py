"""A trained captioner ready to use: checkpoint -> encoder, preprocessing, vocabulary, decoder.

Shared by `captioner.caption`, `captioner.evaluate` and `captioner.serve`. Only the checkpoint is needed:
everything else (encoder name, weights, image size, normalisation, vocabulary, word vectors) is inside it.
"""

import torch
from omegaconf import OmegaConf
from PIL import Image

from captioner.checkpoint import check_device, load_checkpoint, resolve_checkpoint
from captioner.data.vocab import Vocabulary
from captioner.evaluation.attention import attention_rows, has_attention
from captioner.features.encoders import build_encoder, preprocessing
from captioner.features.extraction import with_kind
from captioner.models import load_model, model_entry
from captioner.models.decoding import captions
from captioner.utils import CaptionerError, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Captioner:
    def __init__(self, ckpt_path, device="auto", checkpoint=None):
        """`checkpoint`: ckpt_path's contents, when the caller has loaded them already (with load_checkpoint)."""
        self.ckpt_path = resolve_checkpoint(ckpt_path)
        self.device = check_device(device)  # first: a missing GPU is its own sentence, not a checkpoint problem
        ckpt = checkpoint or load_checkpoint(self.ckpt_path)  # safe: plain data and tensors only, never code
        self.model = load_model(ckpt, self.ckpt_path).to(self.device)  # the model alone: no training code
        self.hparams = ckpt["hyper_parameters"]
        self.vocab = Vocabulary(self.hparams["itos"])
        # the model's class says which features it takes (pooled or grid), and so which ones to extract
        kind = self.model.feature_kind
        pre = self.preprocess = with_kind(dict(self.hparams["preprocess"]), kind)
        missing = [k for k in ("encoder", "weights", "image_size", "mean", "std") if k not in pre]
        if missing:  # a KeyError otherwise
            raise CaptionerError(f"{self.ckpt_path} has no preprocess.{missing[0]} (the encoder settings it was "
                                 f"trained with); it is damaged or not written by captioner.run.")
        weights = None if pre["weights"] == "default" else pre["weights"]
        self.encoder = build_encoder(OmegaConf.create({"name": pre["encoder"], "weights": weights}),
                                     grid=kind == "grid").to(self.device)
        self.transform = preprocessing(pre["image_size"], pre["mean"], pre["std"], pre.get("interpolation", "bilinear"))
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @property
    def info(self) -> dict:
        entry = model_entry(self.hparams)
        # the file name only: a server must not tell its clients where its files are
        return {"checkpoint": self.ckpt_path.name, "encoder": self.preprocess["encoder"],
                "image_size": self.preprocess["image_size"], "model": entry.pop("name"), **entry,
                "vocabulary": len(self.vocab), "embeddings": self.hparams["embeddings"].get("name")}

    def encoder_input(self, image) -> torch.Tensor:
        """A PIL image (any mode) -> the encoder's input for it: small, so the full-size image can be let go."""
        return self.transform(to_rgb(image))

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """PIL images (any mode), or their encoder_input tensors -> encoder features [n, dim] (grid: [n, N, dim])."""
        x = torch.stack([im if isinstance(im, torch.Tensor) else self.encoder_input(im) for im in images])
        with torch.autocast(**self.autocast):
            return self.encoder(x.to(self.device)).float()

    def caption_features(self, features, **decode):
        """-> one list of (caption, probability) per image (see captioner.models.decoding.captions for the options)."""
        with torch.autocast(**self.autocast):
            return captions(self.model, self.vocab, features.to(self.device), **decode)

    def caption(self, images, **decode):
        return self.caption_features(self.features(images), **decode)

    @property
    def has_attention(self) -> bool:
        return has_attention(self.model)

    def attention(self, features, captions) -> list:
        """Grid features [B, N, D] and one caption per row -> per caption its attention rows [words + 1, N]
        (captioner.evaluation.attention.attention_rows)."""
        return attention_rows(self.model, self.vocab, features.to(self.device), captions)


def open_image(path) -> Image.Image:
    """Load an image fully (so errors surface here, not later), converted to RGB."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(im)
