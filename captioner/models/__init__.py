"""Captioning models and their decoding (beam search, sampling). Imports only captioner.data, captioner.features
and captioner.utils.

A model is chosen by the `model/` config group and built with hydra.utils.instantiate through `build_model`, which
looks its `name` up in the registry (models.base.MODELS) and records the name and arguments on the model
(`model.entry`); the checkpoint keeps that entry, so `load_model` rebuilds the model without any training code.
"""
import importlib
import pkgutil

import hydra
import torch
from hydra.errors import InstantiationException

from captioner.checkpoint import shape_mismatch
from captioner.models.base import MODELS, CaptionModel, register_model  # noqa: F401
from captioner.models.layers import WordEmbedding
from captioner.utils import CaptionerError

for _m in pkgutil.iter_modules(__path__):  # every model file registers itself: adding one needs no line here
    importlib.import_module(f"{__name__}.{_m.name}")

# checkpoints from before the model/ group: a Show and Tell with these top-level hyperparameters
LEGACY_KEYS = ("hidden_size", "num_layers", "rnn_type", "blind", "dropout")


def build_model(name: str, feature_dim: int, vocab_size: int, embedding: WordEmbedding, **args) -> CaptionModel:
    """The registered model `name`, built with `args`, which it keeps as its checkpoint entry."""
    if name not in MODELS:
        raise CaptionerError(f"model={name} is not one of {', '.join(sorted(MODELS))}.")
    model = MODELS[name](feature_dim, vocab_size, embedding, **args)
    model.entry = {"name": name, **args}
    return model


def feature_kind(name: str) -> str:
    """"pooled" or "grid": the features the registered model `name` takes (what a run extracts for it)."""
    if name not in MODELS:
        raise CaptionerError(f"model={name} is not one of {', '.join(sorted(MODELS))}.")
    return MODELS[name].feature_kind


def make_model(cfg: dict, feature_dim: int, vocab_size: int, embedding: WordEmbedding) -> CaptionModel:
    """A model from a `model/` config (with its `_target_`) or a checkpoint's entry (name and arguments only)."""
    cfg = {"_target_": f"{__name__}.build_model", **cfg}
    try:
        return hydra.utils.instantiate(cfg, feature_dim=feature_dim, vocab_size=vocab_size, embedding=embedding,
                                       _convert_="all")
    except InstantiationException as e:  # our own sentence, not Hydra's wrapping of it
        if isinstance(e.__cause__, CaptionerError):
            raise e.__cause__ from None
        raise


def check_model(cfg: dict) -> None:
    """Build the configured model on the meta device (no memory, no time) so a wrong argument fails at once."""
    with torch.device("meta"):
        make_model(cfg, 1, 8, WordEmbedding(8, 1))


def model_entry(hp: dict) -> dict:
    """A checkpoint's model name and constructor arguments; one without a model entry is a show_and_tell."""
    if hp.get("model"):
        return dict(hp["model"])
    return {"name": "show_and_tell", **{k: hp[k] for k in LEGACY_KEYS if k in hp}}


def load_model(ckpt: dict, source) -> CaptionModel:
    """The checkpoint's model with its weights, in eval mode. Its shapes are checked first on the meta device, so a
    checkpoint declaring sizes its tensors do not have fails at once instead of allocating the declared model."""
    hp = ckpt["hyper_parameters"]
    try:
        entry, emb, n = model_entry(hp), hp["embeddings"], len(hp["itos"])

        def make():
            return make_model(entry, hp["feature_dim"], n, WordEmbedding(n, emb["dim"], emb.get("freeze", False)))

        with torch.device("meta"):
            expected = make().state_dict()
        weights = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        if bad := shape_mismatch(weights, expected):
            key, have, want = bad
            args = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "name")
            raise CaptionerError(f"{source} does not match the model its hyperparameters describe: model.{key} "
                                 f"is {have} in the checkpoint, but {entry['name']}({args}) makes it {want}.")
        model = make()
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptionerError(f"{source} does not match the model its hyperparameters describe "
                             f"({first[:200]}).") from None
    return model.eval()
