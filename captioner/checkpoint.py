"""Loading a captioner checkpoint safely: plain data and tensors only, never code, one sentence per problem.

Every loader (caption, evaluate, serve, resuming, `init_from`) goes through `load_checkpoint`. It uses
`torch.load(weights_only=True)`: a pickle that names any other Python object (say `os.system` in a
`__reduce__`) is refused before anything in it runs. Checkpoints written by captioner hold only dicts, lists,
strings, numbers and tensors, so nothing needs to be added with `torch.serialization.add_safe_globals`.
"""
import pickle
import re
import zipfile
from pathlib import Path

import torch

from captioner.utils import CaptionerError

EXPECTED = "expected a .ckpt file written by captioner.run"


def check_device(device, key="device") -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps` -> a torch.device that exists on this machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError:
        raise CaptionerError(f"{key}={device} is not a device; expected auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CaptionerError(f"{key}={device}: this machine has no CUDA GPU that torch can use; "
                                 f"use {key}=cpu or {key}=auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CaptionerError(f"{key}={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                                 f"numbered from 0.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise CaptionerError(f"{key}={device}: MPS (Apple GPU) is not available on this machine; use {key}=cpu.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CaptionerError(f"{key}={device} is not a device captioner runs on; expected auto, cpu, cuda or mps.")
    return dev


def resolve_checkpoint(ckpt_path, search_root="outputs") -> Path:
    """`last` means the newest last.ckpt under `search_root`; anything else is checked by load_checkpoint."""
    if ckpt_path in (None, "", "last"):
        found = sorted(Path(search_root).glob("**/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise CaptionerError(f"ckpt_path=last: no last.ckpt under {search_root}/; train one with "
                                 f"`python -m captioner.run` or pass ckpt_path=<file>.")
        return found[-1]
    return Path(ckpt_path)


def load_checkpoint(path, map_location="cpu", key="ckpt_path") -> dict:
    """The checkpoint at `path` as a dict, loaded without running any code it may contain.

    Raises CaptionerError with one sentence for: a missing path or a folder, an empty file, a file that is not a
    PyTorch checkpoint, a truncated one, one holding objects other than plain data and tensors, and a PyTorch file
    that is not a captioner checkpoint. Sentences start with `key=path` (the setting that named the file).
    """
    path = Path(path)
    shown = f"{key}={path}" if key else str(path)
    if path.is_dir():
        raise CaptionerError(f"{shown} is a folder, not a checkpoint file; {EXPECTED}.")
    if not path.is_file():
        raise CaptionerError(f"{shown} does not exist; {EXPECTED}.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CaptionerError(f"{shown} is empty (0 bytes); {EXPECTED}.")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CaptionerError(f"{shown} is not a PyTorch checkpoint (not a zip archive); {EXPECTED}.")
    if not zipfile.is_zipfile(path):
        raise CaptionerError(f"{shown} is truncated or damaged (its zip index is missing), probably cut off while "
                             f"copying or saving; copy it again or pick another checkpoint.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            found = re.search(r"GLOBAL ([\w.]+\w)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise CaptionerError(f"{shown} holds Python objects other than tensors and plain data{what}; refusing to "
                                 f"load it, because unpickling them could run code.") from None
        raise CaptionerError(f"{shown} could not be unpickled ({e}); it is damaged or not a checkpoint.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptionerError(f"{shown} could not be read as a checkpoint ({first}); it is damaged.") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "itos" not in hp or "preprocess" not in hp or "state_dict" not in ckpt:
        raise CaptionerError(f"{shown} is a PyTorch file but not a captioner checkpoint (no vocabulary, "
                             f"preprocessing or weights in it); {EXPECTED}.")
    for name, tensor in ckpt["state_dict"].items():  # NaN weights caption "green green green ..." without a word
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CaptionerError(f"{shown} holds non-finite weights (NaN or inf in {name}): the training that wrote "
                                 f"it diverged; use an earlier checkpoint.")
    return ckpt


def shape_mismatch(saved: dict, wanted: dict):
    """The first tensor of `saved` whose shape differs from the same-named one in `wanted`, as (name, its shape,
    the wanted shape); None when all agree. load_state_dict would report every mismatch in a page of text."""
    for name, tensor in saved.items():
        if name in wanted and tuple(tensor.shape) != tuple(wanted[name].shape):
            return name, list(tensor.shape), list(wanted[name].shape)
    return None


def check_shapes(shown, saved: dict, module) -> None:
    """One sentence naming the first tensor of `saved` that does not fit `module`, and both shapes."""
    if bad := shape_mismatch(saved, module.state_dict()):
        name, have, want = bad
        raise CaptionerError(f"{shown} has {name} of shape {have}, but this model's is {want}; use the hidden_size, "
                             f"num_layers, rnn_type, embeddings and vocabulary it was trained with.")


ARCHITECTURE = ("model", "rnn_type", "hidden_size", "num_layers", "feature_dim", "blind")


def check_same_architecture(path, saved: dict, wanted: dict) -> None:
    """Resuming needs the architecture the checkpoint was trained with: one sentence naming what differs."""
    for key in ARCHITECTURE:
        if key in wanted and key in saved and saved[key] != wanted[key]:
            raise CaptionerError(f"ckpt_path={path} was trained with {key}={saved[key]}, not {wanted[key]}; resume "
                                 f"with {key}={saved[key]} (or start a new run without ckpt_path).")
    dim = saved.get("embeddings", {}).get("dim")
    if "embedding_dim" in wanted and dim is not None and dim != wanted["embedding_dim"]:
        raise CaptionerError(f"ckpt_path={path} was trained with {dim}-d word vectors, not "
                             f"{wanted['embedding_dim']}-d; resume with the embeddings it was trained with.")


def init_weights(module, path, itos, feature_dim) -> None:
    """init_from: start from a finished run's weights (not its optimizer or step); it must share this run's
    vocabulary, features and model shape."""
    ckpt = load_checkpoint(path, key="init_from")
    hp = ckpt["hyper_parameters"]
    if hp["itos"] != list(itos) or hp["feature_dim"] != feature_dim:
        raise CaptionerError(f"init_from={path} was trained with another vocabulary or encoder; use the data, "
                             f"encoder and vocab_size it was trained with.")
    check_shapes(f"init_from={path}", ckpt["state_dict"], module)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError:
        raise CaptionerError(f"init_from={path} has another model shape; use the model and embeddings it was "
                             f"trained with ({hp.get('model') or hp.get('rnn_type')}, "
                             f"{hp['embeddings'].get('name')}).") from None
