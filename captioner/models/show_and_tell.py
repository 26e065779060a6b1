"""Show and Tell: image features -> Linear -> ReLU -> initial RNN hidden state; words in, next-word scores out."""
import torch
import torch.nn.functional as F
from torch import nn

from captioner.models.base import CaptionModel, register_model
from captioner.models.layers import WordEmbedding  # noqa: F401 (imported from here by callers)
from captioner.utils import CaptionerError

RNNS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
CELLS = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn": torch.rnn_tanh_cell}  # one step, same weights


@register_model("show_and_tell")
class ShowAndTell(CaptionModel):
    def __init__(self, feature_dim: int, vocab_size: int, embedding: WordEmbedding, hidden_size: int = 512,
                 num_layers: int = 1, rnn_type: str = "lstm", blind: bool = False, dropout: float = 0.0):
        super().__init__()
        if str(rnn_type).lower() not in RNNS:
            raise CaptionerError(f"rnn_type={rnn_type} is not one of {', '.join(RNNS)}.")
        self.blind = blind  # ablation: zero the image features, leaving a language model (the blind baseline)
        self.rnn_type, self.num_layers, self.hidden_size = rnn_type.lower(), num_layers, hidden_size
        self.init_hidden = nn.Linear(feature_dim, hidden_size * num_layers)
        self.embed = embedding
        self.rnn = RNNS[self.rnn_type](embedding.weight.shape[1], hidden_size, num_layers, batch_first=True)
        # the same Parameter objects in a plain list, for cell_step: torch.compile refuses to look inside nn.LSTM
        self.layer_weights = self.rnn.all_weights
        self.out = nn.Linear(hidden_size, vocab_size)
        self.drop = nn.Dropout(dropout)  # on the word vectors and on the RNN output before `out` (training only)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.layer_weights = self.rnn.all_weights  # the RNN's current Parameter objects, after a move or a cast
        return self

    def initial_state(self, features):
        """The features become the hidden state of every layer; an LSTM's cell state starts at zero."""
        h = F.relu(self.init_hidden(torch.zeros_like(features) if self.blind else features))
        h = h.view(-1, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()
        return (h, torch.zeros_like(h)) if self.rnn_type == "lstm" else h

    def forward(self, features, inputs, state=None):
        """Teacher forcing: hidden states for every input position, (batch, time, hidden), and the last state."""
        if state is None:
            state = self.initial_state(features)
        out, state = self.rnn(self.drop(self.embed(inputs)), state)
        return self.drop(out), state

    def step(self, words, state):
        """One decoding step: the previous words [B] and the state -> next-word logits [B, V] and the new state.
        Beam search, sampling and self-critical training all advance the RNN through this. torch.compile cannot
        trace nn.LSTM, so a compiled step runs the same weights through each layer's single-step cell instead."""
        if torch.compiler.is_compiling():
            x, state = self.cell_step(self.drop(self.embed(words)), state)
            return self.out(self.drop(x)), state
        out, state = self.rnn(self.drop(self.embed(words[:, None])), state)
        return self.out(self.drop(out[:, -1])), state

    def cell_step(self, x, state):
        """The RNN over one input [B, emb] with torch.lstm_cell / gru_cell / rnn_tanh_cell per layer -> its output
        [B, hidden] and the new state, as nn.LSTM/GRU/RNN would give for a one-word sequence."""
        lstm = self.rnn_type == "lstm"
        h, c = state if lstm else (state, None)
        hs, cs = [], []
        for layer in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights[layer]
            if lstm:
                x, c_layer = CELLS["lstm"](x, (h[layer], c[layer]), w_ih, w_hh, b_ih, b_hh)
                cs.append(c_layer)
            else:
                x = CELLS[self.rnn_type](x, h[layer], w_ih, w_hh, b_ih, b_hh)
            hs.append(x)
        h = torch.stack(hs)
        return x, ((h, torch.stack(cs)) if lstm else h)
