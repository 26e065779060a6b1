"""Diverged training and damaged checkpoints end in one sentence, never in NaN captions (issue 25)."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioner.data.coco import load_karpathy_split, load_split
from captioner.run import train
from captioner.serving.inference import Captioner
from captioner.utils import CaptionerError

DIVERGES = ("learning_rate=1e30", "optimizer=sgd", "eval_every=0")  # NaN weights after a step or two


def refuse(constant):
    raise AssertionError(f"the file holds {constant}, which is not JSON")


def test_training_stops_on_the_first_non_finite_loss(cfg_factory):
    cfg = cfg_factory(*DIVERGES, "trainer.log_every_n_steps=1")
    with pytest.raises(CaptionerError, match=r"training diverged: the loss is nan at step 2; lower learning_rate, "
                                             r"set trainer.gradient_clip_val"):
        train(cfg)
    assert not list(Path(cfg.paths.run_dir).glob("**/*.ckpt"))  # no checkpoint of the NaN weights
    history = json.loads((Path(cfg.paths.run_dir) / "history.json").read_text(), parse_constant=refuse)
    assert history["iterations"] == [1, 2] and history["loss"][1] is None  # JSON's null, not a bare NaN


def test_a_non_finite_validation_loss_stops_training_before_best_ckpt(cfg_factory):
    # the training loss is read on logging steps only (never here): validation after every step finds it
    cfg = cfg_factory(*DIVERGES, "trainer.log_every_n_steps=50", "trainer.val_check_interval=1")
    with pytest.raises(CaptionerError, match=r"training diverged: val/loss is nan after step 1"):
        train(cfg)
    assert not list(Path(cfg.paths.run_dir).glob("**/*.ckpt"))  # best.ckpt would keep the NaN weights, scored NaN


def damaged(trained, tmp_path, name, change):
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_a_checkpoint_with_nan_weights_is_refused_by_every_loader(trained, cfg_factory, tmp_path):
    first = next(iter(torch.load(trained["ckpt"], weights_only=True)["state_dict"]))
    path = damaged(trained, tmp_path, "nan.ckpt", lambda c: c["state_dict"][first].view(-1)[3:5].fill_(float("inf")))
    sentence = rf"ckpt_path={path} holds non-finite weights \(NaN or inf in {first}\)"
    with pytest.raises(CaptionerError, match=sentence):
        Captioner(path, "cpu")  # caption, evaluate, serve
    with pytest.raises(CaptionerError, match=sentence):
        train(cfg_factory(f"ckpt_path={path}"))  # resuming
    with pytest.raises(CaptionerError, match=rf"init_from={path} holds non-finite weights"):
        train(cfg_factory(f"init_from={path}"))


def test_a_wrong_shaped_tensor_names_the_tensor_and_both_shapes(trained, cfg_factory, tmp_path):
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    name = [k for k, v in state.items() if v.dim() == 1][-1]  # the output layer's bias
    size = state[name].shape[0]

    def shrink(ckpt):
        ckpt["state_dict"][name] = ckpt["state_dict"][name][:-1]

    path = damaged(trained, tmp_path, "shape.ckpt", shrink)
    for key in ("ckpt_path", "init_from"):
        with pytest.raises(CaptionerError, match=rf"{key}={path} has {name} of shape \[{size - 1}\], but this "
                                                 rf"model's is \[{size}\]"):
            train(cfg_factory(f"{key}={path}"))


def test_a_checkpoint_without_its_encoder_weights_setting_is_one_sentence(trained, tmp_path):
    path = damaged(trained, tmp_path, "pre.ckpt", lambda c: c["hyper_parameters"]["preprocess"].pop("weights"))
    with pytest.raises(CaptionerError, match=rf"{path} has no preprocess.weights \(the encoder settings"):
        Captioner(path, "cpu")


@pytest.mark.parametrize("cocoid", [1e30, 1.5])
def test_a_karpathy_image_id_beyond_int64_is_one_sentence(tmp_path, cocoid):
    (tmp_path / "images").mkdir()
    entry = {"filename": "a.jpg", "split": "test", "cocoid": cocoid, "sentences": [{"raw": "a cat"}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(CaptionerError, match=re.escape(f"dataset_coco.json gives a.jpg the image id {cocoid}; "
                                                       f"expected an integer from -2**63 to 2**63-1.")):
        load_karpathy_split(tmp_path / "dataset_coco.json", tmp_path / "images", "test")


@pytest.mark.parametrize("where", ["images", "annotations"])
def test_a_coco_image_id_beyond_int64_is_one_sentence(tmp_path, where):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    data = {"images": [{"id": 1e30 if where == "images" else 3, "file_name": "a.jpg"}],
            "annotations": [{"id": 5, "image_id": 1e30 if where == "annotations" else 3, "caption": "a cat"}]}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    with pytest.raises(CaptionerError, match=re.escape("captions_val2017.json gives ") + ".* the image id 1e\\+30; "):
        load_split(tmp_path, "val2017")


def test_metrics_json_holds_null_for_a_nan_metric(cfg_factory):
    cfg = cfg_factory(*DIVERGES, "~callbacks.stop_on_non_finite", "epochs=1")  # without the stop: NaN to the end
    train(cfg)

    metrics = json.loads((Path(cfg.paths.run_dir) / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["val/loss"] is None and metrics["steps"] == 3


@pytest.mark.slow  # two evaluations of the smoke validation set
def test_evaluations_with_other_decoding_keep_their_own_files(trained, tmp_path):
    from captioner.evaluate import main

    for beam in (1, 2):
        main([f"ckpt_path={trained['ckpt']}", "data=coco", f"data.root={trained['cfg'].data.root}", "split=val2017",
              f"beam_size={beam}", "spice=false", f"output_dir={tmp_path}",
              f"paths.data_dir={trained['cfg'].paths.data_dir}"])
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == ["coco-val2017-last-beam1-len20-nr2-metrics.json", "coco-val2017-last-beam1-len20-nr2-results.json",
                     "coco-val2017-last-beam2-len20-nr2-metrics.json", "coco-val2017-last-beam2-len20-nr2-results.json"]


@pytest.mark.slow  # a training process, interrupted
def test_a_burst_of_ctrl_c_ends_with_one_line(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "captioner.run", "experiment=smoke", "epochs=10000", "eval_every=0",
                          f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                          "trainer.enable_progress_bar=false"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "best.ckpt").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    while p.poll() is None:  # Ctrl-C, held down
        p.send_signal(signal.SIGINT)
        time.sleep(0.01)
    err = p.communicate()[1]
    assert p.returncode != 0 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.count("error: interrupted again while shutting down; stopped.") <= 1, err
