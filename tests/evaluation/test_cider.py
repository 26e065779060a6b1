import math
import random

import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioner.evaluation.cider import CiderD
from captioner.data.vocab import END, PAD

WORDS = "a an the dog cat man woman red blue big small on near of with sitting running grass".split()


def encode(caps, word_id, width):
    rows = torch.full((len(caps), width), PAD, dtype=torch.long)
    for i, c in enumerate(caps):
        ids = [word_id[w] for w in c.split()]
        rows[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        if len(ids) < width:
            rows[i, len(ids)] = END
    return rows


def random_set(seed, n_images=40):
    rng = random.Random(seed)
    cap = lambda: " ".join(rng.choice(WORDS[:10] if rng.random() < .5 else WORDS) for _ in range(rng.randint(0, 12)))
    refs = {i: [cap() or "dog" for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    # hypotheses: some copies of a reference, some random (also empty and one-word ones)
    hyps = {i: rng.choice(refs[i]) if rng.random() < .3 else cap() for i in range(n_images)}
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_cider_with_the_same_document_frequencies(seed):
    refs, hyps = random_set(seed)
    expected_mean, expected = Cider().compute_score(refs, {i: [h] for i, h in hyps.items()})
    word_id = {w: i + 4 for i, w in enumerate(WORDS)}
    R, L = max(map(len, refs.values())), 14
    ref_t = torch.full((len(refs), R, L), PAD, dtype=torch.long)
    for i, caps in refs.items():
        ref_t[i, :len(caps)] = encode(caps, word_id, L)
    cider = CiderD(ref_t, vocab_size=len(WORDS) + 4)  # document frequencies of these references, as pycocoevalcap
    got = cider(encode([hyps[i] for i in range(len(hyps))], word_id, L), ref_t, torch.arange(len(hyps)))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert abs(got.mean().item() - expected_mean) < 1e-6
    # the same hypotheses in another order, scored against a repeated image index, give the same values
    perm = torch.randperm(len(hyps), generator=torch.Generator().manual_seed(seed))
    again = cider(encode([hyps[i] for i in perm.tolist()], word_id, L), ref_t, perm)
    assert torch.allclose(again, got[perm])


def test_clipping_length_penalty_and_times_ten_on_a_worked_example():
    """Three images (so idf is not zero), one reference for image 0: "a b c" (ids 4 5 6); others unrelated.
    df: a, b, c, "a b", "b c", "a b c" occur in image 0 only: idf = log(3) - log(1) = log 3 for each.
    Hypothesis "a a a" (ids 4 4 4): unigram tf("a") = 3, weight 3 log3; the reference's is log3.
      clipped unigram dot = min(3 log3, log3) * log3 = log3^2;  norms: 3 log3 and sqrt(3) log3
      unigram cosine = 1 / (3 sqrt 3);  bigram "a a" is not in the reference: 0; no 3-/4-grams match.
      lengths (bigram counts): 2 and 2: no penalty.  CIDEr-D = 10 * mean over n = 10 / (3 sqrt 3) / 4.
    Unclipped it would be 3 log3^2 / (3 log3 * sqrt3 log3) = 1/sqrt3 for unigrams."""
    refs = torch.tensor([[[4, 5, 6, PAD, PAD, PAD, PAD]], [[7, 8, PAD, PAD, PAD, PAD, PAD]],
                         [[9, 8, PAD, PAD, PAD, PAD, PAD]]])
    cider = CiderD(refs, vocab_size=10)
    got = cider(torch.tensor([[4, 4, 4, END]]), refs, torch.tensor([0]))
    assert got.item() == pytest.approx(10 / (3 * math.sqrt(3)) / 4, abs=1e-9)
    # the reference itself: orders 1-3 match with cosine 1; a 3-word caption has no 4-gram (0): 10 * 3 / 4
    assert cider(torch.tensor([[4, 5, 6, END]]), refs, torch.tensor([0])).item() == pytest.approx(7.5)
    # Gaussian length penalty: the reference plus 6 words no reference has (idf log 3 as well, df counted as 1):
    # 9 unigrams vs 3 -> cos 3 / (3 sqrt 3); 8 bigrams vs 2 -> 2 / (sqrt 8 sqrt 2); 7 trigrams vs 1 -> 1 / sqrt 7;
    # lengths 8 and 2 bigrams: delta 6, penalty exp(-36 / (2 * 6^2)) on every order
    cider20 = CiderD(refs, vocab_size=20)
    long_hyp = torch.tensor([[4, 5, 6, 10, 11, 12, 13, 14, 15, END]])
    expected = 10 * (1 / math.sqrt(3) + 0.5 + 1 / math.sqrt(7) + 0) / 4 * math.exp(-0.5)
    assert cider20(long_hyp, refs, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-9)


def test_too_large_vocabulary_is_named():
    from captioner.utils import CaptionerError
    with pytest.raises(CaptionerError, match="vocab_size=60000 is too large"):
        CiderD(torch.ones(1, 1, 3, dtype=torch.long), vocab_size=60000)


def test_references_of_a_dataset_count_a_caption_without_words_as_pycocoevalcap_does():
    """reference_tensor ends every reference with <end>: a caption that tokenizes to no words ("!!!") is still one
    of the image's references (it divides the mean), not an empty slot."""
    import numpy as np

    from captioner.evaluation.cider import reference_tensor
    from captioner.data.datamodule import CaptionBatches

    refs, hyps = random_set(3, n_images=12)
    refs[0].append("")  # say "!!!", after punctuation is dropped
    refs[5].insert(0, "")
    word_id = {w: i + 4 for i, w in enumerate(WORDS)}
    caps = [c for i in range(len(refs)) for c in refs[i]]
    counts = np.array([len(refs[i]) for i in range(len(refs))])
    lengths = np.array([len(c.split()) for c in caps])
    ds = CaptionBatches(np.zeros((len(refs), 2), np.float16), np.arange(len(refs)),
                        np.array([word_id[w] for c in caps for w in c.split()]),
                        np.concatenate([[0], np.cumsum(lengths)]), np.concatenate([[0], np.cumsum(counts)[:-1]]),
                        counts)
    ref_t = reference_tensor(ds)
    _, expected = Cider().compute_score(refs, {i: [h] for i, h in hyps.items()})
    cider = CiderD(ref_t, vocab_size=len(WORDS) + 4)
    got = cider(encode([hyps[i] for i in range(len(hyps))], word_id, 14), ref_t, torch.arange(len(hyps)))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
