"""Checking the training keys of `captioner.run` (and the data keys `captioner.extract` shares) before any work:
the top-level hyperparameters, best.ckpt's metric, the data and encoder numbers, and the recipe keys."""
from captioner.checks import (MAX_LEN, SEED_MAX, SET_BY, boolean, decoding, existing_file, get_key, integer, is_int,
                              is_number, number, text, writable_dir)
from captioner.utils import CaptionerError

MIN_IMAGE_SIZE = 32  # the encoders (ResNet, EfficientNet) shrink their input 32 times


def check_run(cfg):
    """The top-level training keys (captioner.run's check_config checks the choices: rnn_type, optimizer)."""
    for key in ("vocab_size", "hidden_size", "num_layers", "batch_size", "epochs", "eval_max_images"):
        integer(cfg, key, 1)
    integer(cfg, "progress_every", 1, nullable=True)  # null: 1 on a CPU, 50 on a GPU
    integer(cfg, "vocab_min_count", 1, nullable=True)  # null: no minimum
    integer(cfg, "seq_per_img", 1)
    decoding(cfg)  # the validation captions' beam_size, max_len, ... (conf/decode/)
    for key in ("caption_idx", "iterations"):
        integer(cfg, key)
    integer(cfg, "seed", 0, SEED_MAX)
    integer(cfg, "eval_every", 0)
    for key in ("learning_rate", "save_every", "write_every"):
        number(cfg, key, positive=True)
    for key in ("shuffle", "blind"):
        boolean(cfg, key)
    text(cfg, "checkpoint_monitor")
    checkpoint_monitor(cfg)
    for key, top in SET_BY.items():  # captioner.run passes these to the Trainer itself: one would be ignored
        if get_key(cfg, "trainer") and key in cfg.trainer:
            raise CaptionerError(f"trainer.{key} is set by the top-level key {top}; use {top}={cfg.trainer[key]}.")
    if cfg.ckpt_path is not None:
        text(cfg, "ckpt_path", nullable=True)
    for key in ("data_dir", "cache_dir", "run_dir"):  # a read-only cache is one sentence, not a PermissionError
        writable_dir(cfg.paths[key], f"paths.{key}")
    check_trainer(cfg)
    check_data(cfg)
    if "dim" in (get_key(cfg, "embeddings") or {}):  # learned vectors' size (pretrained ones bring theirs)
        integer(cfg, "embeddings.dim", 1)
    accelerator = str(get_key(cfg, "trainer.accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CaptionerError(f"trainer.accelerator={accelerator}: this machine has no CUDA GPU that torch can "
                                 f"use; use trainer=default (it picks the device) or trainer=cpu.")


def checkpoint_monitor(cfg):
    """best.ckpt's metric must be one that training logs, or ModelCheckpoint fails when it first looks for it."""
    import shutil

    from captioner.training.monitor import LOGGED

    monitor, known = cfg.checkpoint_monitor, ("val/loss", "val/ppl", *(f"val/{m}" for m in LOGGED))
    if monitor not in known:
        raise CaptionerError(f"checkpoint_monitor={monitor} is not one of {', '.join(known)}.")
    if monitor not in known[:2] and cfg.objective != "scst" and cfg.eval_every < 1:  # eval_every: checked an int
        raise CaptionerError(f"checkpoint_monitor={monitor} needs eval_every > 0 (it is {cfg.eval_every}): the "
                             f"caption metrics are computed every eval_every epochs.")
    if monitor == "val/METEOR" and shutil.which("java") is None:
        raise CaptionerError("checkpoint_monitor=val/METEOR needs java, which METEOR runs and this machine lacks; "
                             "pick val/CIDEr or install java.")


def check_trainer(cfg):
    """The Trainer's numbers that Lightning divides by (a ZeroDivisionError per process) or ignores when negative."""
    trainer = get_key(cfg, "trainer") or {}
    if "log_every_n_steps" in trainer:
        integer(cfg, "trainer.log_every_n_steps", 1)
    if "check_val_every_n_epoch" in trainer:
        integer(cfg, "trainer.check_val_every_n_epoch", 1, nullable=True)
    interval = trainer.get("val_check_interval")
    if interval is not None and not (is_int(interval) and interval >= 1 or is_number(interval) and 0 < interval <= 1):
        raise CaptionerError(f"trainer.val_check_interval={interval} must be null, a positive integer (steps) or a "
                             f"fraction of an epoch in (0, 1].")
    if "gradient_clip_val" in trainer:
        number(cfg, "trainer.gradient_clip_val", low=0, nullable=True)


def check_data(cfg):
    """The data and encoder groups' numbers, which extraction and loading would otherwise reject deep inside
    (a generated dataset would even be rebuilt, empty, before that)."""
    integer(cfg, "data.image_size", MIN_IMAGE_SIZE, nullable=True)
    if "max_words" in cfg.data:  # a data config of its own may lack it: prepare() then uses vocab.MAX_WORDS
        integer(cfg, "data.max_words", 1)
    integer(cfg, "encoder.image_size", MIN_IMAGE_SIZE)
    integer(cfg, "encoder.batch_size", 1)
    for key in ("data.num_workers", "encoder.num_workers"):
        integer(cfg, key, 0)
    for split in get_key(cfg, "data.generate") or {}:
        integer(cfg, f"data.generate.{split}", 1)
    if get_key(cfg, "data.resident") not in ("auto", True, False):
        raise CaptionerError(f"data.resident={get_key(cfg, 'data.resident')} is not one of auto, true, false.")


def check_recipes(cfg):
    """The training-recipe keys (regularisers, scheduler, scheduled sampling, SCST)."""
    from omegaconf import OmegaConf

    for key in ("dropout", "label_smoothing", "scheduled_sampling.max_prob"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise CaptionerError(f"{key}={value} must be a number in [0, 1).")
    if cfg.weight_decay is not None:
        number(cfg, "weight_decay", low=0)
    if cfg.scheduler.name not in ("none", "step", "cosine", "plateau"):
        raise CaptionerError(f"scheduler={cfg.scheduler.name} is not one of none, step, cosine, plateau.")
    for key, ok, where in (("gamma", lambda v: 0 < v <= 1, "in (0, 1]"),
                           ("warmup_start_factor", lambda v: 0 < v <= 1, "in (0, 1]"),
                           ("min_factor", lambda v: 0 <= v <= 1, "in [0, 1]"),
                           ("factor", lambda v: 0 < v < 1, "in (0, 1)")):
        # torch's schedulers refuse bad values only when built: after the caches, or (step) an epoch in
        if key in cfg.scheduler and not (is_number(cfg.scheduler[key]) and ok(cfg.scheduler[key])):
            raise CaptionerError(f"scheduler.{key}={cfg.scheduler[key]} must be a number {where}.")
    for key, low in (("step_size", 1), ("warmup_steps", 0), ("patience", 0)):
        if key in cfg.scheduler:
            integer(cfg, f"scheduler.{key}", low)
    integer(cfg, "scst.max_len", 1, MAX_LEN)
    if cfg.objective not in ("xe", "scst"):
        raise CaptionerError(f"objective={cfg.objective} is not one of xe, scst.")
    if cfg.scst.baseline not in ("mean", "greedy"):
        raise CaptionerError(f"scst.baseline={cfg.scst.baseline} is not one of mean, greedy.")
    if not isinstance(cfg.scst.samples, int) or cfg.scst.samples < (2 if cfg.scst.baseline == "mean" else 1):
        raise CaptionerError(f"scst.samples={cfg.scst.samples} must be an integer >= 2 with the mean baseline "
                             f"(>= 1 with greedy).")
    if cfg.objective == "scst":  # its loss is the reward-weighted log-likelihood of captions it samples itself
        for key in ("label_smoothing", "scheduled_sampling.max_prob"):
            if OmegaConf.select(cfg, key):
                raise CaptionerError(f"{key}={OmegaConf.select(cfg, key)} is a cross-entropy recipe; objective=scst "
                                     f"does not use it: set it to 0.")
    if cfg.objective == "scst" and not cfg.eval_every > 0:
        raise CaptionerError(f"eval_every={cfg.eval_every} must be positive with objective=scst: val/CIDEr picks "
                             f"its checkpoints.")
    if cfg.init_from is not None:
        text(cfg, "init_from")
        existing_file(cfg, "init_from", "a .ckpt file written by captioner.run")
