import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.caption import main
from captioner.serving.inference import Captioner
from captioner.data.vocab import END, PAD, START
from conftest import run_module


@pytest.fixture
def images(trained, tmp_path):
    """Held-out shapes images in several modes, a nested folder, and one broken file."""
    val = Path(trained["cfg"].data.root) / "val2017"
    files = sorted(val.glob("*.png"))[:3]
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(files[0], folder / "a.png")
    Image.open(files[1]).convert("L").save(folder / "nested" / "b_gray.jpg")
    Image.open(files[2]).convert("RGBA").save(folder / "c_rgba.png")
    Image.open(files[2]).convert("CMYK").save(folder / "d_cmyk.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_caption_prints_one_line_per_image_and_reports_unreadable_ones(trained, images, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(images), f"ckpt_path={trained['ckpt']}", "beam_size=2"])
    assert "1 of 5 images could not be read" in str(exit_.value.code)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        path, caption = line.split("\t")
        assert Path(path).exists() and caption.split()
        assert set(caption.split()) <= set(Captioner(trained["ckpt"]).vocab.itos)
    assert "broken.jpg\terror:" in err and err.count("error:") == 1


def test_n_best_json_output(trained, images, tmp_path):
    out = tmp_path / "captions.json"
    main([str(images / "a.png"), str(images / "c_rgba.png"), f"ckpt_path={trained['ckpt']}", "beam_size=3",
          "n_best=3", f"output={out}"])
    results = json.loads(out.read_text())["results"]
    assert [Path(r["path"]).name for r in results] == ["a.png", "c_rgba.png"]
    for r in results:
        caps = r["captions"]
        assert len(caps) == 3 and len({c["caption"] for c in caps}) == 3
        assert abs(sum(c["probability"] for c in caps) - 1) < 1e-4
        assert caps[0]["probability"] >= caps[1]["probability"] >= caps[2]["probability"]


def test_same_caption_as_direct_decoding_and_sampling_is_seedable(trained, images):
    captioner = Captioner(trained["ckpt"])
    im = Image.open(images / "a.png")
    assert captioner.caption([im], beam_size=1) == captioner.caption([im, im], beam_size=1)[:1]
    # greedy decoding by hand, one model step at a time, from the image's encoder features
    model, state, word, words = captioner.model, None, START, []
    with torch.no_grad():
        state = model.initial_state(captioner.features([im]))
        for _ in range(20):
            logits, state = model.step(torch.tensor([word]), state)
            logits[:, [PAD, START]] = float("-inf")
            word = int(logits.argmax())
            if word == END:
                break
            words.append(captioner.vocab.itos[word])
    assert captioner.caption([im], beam_size=1)[0][0][0] == " ".join(words)
    a = captioner.caption([im], temperature=1.0, top_k=5, seed=3)
    assert a == captioner.caption([im], temperature=1.0, top_k=5, seed=3)


@pytest.mark.slow
def test_cli_last_checkpoint_and_clear_errors(trained, images, tmp_path):
    run_dir = tmp_path / "outputs" / "runs" / "x" / "checkpoints"
    run_dir.mkdir(parents=True)
    shutil.copy(trained["ckpt"], run_dir / "last.ckpt")
    r = run_module("captioner.caption", str(images / "a.png"), "ckpt_path=last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(images / "a.png") + "\t")
    r = run_module("captioner.caption", str(images / "a.png"), "ckpt_path=nope.ckpt", cwd=tmp_path)
    assert r.returncode != 0 and "error: ckpt_path=nope.ckpt does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_module("captioner.caption", str(images / "a.png"), "ckpt_path=last", cwd=tmp_path / "outputs")
    assert r.returncode != 0 and "no last.ckpt under outputs/" in r.stderr
