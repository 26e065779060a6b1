"""Training entry point: `python -m captioner.run [key=value ...]` (Hydra; add -m for a multirun sweep)."""
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only

from captioner.data import CaptionDataModule, ResampleCaptions
from captioner.embeddings import embedding_matrix, load_vectors, nearest_kept
from captioner.history import History
from captioner.model import RNNS
from captioner.module import CaptionModule
from captioner.monitor import CaptionMonitor
from captioner.scst import SCSTModule
from captioner.utils import CaptionerError, atomic_write_text
from captioner.vocab import load_words

log = logging.getLogger("captioner")


def check_config(cfg: DictConfig) -> None:
    """Catch wrong values early, with one sentence naming the key."""
    rnn = str(cfg.rnn_type).lower()
    if rnn not in RNNS:
        raise CaptionerError(f"rnn_type={cfg.rnn_type} is not one of lstm, gru, rnn.")
    cfg.rnn_type = rnn
    if cfg.optimizer not in cfg.optimizers:
        raise CaptionerError(f"optimizer={cfg.optimizer} is not one of {', '.join(cfg.optimizers)}.")
    for key in ("vocab_size", "hidden_size", "num_layers", "batch_size", "epochs"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise CaptionerError(f"{key}={cfg[key]} must be a positive integer.")
    if not isinstance(cfg.caption_idx, int):
        raise CaptionerError(f"caption_idx={cfg.caption_idx} must be an integer (negative: random).")
    if not float(cfg.learning_rate) > 0:
        raise CaptionerError(f"learning_rate={cfg.learning_rate} must be positive.")
    if cfg.ckpt_path and not Path(cfg.ckpt_path).is_file():
        raise CaptionerError(f"ckpt_path={cfg.ckpt_path} does not exist; expected a .ckpt file to resume from.")
    check_recipes(cfg)


def check_recipes(cfg: DictConfig) -> None:
    """The training-recipe keys (regularisers, scheduled sampling, SCST)."""
    for key in ("dropout", "label_smoothing", "scheduled_sampling.max_prob"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise CaptionerError(f"{key}={value} must be a number in [0, 1).")
    if cfg.scheduler.name not in ("none", "step", "cosine", "plateau"):
        raise CaptionerError(f"scheduler={cfg.scheduler.name} is not one of none, step, cosine, plateau.")
    if cfg.objective not in ("xe", "scst"):
        raise CaptionerError(f"objective={cfg.objective} is not one of xe, scst.")
    if cfg.scst.baseline not in ("mean", "greedy"):
        raise CaptionerError(f"scst.baseline={cfg.scst.baseline} is not one of mean, greedy.")
    if not isinstance(cfg.scst.samples, int) or cfg.scst.samples < (2 if cfg.scst.baseline == "mean" else 1):
        raise CaptionerError(f"scst.samples={cfg.scst.samples} must be an integer >= 2 with the mean baseline "
                             f"(>= 1 with greedy).")
    if cfg.objective == "scst" and not cfg.eval_every > 0:
        raise CaptionerError(f"eval_every={cfg.eval_every} must be positive with objective=scst: val/CIDEr picks "
                             f"its checkpoints.")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise CaptionerError(f"init_from={cfg.init_from} does not exist; expected the .ckpt file of a finished run.")


def load_checkpoint(path) -> dict:
    """The one place a checkpoint file is read here (to be swapped for the safe loader)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def init_weights(module: CaptionModule, path, dm: CaptionDataModule) -> None:
    """init_from: start from a finished run's weights; it must share this run's vocabulary and features."""
    ckpt = load_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    if hp["itos"] != dm.vocab.itos or hp["feature_dim"] != dm.feature_dim:
        raise CaptionerError(f"init_from={path} was trained with another vocabulary or encoder; use the data, "
                             f"encoder and vocab_size it was trained with.")
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise CaptionerError(f"init_from={path} has another model shape; use the hidden_size, num_layers, rnn_type "
                             f"and embeddings it was trained with ({hp['hidden_size']}, {hp['num_layers']}, "
                             f"{hp['rnn_type']}, {hp['embeddings'].get('name')}).") from None
    log.info("Initialised the weights from %s (step %d).", path, ckpt.get("global_step", 0))


def build_datamodule(cfg: DictConfig) -> CaptionDataModule:
    d = cfg.data
    return CaptionDataModule(
        root=d.root, splits=d.splits, encoder=cfg.encoder, cache_dir=cfg.paths.cache_dir, vocab_size=cfg.vocab_size,
        caption_idx=cfg.caption_idx, shuffle=cfg.shuffle, batch_size=cfg.batch_size, seed=cfg.seed,
        image_size=d.get("image_size"), lowercase=d.lowercase, drop_punct=d.drop_punct, generate=d.get("generate"),
        num_workers=d.num_workers, extract_batch_size=cfg.encoder.batch_size,
        extract_workers=cfg.encoder.num_workers, name=d.name, resident=d.get("resident", "auto"),
        split_file=d.get("split_file"))


def build_module(cfg: DictConfig, dm: CaptionDataModule, nlp) -> CaptionModule:
    """The model, with word vectors for the data module's vocabulary."""
    emb = OmegaConf.to_container(cfg.embeddings, resolve=True)
    pretrained = has_vector = None
    if nlp is None:
        emb["dim"] = int(cfg.embeddings.dim)
    else:
        pretrained, has_vector = embedding_matrix(nlp, dm.vocab.itos)
        emb["dim"] = pretrained.shape[1]
        emb["coverage"] = float(has_vector[4:].float().mean()) if len(has_vector) > 4 else 0.0
        log.info("Word vectors %s: %.1f%% of vocabulary words have a pretrained vector.", cfg.embeddings.name,
                 100 * emb["coverage"])
        if cfg.embeddings.get("nearest"):
            words = load_words(dm.token_folder)["words"]
            remap = nearest_kept(nlp, dm.vocab.itos, words, len(dm.vocab) - 4)
            dm.remap_words(remap)
            log.info("Mapped %d out-of-vocabulary words to their nearest kept word instead of <unk>.", len(remap))
    optimizer = OmegaConf.to_container(cfg.optimizers[cfg.optimizer], resolve=True)
    if cfg.weight_decay is not None:
        optimizer["weight_decay"] = float(cfg.weight_decay)
    module_class = SCSTModule if cfg.objective == "scst" else CaptionModule
    return module_class(
        itos=dm.vocab.itos, feature_dim=dm.feature_dim, preprocess=dm.preprocess, embeddings=emb,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, rnn_type=cfg.rnn_type,
        optimizer=optimizer,
        learning_rate=cfg.learning_rate, config=OmegaConf.to_container(cfg, resolve=True),
        pretrained=pretrained, has_vector=has_vector, blind=cfg.blind, dropout=cfg.dropout,
        label_smoothing=cfg.label_smoothing, scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        scheduled_sampling=OmegaConf.to_container(cfg.scheduled_sampling, resolve=True))


def train(cfg: DictConfig) -> float:
    """Train one model; returns the final val/ppl (what sweeps minimise)."""
    check_config(cfg)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    nlp = load_vectors(cfg.embeddings, cfg.paths.cache_dir)  # first: a wrong choice fails before long extraction
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(cfg.seed, workers=True)  # after the caches: building them must not change the draws
    module = build_module(cfg, dm, nlp)
    if rank_zero_only.rank == 0:
        dm.vocab.save(run_dir / "vocab.txt")
    if cfg.init_from and not cfg.ckpt_path:  # resuming restores everything itself
        init_weights(module, cfg.init_from, dm)
    if cfg.ckpt_path:
        saved = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)["hyper_parameters"]
        if saved["itos"] != dm.vocab.itos or saved["feature_dim"] != dm.feature_dim:
            raise CaptionerError(f"ckpt_path={cfg.ckpt_path} was trained with another vocabulary or encoder; "
                                 f"resume with the data, encoder and vocab_size it was trained with.")
    ckpt_dir = run_dir / "checkpoints"
    monitor = "val/CIDEr" if cfg.objective == "scst" else cfg.checkpoint_monitor  # SCST optimises CIDEr
    by_loss = monitor in ("val/loss", "val/ppl")  # else an evaluation metric, logged every eval_every
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, save_last=True,
                        mode="min" if by_loss else "max", every_n_epochs=1 if by_loss else cfg.eval_every),
        ModelCheckpoint(dirpath=ckpt_dir, filename="periodic-{step}", train_time_interval=timedelta(minutes=cfg.save_every)),
        ResampleCaptions(),
        CaptionMonitor(cfg.eval_every, cfg.eval_max_images, cfg.eval_beam_size),
        History(run_dir, cfg.write_every),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_every))
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))  # train/lr (the scheduler entry's name)
    steps = dict(max_steps=cfg.iterations, max_epochs=-1) if cfg.iterations > 0 else dict(max_epochs=cfg.epochs)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **steps)
    if logger:
        logger.log_hyperparams({k: v for k, v in module.hparams.config.items() if not isinstance(v, dict)})
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    if not trainer.fast_dev_run:
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")  # also when training stopped between validations
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    final.update(steps=trainer.global_step, checkpoint=str(ckpt_dir / "last.ckpt"))
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "metrics.json", json.dumps(final, indent=1))
    log.info("Finished: %d steps, val/ppl %s, run dir %s", trainer.global_step,
             f"{final['val/ppl']:.3f}" if "val/ppl" in final else "n/a", run_dir)
    return final.get(cfg.get("optimized_metric") or "val/ppl", float("nan"))


@hydra.main(version_base="1.3", config_path="pkg://captioner.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except CaptionerError as e:
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # this job fails and shows as failed in the results table; the others go on
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
