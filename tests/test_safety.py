"""Adversarial inputs: checkpoints that try to run code or are broken, bad keys, unwritable outputs (issue 14)."""
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import load_checkpoint
from captioner.serving.inference import Captioner
from captioner.run import train
from captioner.utils import CaptionerError
from conftest import run_module

OLD_CHECKPOINT = Path(__file__).resolve().parent / "fixtures" / "checkpoint-9a369cd.ckpt"  # written by captioner at 9a369cd


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(trained, tmp_path):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=False)  # our own file: trusted
    marker = tmp_path / "payload-ran"
    ckpt["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "downloaded.ckpt"
    torch.save(ckpt, path)
    return path, marker


def one_error_line(r):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.slow  # four commands as subprocesses
def test_a_malicious_checkpoint_runs_nothing_through_any_entry_point(evil, trained, data_dir, tmp_path):
    path, marker = evil
    image = next(Path(trained["cfg"].data.root, "val2017").glob("*.png"))
    commands = [
        ("captioner.caption", str(image), f"ckpt_path={path}"),
        ("captioner.evaluate", f"ckpt_path={path}", f"data.root={trained['cfg'].data.root}", "split=val2017",
         f"output_dir={tmp_path / 'eval'}"),
        ("captioner.serve", f"ckpt_path={path}", "port=0"),
        ("captioner.run", f"ckpt_path={path}", "experiment=smoke", f"paths.data_dir={data_dir}",
         f"hydra.run.dir={tmp_path / 'run'}"),
    ]
    for command in commands:
        r = run_module(*command, cwd=tmp_path, timeout=300)
        error = one_error_line(r)
        assert "refusing to load it, because unpickling them could run code" in error, (command, r.stderr)
        assert "posix.system" in error and str(path) in error
        assert not marker.exists(), f"{command[0]} ran the checkpoint's payload"


def test_checkpoints_of_earlier_versions_still_load_and_resume(cfg_factory, trained):
    captioner = Captioner(OLD_CHECKPOINT, "cpu")
    image = next(Path(trained["cfg"].data.root, "val2017").glob("*.png"))
    from PIL import Image

    assert captioner.caption([Image.open(image)], beam_size=2)[0][0][0]  # a (possibly poor) caption
    old = load_checkpoint(OLD_CHECKPOINT)
    cfg = cfg_factory("hidden_size=8", "epochs=1", "iterations=5", "eval_every=0", f"ckpt_path={OLD_CHECKPOINT}")
    train(cfg)
    resumed = load_checkpoint(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt")
    assert old["global_step"] == 3 and resumed["global_step"] == 5


def test_run_resumes_from_ckpt_path_last_like_the_other_commands(cfg_factory, trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_factory("epochs=7", "eval_every=0", "ckpt_path=last")
    with pytest.raises(CaptionerError, match="ckpt_path=last: no last.ckpt under outputs/"):
        train(cfg)
    newest = tmp_path / "outputs" / "runs" / "b" / "checkpoints" / "last.ckpt"
    newest.parent.mkdir(parents=True)
    shutil.copy(trained["ckpt"], newest)
    train(cfg)
    assert cfg.ckpt_path == str(Path("outputs/runs/b/checkpoints/last.ckpt"))  # the newest, made before this run's
    assert load_checkpoint(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt")["global_step"] == 6 * 3 + 3


def test_each_checkpoint_problem_has_its_own_sentence(trained, tmp_path):
    good = trained["ckpt"]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["model"]["hidden_size"] = 32  # says 32, holds 64: another architecture
    torch.save(ckpt, tmp_path / "mismatch.ckpt")
    cases = {tmp_path: "is a folder, not a checkpoint file", tmp_path / "missing.ckpt": "does not exist",
             tmp_path / "empty.ckpt": "is empty (0 bytes)", tmp_path / "notes.ckpt": "is not a PyTorch checkpoint",
             tmp_path / "cut.ckpt": "is truncated or damaged",
             tmp_path / "other.ckpt": "is a PyTorch file but not a captioner checkpoint",
             tmp_path / "mismatch.ckpt": "does not match the model its hyperparameters describe"}
    for path, sentence in cases.items():
        with pytest.raises(CaptionerError, match=re.escape(sentence)) as e:
            Captioner(path, "cpu")
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    if not torch.cuda.is_available():  # the device, not the checkpoint, is the problem
        with pytest.raises(CaptionerError, match="device=cuda: this machine has no CUDA GPU"):
            Captioner(good, "cuda")
    with pytest.raises(CaptionerError, match="device=foo is not a device"):
        Captioner(good, "foo")


def test_resuming_with_another_architecture_is_one_sentence(cfg_factory, trained):
    with pytest.raises(CaptionerError, match="was trained with hidden_size=64, not 32; resume with hidden_size=64"):
        train(cfg_factory("hidden_size=32", f"ckpt_path={trained['ckpt']}"))
    with pytest.raises(CaptionerError, match="was trained with rnn_type=lstm, not gru"):
        train(cfg_factory("rnn_type=gru", f"ckpt_path={trained['ckpt']}"))


@pytest.mark.parametrize("override, message", [
    ("learning_rate=abc", "learning_rate=abc must be a positive number"),
    ("learning_rate=0", "learning_rate=0 must be a positive number"),
    ("iterations=abc", "iterations=abc must be an integer"),
    ("epochs=true", "epochs=True must be a positive integer"),
    ("save_every=-1", "save_every=-1 must be a positive number"),
    ("eval_every=-1", "eval_every=-1 must be an integer >= 0"),
    ("shuffle=maybe", "shuffle=maybe must be true or false"),
    ("paths.data_dir=/proc/captioner-data", "paths.data_dir=/proc/captioner-data cannot be written"),
    # the Trainer gets these from epochs and iterations: an added one would be silently overridden
    ("+trainer.max_epochs=3", "trainer.max_epochs is set by the top-level key epochs; use epochs=3"),
    ("+trainer.max_steps=5", "trainer.max_steps is set by the top-level key iterations; use iterations=5"),
    # best.ckpt's metric: one that training logs (SPICE is not computed during training), else Lightning fails
    # when it first looks for it, after an epoch or more of training
    ("seed=-1", "seed=-1 must be an integer from 0 to 4294967295"),  # numpy's generators refuse it, late
    # the settings of the scheduler, SCST and learned vectors: torch refuses them only once built, after the caches
    ("scheduler=plateau scheduler.factor=2", r"scheduler.factor=2 must be a number in \(0, 1\)"),
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size=0 must be a positive integer"),
    ("scheduler=cosine scheduler.warmup_start_factor=0",
     r"scheduler.warmup_start_factor=0 must be a number in \(0, 1\]"),
    ("scheduler=cosine scheduler.warmup_steps=-1", "scheduler.warmup_steps=-1 must be an integer >= 0"),
    ("scst.max_len=0", "scst.max_len=0 must be an integer from 1 to 1000"),
    ("embeddings=learned embeddings.dim=0", "embeddings.dim=0 must be a positive integer"),
    ("checkpoint_monitor=val/cider", "checkpoint_monitor=val/cider is not one of val/loss, val/ppl, val/Bleu_1"),
    ("checkpoint_monitor=val/SPICE", "checkpoint_monitor=val/SPICE is not one of"),
    ("checkpoint_monitor=val/CIDEr eval_every=0", r"checkpoint_monitor=val/CIDEr needs eval_every > 0 \(it is 0\)"),
    # SCST's loss is its sampled captions' reward-weighted log-likelihood: cross-entropy recipes would be ignored
    ("objective=scst eval_every=1 label_smoothing=0.1", "label_smoothing=0.1 is a cross-entropy recipe; objective=scst "
                                                        "does not use it"),
    ("objective=scst eval_every=1 scheduled_sampling.max_prob=0.2", "scheduled_sampling.max_prob=0.2 is a "
                                                                    "cross-entropy recipe"),
])
def test_every_run_key_is_checked(cfg_factory, override, message):
    with pytest.raises(CaptionerError, match=message):
        train(cfg_factory(*override.split()))


def test_run_checkpoint_problems_are_one_sentence(cfg_factory, tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    for name, sentence in (("empty.ckpt", "is empty"), ("notes.ckpt", "is not a PyTorch checkpoint")):
        with pytest.raises(CaptionerError, match=f"ckpt_path={tmp_path / name} {sentence}"):
            train(cfg_factory(f"ckpt_path={tmp_path / name}"))


def exit_message(main, *args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("override, message", [
    ("beam_size=0", "beam_size=0 must be a positive integer"),
    ("beam_size=-1", "beam_size=-1 must be a positive integer"),
    ("beam_size=abc", "beam_size=abc must be a positive integer"), ("batch_size=0", "batch_size=0 must be a positive"),
    ("device=foo", "device=foo is not a device"), ("n_best=5", "n_best=5 must not exceed beam_size=3"),
    ("temperature=0", "temperature=0 must be a positive number"),
    ("temperature=-1", "temperature=-1 must be a positive number"),
    ("top_k=-2", "top_k=-2 must be an integer >= 0"),
    ("seed=-1", "seed=-1 must be an integer from 0 to 4294967295"),
])
def test_every_caption_key_is_checked(trained, override, message):
    from captioner.caption import main

    image = next(Path(trained["cfg"].data.root, "val2017").glob("*.png"))
    assert message in exit_message(main, str(image), f"ckpt_path={trained['ckpt']}", override)


def test_caption_refuses_an_unwritable_output_before_captioning(trained, tmp_path, capsys):
    from captioner.caption import main

    image = next(Path(trained["cfg"].data.root, "val2017").glob("*.png"))
    (tmp_path / "a-file").write_text("x")
    for output, reason in ((tmp_path / "a-file" / "out.json", "cannot be written"), (tmp_path, "is a folder"),
                           ("/proc/captioner/out.json", "cannot be written")):
        message = exit_message(main, str(image), f"ckpt_path={trained['ckpt']}", f"output={output}")
        assert f"output={output} {reason}" in message
    assert "\t" not in capsys.readouterr().out  # stopped before captioning, so nothing was computed and lost


def test_caption_reports_a_folder_it_cannot_read(trained, tmp_path):
    """A folder it may not list is named and counted, not skipped silently (as root: in a child without root)."""
    from captioner.caption import expand

    top = Path(__import__("tempfile").mkdtemp(dir="/tmp"))
    try:
        shutil.copy(next(Path(trained["cfg"].data.root, "val2017").glob("*.png")), top / "a.png")
        (top / "locked").mkdir()
        shutil.copy(top / "a.png", top / "locked" / "b.png")
        for p in (top, top / "a.png"):
            p.chmod(0o755)
        (top / "locked").chmod(0o000)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops root (which may list anything) and reports what expand found
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                unreadable = []
                files = expand([top], unreadable)
                os.write(write, repr(([f.name for f in files], [f.name for f, _ in unreadable])).encode())
            finally:
                os._exit(0)
        os.close(write)
        found = eval(os.read(read, 10_000).decode())
        os.waitpid(pid, 0)
    finally:
        (top / "locked").chmod(0o755)
        shutil.rmtree(top)
    assert found == (["a.png"], ["locked"])


@pytest.mark.parametrize("override, message", [
    ("max_upload_mb=abc", "max_upload_mb=abc must be a positive number"),
    ("port=abc", "port=abc must be an integer from 0 to 65535"), ("port=70000", "port=70000 must be an integer"),
    ("beam_size=20", "beam_size=20 must be an integer from 1 to 10"), ("max_queue=0", "max_queue=0 must be"),
    ("device=cuda:7", "device=cuda:7"),
    ("max_pixels=5e8", "max_pixels=500000000.0 is above PIL's own decompression-bomb limit (178956970 pixels)"),
])
def test_every_serve_key_is_checked(trained, override, message):
    pytest.importorskip("fastapi")
    from captioner.serve import main

    assert message in exit_message(main, f"ckpt_path={trained['ckpt']}", override)


def test_evaluate_names_a_folder_and_an_unwritable_output(tmp_path):
    from captioner.evaluate import main

    (tmp_path / "a.json").write_text("[]")
    message = exit_message(main, f"results={tmp_path}", f"annotations={tmp_path / 'a.json'}")
    assert f"results={tmp_path} is a folder" in message
    (tmp_path / "a-file").write_text("x")
    message = exit_message(main, f"results={tmp_path / 'a.json'}", f"annotations={tmp_path / 'a.json'}",
                           f"output={tmp_path / 'a-file' / 'm.json'}")
    assert "cannot be written" in message
    assert "max_images=0 must be a positive integer" in exit_message(main, "max_images=0")


@pytest.mark.parametrize("command, key", [("caption", "batch_size"), ("evaluate", "cached_features"),
                                          ("serve", "max_upload_mb"), ("download", "karpathy_url"),
                                          ("extract", None)])
def test_every_command_answers_help_without_doing_anything(command, key, capsys, tmp_path, monkeypatch):
    """--help was taken for an image path (caption) or a malformed override (evaluate, serve, extract)."""
    import importlib

    monkeypatch.chdir(tmp_path)  # nothing is written: no outputs/, no data/
    module = importlib.import_module(f"captioner.{command}")
    module.main(["--help", "ckpt_path=/missing.ckpt"])
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    if key:
        assert f"== Keys (key=value overrides of conf/{command}.yaml) ==" in out and f"\n{key}:" in out
    assert not list(tmp_path.iterdir())
