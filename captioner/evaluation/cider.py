"""CIDEr-D for whole batches of token-id captions, the SCST reward.

The formula is pycocoevalcap's `Cider` (which is CIDEr-D: clipped tf-idf n-gram vectors for n = 1..4, cosine
similarity with each reference, a Gaussian penalty on the length difference, the mean over n and references,
times 10). Instead of its per-caption Python dictionaries, every n-gram is coded as one integer; the document
frequencies are counted once with sorting, and a batch is scored with fixed-shape comparisons of the codes of each
hypothesis with those of its references (no `unique`, `nonzero` or boolean indexing, so no host sync on a GPU).

Captions are token-id rows: the words are the ids before the first <end> or <pad>. An n-gram's integer is its ids
read as digits in base `vocab_size`; ids are >= 1 (<pad> is 0), so n-grams of different lengths never collide and
the code is exact while vocab_size ** 4 fits an int64 (vocab_size <= 55,000).
"""
import math

import torch

from captioner.utils import CaptionerError
from captioner.data.vocab import END, PAD

N = 4
MAX_VOCAB = 55_000


def lengths_of(tokens):
    """Words before the first <end>/<pad> of each row."""
    stop = (tokens == END) | (tokens == PAD)
    return torch.where(stop.any(1), stop.int().argmax(1), torch.full_like(stop[:, 0], tokens.shape[1], dtype=torch.long))


def ngram_codes(tokens, base, missing=-1):
    """tokens [S, T] -> codes [S, 4, T]: the code of the n-gram (n = 1..4) that starts at each position, `missing`
    where there is none (past the caption's words); and the lengths [S]."""
    tokens = tokens.long()
    length = lengths_of(tokens)
    codes = torch.full((tokens.shape[0], N, tokens.shape[1]), missing, dtype=torch.long, device=tokens.device)
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    code = tokens
    for n in range(min(N, tokens.shape[1])):
        if n:
            code = code[:, :-1] * base + tokens[:, n:]
        codes[:, n, :code.shape[1]] = torch.where(pos[:code.shape[1]] + n < length[:, None], code, missing)
    return codes, length


class CiderD:
    """CIDEr-D with document frequencies from a reference corpus, computed once.

    `references` [I, R, L]: the token ids of up to R reference captions of each of I images (rows of <pad> where an
    image has fewer). The document frequency of an n-gram is the number of images whose references contain it.
    """

    def __init__(self, references, vocab_size: int, sigma: float = 6.0, chunk: int = 4096):
        if vocab_size > MAX_VOCAB:
            raise CaptionerError(f"vocab_size={vocab_size} is too large for the CIDEr-D reward's exact n-gram codes "
                                 f"(at most {MAX_VOCAB}).")
        self.base, self.sigma = vocab_size, sigma
        per_image = []
        for s in range(0, len(references), chunk):  # chunks bound the memory of the n-gram table
            codes, _ = ngram_codes(references[s:s + chunk].flatten(0, 1), self.base)
            codes = codes.view(-1, codes[0].numel() * references.shape[1]).sort(1).values  # an image's n-grams
            first = torch.ones_like(codes, dtype=torch.bool)
            first[:, 1:] = codes[:, 1:] != codes[:, :-1]
            per_image.append(codes[first & (codes >= 0)])  # each n-gram once per image
        self.df_codes, df = torch.unique(torch.cat(per_image), return_counts=True)
        self.log_df = df.double().log()
        self.ref_len = math.log(float(len(references)))

    def to(self, device):
        self.df_codes, self.log_df = self.df_codes.to(device), self.log_df.to(device)
        return self

    def _weights(self, codes, length):
        """Per n-gram position: its tf-idf weight (term frequency in the caption x idf), whether it is the n-gram's
        first occurrence there (so sums run over distinct n-grams), the norm per order [.., 4], and the length
        (pycocoevalcap counts the bigrams: the number of words minus one)."""
        same = codes[..., :, None] == codes[..., None, :]  # [.., 4, T, T]: positions holding the same n-gram
        first = ~same.tril(-1).any(-1) & (codes >= 0)
        pos = torch.searchsorted(self.df_codes, codes.clamp(min=0)).clamp(max=len(self.df_codes) - 1)
        log_df = torch.where(self.df_codes[pos] == codes, self.log_df[pos], 0.0)
        idf = self.ref_len - log_df  # log(max(1, df)): an unseen n-gram gets the full weight
        weight = same.sum(-1, dtype=torch.int32) * idf  # (an int32 sum of booleans: no int64 copy)
        norm = (torch.where(first, weight, 0.0) ** 2).sum(-1).sqrt()
        return weight, idf, first, norm, (length - 1).clamp(min=0)

    def __call__(self, hyps, refs, image_of):
        """hyps [S, T] token ids, refs [I, R, L] the references of the batch's images, image_of [S] the row of refs
        that each hypothesis describes -> CIDEr-D [S] (float64). Fixed shapes throughout: every n-gram of a
        hypothesis is compared with every n-gram of its image's references ([S, R, 4, T, L] comparisons, small for
        captions), so nothing waits for the device."""
        I, R, L = refs.shape
        image_of = image_of.long()
        h_codes, h_len = ngram_codes(hyps, self.base, missing=-1)
        r_codes, r_len = ngram_codes(refs.flatten(0, 1), self.base, missing=-2)  # never equal to a missing -1
        h_w, h_idf, h_first, h_norm, h_len = self._weights(h_codes, h_len)
        _, _, _, r_norm, r_len = self._weights(r_codes, r_len)
        r_codes = r_codes.view(I, R, N, L)[image_of]  # [S, R, 4, L]: the references of each hypothesis
        tf_ref = (h_codes[:, None, :, :, None] == r_codes[:, :, :, None, :]).sum(-1, dtype=torch.int32)  # [S, R, 4, T]
        ref_w = tf_ref * h_idf[:, None]  # the reference's weight of each hypothesis n-gram
        val = (torch.where(h_first[:, None], torch.minimum(h_w[:, None], ref_w) * ref_w, 0.0)).sum(-1)  # clipping
        denom = h_norm[:, None] * r_norm.view(I, R, N)[image_of]  # [S, R, 4]
        val = torch.where(denom != 0, val / torch.where(denom != 0, denom, 1.0), val)
        delta = (h_len[:, None] - r_len.view(I, R)[image_of]).double()
        val = val * torch.exp(-delta ** 2 / (2 * self.sigma ** 2))[:, :, None]  # Gaussian length penalty
        present = (refs[:, :, 0] != PAD)[image_of]  # [S, R]: real references, not padding rows
        return 10.0 * (val.mean(2) * present).sum(1) / present.sum(1).clamp(min=1)


def reference_tensor(dataset, max_refs: int = None):
    """A CaptionBatches' references as a dense [images, R, L] int32 tensor (R: the most captions of an image).
    Each caption ends with <end>, so one with no words (say, only punctuation) still counts as a reference, as in
    pycocoevalcap; rows of only <pad> are the slots of images with fewer captions."""
    import numpy as np

    start, count = np.asarray(dataset.cap_start), np.asarray(dataset.cap_count)
    R = int(count.max()) if max_refs is None else max_refs
    offsets = np.asarray(dataset.offsets)
    lengths = offsets[1:] - offsets[:-1]
    L = int(lengths.max()) + 1  # room for <end>
    out = np.zeros((len(start), R, L), dtype=np.int32)
    for r in range(R):  # a loop over reference slots only; images and words are whole-array
        has = count > r
        caps = start[has] + r
        targets = dataset.token_index(offsets[caps], lengths[caps], L)[1]  # words, <end>, then <pad>: as training's
        out[np.nonzero(has)[0], r] = dataset.host_tokens(targets)
    return torch.from_numpy(out)
