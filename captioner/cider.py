"""CIDEr-D for whole batches of token-id captions, the SCST reward.

The formula is pycocoevalcap's `Cider` (which is CIDEr-D: clipped tf-idf n-gram vectors for n = 1..4, cosine
similarity with each reference, a Gaussian penalty on the length difference, the mean over n and references,
times 10). Instead of its per-caption Python dictionaries, every n-gram is hashed to one integer and counted,
weighted and matched with sorting, `searchsorted` and scatter ops over the whole batch, on any device.

Captions are token-id rows: the words are the ids before the first <end> or <pad>. An n-gram's integer is its ids
read as digits in base `vocab_size`; ids are >= 1 (<pad> is 0), so n-grams of different lengths never collide and
the code is exact while vocab_size ** 4 fits an int64 (vocab_size <= 55,000).
"""
import math

import torch

from captioner.utils import CaptionerError
from captioner.vocab import END, PAD

N = 4
MAX_VOCAB = 55_000


def lengths_of(tokens):
    """Words before the first <end>/<pad> of each row."""
    stop = (tokens == END) | (tokens == PAD)
    return torch.where(stop.any(1), stop.int().argmax(1), torch.full_like(stop[:, 0], tokens.shape[1], dtype=torch.long))


def ngram_entries(tokens, base):
    """tokens [S, T] -> one entry per n-gram occurrence: (row, order n - 1, code), n = 1..4."""
    tokens = tokens.long()
    S, T = tokens.shape
    length = lengths_of(tokens)
    rows, orders, codes = [], [], []
    code = tokens
    for n in range(N):
        if n:
            code = code[:, :-1] * base + tokens[:, n:]
        if code.shape[1] == 0:
            break
        ok = torch.arange(code.shape[1], device=tokens.device)[None] + n < length[:, None]
        r, _ = ok.nonzero(as_tuple=True)
        rows.append(r)
        orders.append(torch.full_like(r, n))
        codes.append(code[ok])
    return torch.cat(rows), torch.cat(orders), torch.cat(codes), length


def _count(rows, orders, codes):
    """Distinct (row, n-gram) pairs with their counts (the term frequencies)."""
    uniq, inverse = torch.unique(codes, return_inverse=True)
    keys, slot, counts = torch.unique(rows * len(uniq) + inverse, return_inverse=True, return_counts=True)
    order = torch.zeros_like(keys).scatter_(0, slot, orders)  # the same code always has the same order
    return keys // len(uniq), order, uniq[keys % len(uniq)], counts


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
            refs = references[s:s + chunk]
            rows, orders, codes, _ = ngram_entries(refs.flatten(0, 1), self.base)
            image = rows // refs.shape[1] + s
            _, _, uniq_codes, _ = _count(image, orders, codes)  # each n-gram once per image
            per_image.append(uniq_codes)
        self.df_codes, df = torch.unique(torch.cat(per_image), return_counts=True)
        self.log_df = df.double().log()
        self.ref_len = math.log(float(len(references)))

    def to(self, device):
        self.df_codes, self.log_df = self.df_codes.to(device), self.log_df.to(device)
        return self

    def _vectors(self, tokens):
        """Sparse tf-idf vectors: entries (row, order, code, weight), the norm per row and order [S, 4], and the
        length (pycocoevalcap counts the bigrams: the number of words minus one)."""
        rows, orders, codes, length = ngram_entries(tokens, self.base)
        rows, orders, codes, tf = _count(rows, orders, codes)
        pos = torch.searchsorted(self.df_codes, codes).clamp(max=len(self.df_codes) - 1)
        log_df = torch.where(self.df_codes[pos] == codes, self.log_df[pos], torch.zeros_like(self.log_df[pos]))
        weight = tf.double() * (self.ref_len - log_df)  # log(max(1, df)): an unseen n-gram gets the full weight
        norm = torch.zeros(len(tokens), N, dtype=torch.float64, device=tokens.device)
        norm.index_put_((rows, orders), weight ** 2, accumulate=True)
        return rows, orders, codes, weight, norm.sqrt(), (length - 1).clamp(min=0)

    def __call__(self, hyps, refs, image_of):
        """hyps [S, T] token ids, refs [I, R, L] the references of the batch's images, image_of [S] the row of refs
        that each hypothesis describes -> CIDEr-D [S] (float64)."""
        I, R, _ = refs.shape
        h_row, h_ord, h_code, h_w, h_norm, h_len = self._vectors(hyps)
        r_row, r_ord, r_code, r_w, r_norm, r_len = self._vectors(refs.flatten(0, 1))
        # join hypothesis and reference n-grams on (image, code): a table of every reference's weight per key
        uniq, inv = torch.unique(torch.cat([h_code, r_code]), return_inverse=True)
        h_key = image_of.long()[h_row] * len(uniq) + inv[:len(h_code)]
        r_key = (r_row // R) * len(uniq) + inv[len(h_code):]
        keys, r_slot = torch.unique(r_key, return_inverse=True)
        table = torch.zeros(len(keys), R, dtype=torch.float64, device=hyps.device)
        table[r_slot, r_row % R] = r_w
        pos = torch.searchsorted(keys, h_key).clamp(max=max(len(keys) - 1, 0))
        found = (keys[pos] == h_key) if len(keys) else torch.zeros_like(h_key, dtype=torch.bool)
        ref_w = torch.where(found[:, None], table[pos] if len(keys) else table.new_zeros(len(h_key), R), 0.0)
        val = torch.zeros(len(hyps), N, R, dtype=torch.float64, device=hyps.device)
        val.index_put_((h_row, h_ord), torch.minimum(h_w[:, None], ref_w) * ref_w, accumulate=True)  # clipping
        ref_of = image_of.long()[:, None] * R + torch.arange(R, device=hyps.device)  # [S, R]
        denom = h_norm[:, :, None] * r_norm[ref_of].transpose(1, 2)  # [S, 4, R]
        val = torch.where(denom != 0, val / torch.where(denom != 0, denom, 1.0), val)
        delta = (h_len[:, None] - r_len[ref_of]).double()
        val = val * torch.exp(-delta ** 2 / (2 * self.sigma ** 2))[:, None, :]  # Gaussian length penalty
        present = (refs[:, :, 0] != PAD)[image_of.long()]  # [S, R]: real references, not padding rows
        return 10.0 * (val.mean(1) * present).sum(1) / present.sum(1).clamp(min=1)


def reference_tensor(dataset, max_refs: int = None):
    """A CaptionBatches' references as a dense [images, R, L] int32 tensor (R: the most captions of an image)."""
    import numpy as np

    start, count = np.asarray(dataset.cap_start), np.asarray(dataset.cap_count)
    R = int(count.max()) if max_refs is None else max_refs
    offsets = np.asarray(dataset.offsets)
    lengths = offsets[1:] - offsets[:-1]
    L = int(lengths.max())
    out = np.zeros((len(start), R, L), dtype=np.int32)
    ids = np.asarray(dataset.ids)
    for r in range(R):  # a loop over reference slots only; images and words are whole-array
        has = count > r
        caps = start[has] + r
        begin, n = offsets[caps], lengths[caps]
        pos = np.arange(L)
        words = ids[np.minimum(begin[:, None] + pos, len(ids) - 1)]
        out[np.nonzero(has)[0], r] = np.where(pos < n[:, None], words, PAD)
    return torch.from_numpy(out)
