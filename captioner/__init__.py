"""captioner: Show-and-Tell image captioning as a PyTorch Lightning research framework (see README.md).

Where things are, in pipeline order:
- data: download, coco (the COCO and Karpathy layouts), shapes and scenes (built-in datasets), prepare (every cache
  a run needs), vocab, embeddings, data (the LightningDataModule)
- features: encoders, features, jpeg, extract
- model and training: model (Show and Tell), module (the LightningModule), scst, graphs, run (the training command),
  monitor, history, interrupt, checkpoint, sweep
- decoding and evaluation: decoding (beam search, sampling), inference, caption, evaluate, metrics, cider
- serving: serve, uploads
- shared: cli, checks, utils
Nothing is imported here, so `python -m captioner.<command>` loads only what that command needs.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("captioner")
except PackageNotFoundError:  # run from a source tree without installing (the GPU machine's recipe)
    __version__ = "unknown"
