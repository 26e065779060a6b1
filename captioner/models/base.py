"""The captioning-model interface and the registry of models (name -> class).

Training, decoding, SCST, scheduled sampling, caption, evaluate and serve use a model only through these methods,
so a new model is one file (a registered CaptionModel subclass) plus one YAML in conf/model/.
"""
from torch import nn

MODELS = {}  # registry name -> CaptionModel subclass (filled by @register_model)


def register_model(name: str):
    """Class decorator: `model=<name>` configs and checkpoints recording <name> build this class."""
    def add(cls):
        MODELS[name] = cls
        return cls
    return add


def _map_state(state, fn):
    return tuple(_map_state(s, fn) for s in state) if isinstance(state, tuple) else fn(state)


class CaptionModel(nn.Module):
    """Built as cls(feature_dim, vocab_size, embedding, **args): image features [B, feature_dim] and a WordEmbedding
    of the vocabulary in; next-word scores over vocab_size words out. The decoding state is a tensor or a tuple of
    tensors whose dimension `state_batch_dim` runs over the batch (override the two state methods otherwise).

    `feature_kind` says which features the model takes, and so which ones a run extracts: "pooled", one vector per
    image [B, feature_dim], or "grid", the encoder's last feature map as N = H*W vectors [B, N, feature_dim],
    everywhere features appear below (attention models).

    `aux_loss`: a model whose training objective has a term of its own (an attention regulariser) sets it, a scalar
    tensor, in each `forward` (None when there is none); the training module adds it to the cross-entropy of the
    training steps. No model-specific code is needed there."""
    state_batch_dim = 1  # an RNN's (layers, batch, hidden)
    feature_kind = "pooled"
    aux_loss = None

    @property
    def vocab_size(self) -> int:
        """By default the output layer's size: models name their output Linear `out`."""
        return self.out.out_features

    def initial_state(self, features):
        """Image features [B, feature_dim] (grid: [B, N, feature_dim]) -> the decoding state before the first word."""
        raise NotImplementedError

    def forward(self, features, inputs, state=None):
        """Teacher forcing: input words [B, T] -> hidden outputs [B, T, H] (scored by `logits`) and the last state."""
        raise NotImplementedError

    def logits(self, hidden):
        """Hidden outputs [..., H] -> next-word scores [..., vocab_size] (by default, the output Linear `out`)."""
        return self.out(hidden)

    def step(self, words, state):
        """One decoding step: previous words [B] and the state -> next-word scores [B, vocab_size], the new state."""
        raise NotImplementedError

    def attention_maps(self, features, inputs):
        """Teacher-forced over input words [B, T] (<start> first) -> attention weights [B, T, N] over the N grid
        vectors, each row summing to one; None for a model without attention."""
        return None

    def reorder_state(self, state, index):
        """Beam search: keep/copy the batch rows `index` of the state."""
        return _map_state(state, lambda s: s.index_select(self.state_batch_dim, index))

    def repeat_state(self, state, k: int):
        """Beam search: each batch row k times in a row (rows i*k .. i*k+k-1 are image i's beams)."""
        return _map_state(state, lambda s: s.repeat_interleave(k, self.state_batch_dim))
