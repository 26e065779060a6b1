"""Attention maps people can look at (Show, Attend and Tell's Figure 2): the image, then one panel per generated
word with where the model looked for it, the word's attention row over the H x W grid smoothly upsampled onto the
image. The rows come from the model's teacher-forced `attention_maps` over the caption it generated, so decoding
itself is untouched. Used by `caption attention=true`, the web page (the numbers) and TensorBoard's samples."""
import io
import math

import numpy as np
import torch

from captioner.data.vocab import PAD, START, UNK
from captioner.models.base import CaptionModel
from captioner.utils import CaptionerError, atomic_write_bytes

PANEL = 2.0  # inches a side per panel
DPI = 80  # so a panel is 160 px: a PNG is columns x 160 by rows x 160 px
COLUMNS = 6
END_WORD = "<end>"  # the last panel: where the model looked when it chose to stop


def has_attention(model: CaptionModel) -> bool:
    return type(model).attention_maps is not CaptionModel.attention_maps


def grid_shape(n: int) -> tuple:
    """The H x W grid of n vectors: square, as the encoder's input is squashed to a square (features.encoders)."""
    side = math.isqrt(n)
    if side * side != n:
        raise CaptionerError(f"attention maps need a square grid of image vectors; this encoder gives {n}.")
    return side, side


@torch.no_grad()
def attention_rows(model: CaptionModel, vocab, features, captions) -> list:
    """Grid features [B, N, D] and one generated caption per row -> per caption an array [T, N] (T = its words + 1):
    row t is the attention with which word t was chosen, the last row <end>'s; each row sums to one."""
    words = [c.split() for c in captions]
    inputs = torch.full((len(words), max(map(len, words)) + 1), PAD, dtype=torch.long)
    inputs[:, 0] = START
    for i, ws in enumerate(words):  # decoding never emits <unk>, so every generated word is in the vocabulary
        inputs[i, 1:len(ws) + 1] = torch.tensor([vocab.stoi.get(w, UNK) for w in ws], dtype=torch.long)
    was_training = model.training
    model.eval()
    # pads come after each caption's words: its rows before them do not depend on them (causal models)
    maps = model.attention_maps(features.float(), inputs.to(features.device)).float().cpu().numpy()
    model.train(was_training)
    return [maps[i, :len(ws) + 1] for i, ws in enumerate(words)]


def attention_figure(image, caption: str, rows: np.ndarray):
    """A matplotlib Figure: the image, then per word (and <end>) its attention row as an H x W map over it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in the server's worker thread

    words = caption.split() + [END_WORD]
    h, w = grid_shape(rows.shape[1])
    panels = len(words) + 1
    cols = min(COLUMNS, panels)
    lines = math.ceil(panels / cols)
    fig = Figure(figsize=(cols * PANEL, lines * PANEL), dpi=DPI)
    axes = fig.subplots(lines, cols, squeeze=False).ravel()
    image = image.convert("RGB")  # a copy: the caller's image stays as it is
    image.thumbnail((2 * PANEL * DPI, 2 * PANEL * DPI))  # a panel's pixels, not a 24-megapixel photo's, per panel
    pixels = np.asarray(image)
    extent = (0, pixels.shape[1], pixels.shape[0], 0)  # the grid covers the whole (squashed) image
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= panels:
            continue
        ax.imshow(pixels)
        if i == 0:
            continue
        grid = rows[i - 1].reshape(h, w)
        # bright where the model looked, dark elsewhere (the paper's white mask); each panel scaled to its peak
        ax.imshow(grid, cmap="gray", alpha=0.6, extent=extent, interpolation="bicubic", vmin=0,
                  vmax=float(grid.max()) or 1.0)
        ax.set_title(words[i - 1], fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.2)
    return fig


def figure_png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)  # exactly figsize x dpi pixels (no tight bounding box)
    return buf.getvalue()


def write_attention_png(path, image, caption: str, rows: np.ndarray) -> None:
    atomic_write_bytes(path, figure_png(attention_figure(image, caption, rows)))
