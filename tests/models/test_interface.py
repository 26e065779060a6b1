"""Every model of the model/ config group, end to end: train a few steps (real Trainer) -> checkpoint -> caption ->
evaluate -> one SCST step. Adding conf/model/<name>.yaml adds it here."""
import json
import os
import re
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captioner.conf
from captioner.checkpoint import load_checkpoint
from captioner.evaluate import main as evaluate
from captioner.models import CaptionModel
from captioner.run import train
from captioner.serving.inference import Captioner
from captioner.utils import CaptionerError

MODEL_CONFIGS = sorted(p.stem for p in (Path(captioner.conf.__file__).parent / "model").glob("*.yaml"))
TINY = ("hidden_size=16", "embeddings=learned", "embeddings.dim=8", "batch_size=16", "eval_every=0",
        "+trainer.limit_val_batches=1")


def test_the_model_group_is_not_empty():
    assert "show_and_tell" in MODEL_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_model_trains_checkpoints_captions_evaluates_and_takes_an_scst_step(name, cfg_factory, tmp_path, monkeypatch):
    # without java: its tokenizer and METEOR take some 10 s a call, and the model, not the metrics, is tested here
    monkeypatch.setenv("PATH", os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(d) / "java").exists()))
    cfg = cfg_factory(f"model={name}", "iterations=3", *TINY, run="xe")
    train(cfg)
    ckpt = Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["hyper_parameters"]["model"]["name"] == name  # the registry name, for load_model

    captioner = Captioner(ckpt, "cpu")
    assert isinstance(captioner.model, CaptionModel) and captioner.info["model"] == name
    image = next((Path(cfg.data.root) / "val2017").iterdir())
    (caption, probability), = captioner.caption([Image.open(image)], beam_size=2)[0]
    assert isinstance(caption, str) and 0 < probability <= 1

    evaluate([f"ckpt_path={ckpt}", "split=val", "max_images=4", "beam_size=2", "spice=false",
              f"paths.data_dir={cfg.paths.data_dir}", f"output_dir={tmp_path / 'eval'}"])
    report = json.loads(next((tmp_path / "eval").glob("*-metrics.json")).read_text())
    assert report["images"] == 4 and 0 <= report["metrics"]["CIDEr"]

    scst = cfg_factory(f"model={name}", "objective=scst", f"init_from={ckpt}", "iterations=1", "scst.samples=2",
                       "eval_max_images=4", *TINY[:-2], "+trainer.limit_val_batches=1", run="scst")
    train(scst)
    after = load_checkpoint(Path(scst.paths.run_dir) / "checkpoints" / "last.ckpt")["state_dict"]
    before = load_checkpoint(ckpt)["state_dict"]
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in before)  # the policy gradient moved the weights


OLD_CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint-9a369cd.ckpt"  # no model entry


def test_an_old_checkpoint_is_a_show_and_tell_with_its_weights_unchanged():
    model, ckpt = Captioner(OLD_CHECKPOINT, "cpu").model, load_checkpoint(OLD_CHECKPOINT)
    assert model.entry == {"name": "show_and_tell", "hidden_size": 8, "num_layers": 1, "rnn_type": "lstm",
                           "blind": False}
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert weights.keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in weights.items())


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# A Show and Tell trained (experiment=smoke, 40 epochs) at 9453cc2, the commit before the attention models, and
# what that commit's Captioner answered for 12 of its val images' features (fp16 beside it): see "Golden captions".
PRE_ATTENTION = FIXTURES / "show_and_tell-9453cc2.ckpt"


def test_a_show_and_tell_checkpoint_from_before_the_attention_models_captions_the_same_words():
    features = torch.from_numpy(np.load(FIXTURES / "show_and_tell-9453cc2-val-features.npy").astype(np.float32))
    then = json.loads((FIXTURES / "show_and_tell-9453cc2-captions.json").read_text())
    captioner = Captioner(PRE_ATTENTION, "cpu")
    now = {"beam3_n3": captioner.caption_features(features, beam_size=3, n_best=3, no_repeat_ngram_size=0),
           "greedy": captioner.caption_features(features, beam_size=1, no_repeat_ngram_size=0),
           "sample": captioner.caption_features(features, temperature=1.0, seed=0, no_repeat_ngram_size=0)}
    assert len({c for rows in then.values() for row in rows for c, _ in row}) > 5  # not one caption for all
    for decoding, rows in then.items():
        assert [[c for c, _ in row] for row in now[decoding]] == [[c for c, _ in row] for row in rows], decoding
        assert np.allclose([p for row in now[decoding] for _, p in row], [p for row in rows for _, p in row],
                           atol=1e-5), decoding


def test_declared_sizes_are_checked_against_the_tensors_before_the_model_is_built(tmp_path):
    ckpt = load_checkpoint(OLD_CHECKPOINT)
    ckpt["hyper_parameters"]["hidden_size"] = 16000  # built, its LSTM alone would take 4.9 GB
    torch.save(ckpt, tmp_path / "huge.ckpt")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CaptionerError, match=re.escape(
            "huge.ckpt does not match the model its hyperparameters describe: model.init_hidden.weight is [8, 1280] "
            "in the checkpoint, but show_and_tell(hidden_size=16000, num_layers=1, rnn_type=lstm, blind=False) makes "
            "it [16000, 1280].")):
        Captioner(tmp_path / "huge.ckpt", "cpu")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 500_000  # KiB: far below the 4.9 GB
