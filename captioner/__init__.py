"""captioner: Show-and-Tell image captioning as a PyTorch Lightning research framework (see README.md).

Where things are, bottom layer first (each subpackage imports only from its own layer and those below it;
tests/test_layout.py checks it):
- utils, checkpoint, checks, cli: the cross-cutting helpers (errors, atomic files and caches, safe checkpoint
  loading, checking keys, composing configs)
- data/: dataset readers and generators, vocabulary, word vectors, the LightningDataModule
- features/: the pretrained CNNs, JPEG decoding, the cached feature extraction
- models/: the captioning models and their decoding (beam search, sampling)
- evaluation/: the COCO caption metrics and the vectorised CIDEr-D
- training/: preparing caches, the LightningModule, SCST, CUDA graphs, the callbacks, the sweep table
- serving/: a trained captioner loaded from its checkpoint, upload checks
- the commands: run, caption, evaluate, serve, download, extract (`python -m captioner.<command>`)
Nothing is imported here, so `python -m captioner.<command>` loads only what that command needs.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("captioner")
except PackageNotFoundError:  # run from a source tree without installing (the GPU machine's recipe)
    __version__ = "unknown"
