"""Attention maps people can look at: `caption attention=true` writes <stem>.attention.png (the image, then one panel
per word), the server answers the maps, TensorBoard's validation samples include the figure; a pooled model says in
one sentence that it has none. Tiny real trainings of both attention models on the smoke shapes."""
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.caption import main as caption_main
from captioner.evaluation.attention import COLUMNS, DPI, PANEL, attention_figure, figure_png
from captioner.serving.inference import Captioner
from captioner.utils import CaptionerError
from conftest import make_cfg

TINY = {"show_attend_tell": ["model.attention_dim=16"],
        "transformer": ["model.num_layers=1", "model.d_model=16", "model.num_heads=2", "model.ff_dim=32"]}


@pytest.fixture(scope="module", params=sorted(TINY))
def attention_run(request, data_dir, tmp_path_factory):
    """One epoch of a tiny attention model, its validation captions evaluated (so the monitor logs samples)."""
    from captioner.run import train

    run_dir = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(data_dir, run_dir, "experiment=smoke", f"model={request.param}", *TINY[request.param],
                   "epochs=1", "hidden_size=16", "embeddings=learned", "embeddings.dim=8", "eval_every=1",
                   "eval_max_images=4", "+callbacks.caption_monitor.samples=2", "trainer.enable_progress_bar=false",
                   "trainer.enable_model_summary=false")
    train(cfg)
    return {"cfg": cfg, "run_dir": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", "name": request.param}


def panels(words: int) -> tuple:
    """(columns, rows) of a figure for a caption of `words` words: the image, each word and <end>."""
    n = words + 2
    return min(COLUMNS, n), math.ceil(n / min(COLUMNS, n))


def test_the_figure_is_the_image_then_each_words_row_as_a_grid_over_it():
    rows = np.random.default_rng(0).random((4, 9))
    rows /= rows.sum(1, keepdims=True)
    fig = attention_figure(Image.new("RGB", (90, 60)), "two red squares", rows)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 5 and [ax.get_title() for ax in drawn] == ["", "two", "red", "squares", "<end>"]
    np.testing.assert_array_equal(np.stack([ax.images[1].get_array() for ax in drawn[1:]]), rows.reshape(4, 3, 3))
    assert tuple(drawn[1].images[1].get_extent()) == (0, 90, 60, 0)  # stretched over the whole image, as the encoder saw it
    with Image.open(io.BytesIO(figure_png(fig))) as im:
        assert im.size == (5 * PANEL * DPI, PANEL * DPI)
    with pytest.raises(CaptionerError, match="square grid"):
        attention_figure(Image.new("RGB", (9, 9)), "two", rows[:2, :8])


@pytest.mark.slow
def test_caption_attention_writes_the_figure_of_per_word_maps_summing_to_one(attention_run, tmp_path):
    image = tmp_path / "photo.png"
    shutil.copy(sorted(Path(attention_run["cfg"].data.root, "val2017").glob("*.png"))[0], image)
    out = tmp_path / "captions.json"
    caption_main([str(image), f"ckpt_path={attention_run['ckpt']}", "attention=true", f"output={out}"])
    result, = json.loads(out.read_text())["results"]
    caption = result["captions"][0]["caption"]
    png = tmp_path / "photo.attention.png"
    assert result["attention"] == str(png)
    cols, rows = panels(len(caption.split()))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (cols * PANEL * DPI, rows * PANEL * DPI)

    # the arrays the figure draws: one [H, W] map per word and <end>, each summing to one over the grid
    captioner = Captioner(attention_run["ckpt"], "cpu")
    photo = Image.open(image)
    maps = captioner.attention(captioner.features([photo]), [caption])[0]
    fig = attention_figure(photo, caption, maps)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == len(caption.split()) + 2 and len(fig.axes) == cols * rows
    assert [ax.get_title() for ax in drawn[1:]] == caption.split() + ["<end>"]
    grids = np.stack([np.asarray(ax.images[1].get_array()) for ax in drawn[1:]])
    side = math.isqrt(maps.shape[1])
    assert grids.shape == (len(caption.split()) + 1, side, side) and side > 1
    np.testing.assert_allclose(grids.sum((1, 2)), 1, atol=1e-5)
    assert (grids >= 0).all()


@pytest.mark.slow
def test_the_server_answers_each_captions_maps(attention_run):
    from fastapi.testclient import TestClient

    from captioner.cli import compose_config
    from captioner.serve import create_app

    data = sorted(Path(attention_run["cfg"].data.root, "val2017").glob("*.png"))[0].read_bytes()
    with TestClient(create_app(Captioner(attention_run["ckpt"], "cpu"), compose_config("serve", []))) as client:
        answer = client.post("/api/caption", files={"file": ("a.png", data, "image/png")},
                             data={"beam_size": 3, "n_best": 2}).json()
    assert len(answer["captions"]) == 2
    for c in answer["captions"]:
        att = c["attention"]
        h, w = att["grid"]
        assert att["words"] == c["caption"].split() + ["<end>"] and h == w > 1
        maps = np.array(att["maps"])
        assert maps.shape == (len(att["words"]), h * w)
        np.testing.assert_allclose(maps.sum(1), 1, atol=h * w * 5e-4)  # 3 decimals each


@pytest.mark.slow
def test_tensorboard_samples_include_the_attention_figure(attention_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(attention_run["run_dir"] / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    figures = [t for t in acc.Tags()["images"] if t.startswith("attention/")]
    assert len(figures) == 2, acc.Tags()["images"]  # callbacks.caption_monitor.samples=2
    image = acc.Images(figures[0])[-1]
    assert image.width >= 2 * PANEL * DPI and image.height >= PANEL * DPI


def test_a_pooled_model_says_it_has_no_attention_in_one_sentence(trained, tmp_path):
    image = sorted(Path(trained["cfg"].data.root, "val2017").glob("*.png"))[0]
    with pytest.raises(SystemExit) as exit_:
        caption_main([str(image), f"ckpt_path={trained['ckpt']}", "attention=true"])
    message = str(exit_.value.code)
    assert message.startswith("error: attention=true needs a model with attention") and "show_and_tell" in message
    assert "\n" not in message and not list(image.parent.glob("*.attention.png"))


@pytest.mark.slow
def test_the_page_draws_each_words_map_under_each_caption_in_a_real_browser(attention_run):
    import os
    import threading
    import time

    import uvicorn

    from captioner.cli import compose_config
    from captioner.serve import create_app

    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright")
    chromium = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"no browser at {chromium} (apt-get install chromium, or set CAPTIONER_CHROMIUM)")
    app = create_app(Captioner(attention_run["ckpt"], "cpu"), compose_config("serve", []))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    image = sorted(Path(attention_run["cfg"].data.root, "val2017").glob("*.png"))[0]
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(url)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#captions li .attention canvas", timeout=60_000)
            first = page.locator("#captions li").first
            words = first.locator(".caption").text_content().split() + ["<end>"]
            assert first.locator(".attention figcaption").all_text_contents() == words
            assert page.locator("#captions li").count() == page.locator("#captions li .attention").count() == 3
            # the canvas holds the image under the map, not a blank square
            assert page.evaluate("""() => { const c = document.querySelector('.attention canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                return new Set(d).size; }""") > 10
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
