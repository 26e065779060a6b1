"""Training entry point: `python -m captioner.run [key=value ...]` (Hydra; add -m for a multirun sweep)."""
import logging
import os
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException, HydraException, InstantiationException
from hydra.types import RunMode
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities import rank_zero_only

from captioner import checks
from captioner.training import checks as training_checks
from captioner.checkpoint import (check_same_architecture, check_shapes, init_weights, load_checkpoint,
                                  resolve_checkpoint)
from captioner.cli import compose_config, one_line, one_line_errors
from captioner.data.datamodule import CaptionDataModule
from captioner.data.embeddings import load_vectors
from captioner.models import check_model, feature_kind, model_entry
from captioner.training.module import CaptionModule
from captioner.training.prepare import prepare, word_vectors
from captioner.training.scst import SCSTModule
from captioner.utils import METRICS_FILE, CaptionerError, atomic_write_json, finite

log = logging.getLogger("captioner")
# torch.compile's modes, and graphs: the loss's forward and backward as CUDA graphs (captioner.training.graphs)
COMPILE_MODES = ("graphs", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_config(cfg: DictConfig) -> None:
    """Catch wrong values early, with one sentence naming the key."""
    training_checks.check_run(cfg)
    training_checks.check_recipes(cfg)
    check_model(OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.optimizer not in cfg.optimizers:
        raise CaptionerError(f"optimizer={cfg.optimizer} is not one of {', '.join(cfg.optimizers)}.")
    if cfg.get("compile") not in (None, False, True, *COMPILE_MODES):
        raise CaptionerError(f"compile={cfg.compile} is not one of false, true, {', '.join(COMPILE_MODES)}.")


def build(cfg: DictConfig, nlp=None):
    """The prepared data (every cache built or found), its vocabulary, the data module and the model."""
    prepared = prepare(cfg.data, cfg.encoder, cfg.paths.cache_dir, kind=feature_kind(cfg.model.name))
    vocab = prepared.vocabulary(cfg.vocab_size, cfg.get("vocab_min_count"))
    emb, pretrained, has_vector = word_vectors(nlp, vocab, OmegaConf.to_container(cfg.embeddings, resolve=True),
                                               prepared.words["words"])
    val = prepared.splits["val"]
    dm = CaptionDataModule(prepared.datasets(vocab, cfg.caption_idx, cfg.seed, cfg.seq_per_img), cfg.batch_size, cfg.shuffle,
                           cfg.data.num_workers, cfg.data.resident, val_references=dict(zip(val.image_ids, val.captions)),
                           val_paths={i: val.image_dir / f for i, f in zip(val.image_ids, val.files)},
                           pad_to=8 if cfg.get("compile") else 1, pad_real=cfg.get("compile") == "graphs")
    optimizer = OmegaConf.to_container(cfg.optimizers[cfg.optimizer], resolve=True)
    if cfg.weight_decay is not None:
        optimizer["weight_decay"] = float(cfg.weight_decay)
    pl.seed_everything(cfg.seed, workers=True)  # after the caches: building them must not change the draws
    module = (SCSTModule if cfg.objective == "scst" else CaptionModule)(
        itos=vocab.itos, feature_dim=prepared.feature_dim, preprocess=prepared.preprocess, embeddings=emb,
        model=OmegaConf.to_container(cfg.model, resolve=True), optimizer=optimizer,
        learning_rate=cfg.learning_rate, config=OmegaConf.to_container(cfg, resolve=True),
        pretrained=pretrained, has_vector=has_vector,
        label_smoothing=cfg.label_smoothing, scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        scheduled_sampling=OmegaConf.to_container(cfg.scheduled_sampling, resolve=True),
        compile=cfg.get("compile") or False)
    return prepared, vocab, dm, module


def build_callbacks(cfg: DictConfig, logger) -> list:
    """The `callbacks/` group, instantiated. best.ckpt follows its metric: a loss is minimised and logged every
    epoch; an evaluation metric (val/CIDEr, ...) is maximised and logged every eval_every epochs."""
    monitor = "val/CIDEr" if cfg.objective == "scst" else cfg.checkpoint_monitor  # SCST optimises CIDEr
    by_loss = monitor in ("val/loss", "val/ppl")
    schedule = {"best_checkpoint": dict(monitor=monitor, mode="min" if by_loss else "max",
                                        every_n_epochs=1 if by_loss else cfg.eval_every),
                "progress_bar": dict(refresh_rate=cfg.progress_every or progress_rate(cfg))}
    if not cfg.trainer.get("enable_progress_bar", True):
        schedule["progress_bar"] = None
    callbacks = [hydra.utils.instantiate(c, **schedule.get(name, {})) for name, c in cfg.callbacks.items()
                 if c is not None and schedule.get(name, {}) is not None]
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))  # train/lr (the scheduler entry's name)
    return callbacks


def progress_rate(cfg: DictConfig) -> int:
    """Steps between progress-bar refreshes by default: every step on a CPU; on a GPU each refresh reads the
    loss back and so waits for the device, so only every 50th step."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return 50 if gpu else 1


def train(cfg: DictConfig) -> float:
    """Train one model; returns the final val/ppl (what sweeps minimise)."""
    check_config(cfg)
    if cfg.ckpt_path == "last":  # the newest last.ckpt under outputs/, as caption, evaluate and serve take it
        cfg.ckpt_path = str(resolve_checkpoint("last"))
        log.info("Resuming from %s.", cfg.ckpt_path)
    resume = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None  # safe, and before any long work
    if resume:
        saved, wanted = model_entry(resume["hyper_parameters"]), OmegaConf.to_container(cfg.model, resolve=True)
        check_same_architecture(cfg.ckpt_path, {**resume["hyper_parameters"], **saved, "model": saved["name"]},
                                {**wanted, "model": wanted["name"]})
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    nlp = load_vectors(cfg.embeddings, cfg.paths.cache_dir)  # first: a wrong choice fails before long extraction
    prepared, vocab, dm, module = build(cfg, nlp)
    if rank_zero_only.rank == 0:
        vocab.save(run_dir / "vocab.txt")
    if resume:
        saved = resume["hyper_parameters"]
        check_same_architecture(cfg.ckpt_path, saved, dict(embedding_dim=module.hparams.embeddings["dim"]))
        if saved["itos"] != vocab.itos or saved["feature_dim"] != prepared.feature_dim:
            raise CaptionerError(f"ckpt_path={cfg.ckpt_path} was trained with another vocabulary or encoder; "
                                 f"resume with the data, encoder and vocab_size it was trained with.")
        check_shapes(f"ckpt_path={cfg.ckpt_path}", resume["state_dict"], module)
    elif cfg.init_from:  # resuming restores everything itself
        init_weights(module, cfg.init_from, vocab.itos, prepared.feature_dim)
        log.info("Initialised the weights from %s.", cfg.init_from)
    ckpt_dir = run_dir / "checkpoints"
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") and cfg.logger.get("_target_") else False
    steps = dict(max_steps=cfg.iterations, max_epochs=-1) if cfg.iterations > 0 else dict(max_epochs=cfg.epochs)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=build_callbacks(cfg, logger), logger=logger, **steps)
    if cfg.get("compile") == "graphs" and trainer.num_devices * trainer.num_nodes > 1:
        raise CaptionerError(f"compile=graphs captures the training step on one device, not "
                             f"{trainer.num_devices * trainer.num_nodes}; use compile=false with DDP.")
    if logger:
        logger.log_hyperparams({k: v for k, v in module.hparams.config.items() if not isinstance(v, dict)})
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path, weights_only=True)  # checked safe above
    except SystemExit:  # Lightning's exit after Ctrl-C, which restores Python's Ctrl-C handler: one more while the
        signal.signal(signal.SIGINT, exit_quietly)  # process winds down would print an atexit traceback
        raise
    if not trainer.fast_dev_run:  # also when training stopped between validations; weights_only=False: resumable
        trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
    final = {k: finite(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    final.update(steps=trainer.global_step, checkpoint=str(ckpt_dir / "last.ckpt"))
    if trainer.is_global_zero:  # one report per run, not one per process
        atomic_write_json(run_dir / METRICS_FILE, final)
        log.info("Finished: %d steps, val/ppl %s, run dir %s", trainer.global_step,
                 f"{final['val/ppl']:.3f}" if final.get("val/ppl") is not None else "n/a", run_dir)
    result = final.get(cfg.get("optimized_metric") or "val/ppl")
    return float("nan") if result is None else result


def exit_quietly(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # the rest of a burst
    print("error: interrupted again while shutting down; stopped.", file=sys.stderr)
    os._exit(128 + signum)


@one_line_errors
def check_overrides(argv) -> None:
    """Hydra reports a misspelt key or group option in several lines, and a run folder it cannot create as a
    traceback: compose the same overrides first and name the problem in one sentence."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --cfg, --info, -cn, ...: Hydra's own modes
    multirun = any(a in ("-m", "--multirun") for a in argv)
    parser, plain = OverridesParser.create(), []
    for arg in argv:
        if arg.startswith("-"):
            continue
        try:
            o = parser.parse_override(arg)
        except HydraException as e:
            raise CaptionerError(f"cannot read the argument {arg} ({one_line(e)}); expected key=value.") from None
        key = o.key_or_group
        if key in ("hydra.run.dir", "hydra.sweep.dir") and "${" not in o.input_line:
            checks.writable_dir(o.value(), key)
        elif o.is_sweep_override() and not multirun:
            raise CaptionerError(f"{o.input_line} gives several values: add -m (--multirun) for one run per "
                                 f"value, or quote the value.")
        elif not key.startswith("hydra") and not o.is_sweep_override():  # sweeps: each job checks its own
            plain.append(o.input_line)
    compose_config("config", ["paths.run_dir=.", *plain])


@hydra.main(version_base="1.3", config_path="pkg://captioner.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except (CaptionerError, PermissionError, InstantiationException) as e:
        if isinstance(e, PermissionError):  # e.g. a cache folder made read-only after the checks
            e = CaptionerError(f"cannot write {e.filename}: permission denied; make it writable or set "
                               f"paths.data_dir to a writable folder.")
        elif isinstance(e, InstantiationException):  # a trainer/logger/callback setting its class rejects
            key = re.search(r"full_key: (\S+)", str(e))
            e = CaptionerError(f"{key.group(1) if key else 'config'}: {one_line(e.__cause__ or e)}")
        # into the run's log file only: the terminal shows it once, as the exit line (or Hydra's, for a sweep)
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (e,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # this job fails and shows as failed in the results table; the others go on. Hydra prints a
            # CompactHydraException as its message alone (any other error with a traceback) when the sweep ends
            raise CompactHydraException(str(e)) from None
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    check_overrides(sys.argv[1:])
    main()
