"""Caption metrics exactly as the COCO caption evaluation (pycocoevalcap) computes them, minus its surprises.

`score` calls pycocoevalcap's tokenizer and scorers itself instead of going through COCOEvalCap, because
COCOEvalCap always runs SPICE, whose constructor downloads Stanford CoreNLP (~400 MB) when it is missing. Here
SPICE runs only when its jars are already installed, and without java BLEU, ROUGE-L and CIDEr still come out.
For the same inputs the values equal COCOEvalCap's (tests/test_evaluate.py checks it).
"""
import functools
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pycocoevalcap.spice.spice as spice_module
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.get_stanford_models import JAR as CORENLP_JAR
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

from captioner.utils import CaptionerError

log = logging.getLogger(__name__)

# Characters the Java tokenizer treats as line ends: inside a caption they would shift every later caption onto
# the wrong image (COCOEvalCap itself only guards against "\n"), so they become spaces first.
_LINE_BREAKS = re.compile(r"[\n\r\v\f\u2028\u2029]")

# A Python stand-in for Stanford's PTBTokenizer (-lowerCase -preserveLines) as pycocoevalcap uses it, for machines
# without java: lowercase; split off punctuation, clitics ('s n't 're ...) and # $ %; keep numbers (3.5, 1,000,
# 9:30), acronyms (u.s.), hyphenated and slashed words whole; brackets become -lrb- etc. (kept, as with the Java
# tokenizer: PUNCTUATIONS only lists the upper-case forms); then drop pycocoevalcap's PUNCTUATIONS.
# It reproduces the Java output on all 795 coco-mini captions; rarer constructions may still differ.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "``"}
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "inc.", "co.", "no.", "ft.", "mt."}
_TOKEN = re.compile(r"""
    \d+(?:[.,:]\d+)+              # 3.5  1,000  9:30
  | (?:[a-z]\.){2,}               # u.s.  a.m.
  | \w+(?:[-'/&.]\w+)*(?=n't)     # the stem before n't: do|n't
  | n't | '(?:s|re|ve|ll|d|m)\b   # clitics, split off as PTB does
  | \w+(?:[-/&.]\w+)*\.?          # words; a trailing period is split off below unless an abbreviation
  | \.{2,} | [!?]+ | --+ | \S      # punctuation runs, anything else one character at a time
""", re.X)


def ptb_tokenize(text: str) -> str:
    tokens = []
    for t in _TOKEN.findall(text.lower()):
        if len(t) > 1 and t.endswith(".") and not re.fullmatch(r"(?:[a-z]\.)+|\.+", t) and t not in _ABBREVIATIONS:
            tokens += [t[:-1], "."]
        else:
            tokens.append("..." if re.fullmatch(r"\.{2,}", t) else _BRACKETS.get(t, t))
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize(captions: dict, java: bool) -> dict:
    """{image_id: [caption, ...]} -> the same with pycocoevalcap's tokenization (the Java one when available)."""
    if not java:
        return {i: [ptb_tokenize(c) for c in caps] for i, caps in captions.items()}
    return PTBTokenizer().tokenize({i: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps]
                                    for i, caps in captions.items()})


def spice_missing(java: bool):
    """Why SPICE cannot run here without a download, or None when it can. Only looks at files: calling Spice()
    is what downloads."""
    if not java:
        return "java not found"
    spice_dir = Path(spice_module.__file__).parent
    needed = [spice_dir / spice_module.SPICE_JAR, spice_dir / "lib" / f"{CORENLP_JAR}.jar",
              spice_dir / "lib" / f"{CORENLP_JAR}-models.jar"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        return (f"{', '.join(missing)} not installed in {spice_dir} (install once with `python -c \"from "
                f"pycocoevalcap.spice.get_stanford_models import get_stanford_models as g; g()\"`)")
    return None


@functools.cache
def _warn_no_java():  # once per process: the training loop may score every epoch
    log.warning("java not found: METEOR and SPICE are skipped, and captions are tokenized by a Python stand-in for "
                "the PTB tokenizer (captioner.evaluation.metrics.ptb_tokenize); install a JRE for the official numbers.")


def validate_results(results, image_ids) -> dict:
    """A COCO results list ([{"image_id": int, "caption": str}, ...]) -> {image_id: caption}, or a CaptionerError
    naming what is wrong: every image in `image_ids` needs exactly one caption, and no other image may have one."""
    if not isinstance(results, list):
        raise CaptionerError('results must be a JSON list of {"image_id": ..., "caption": ...} objects.')
    captions, duplicates = {}, []
    for n, r in enumerate(results):
        image_id = r.get("image_id") if isinstance(r, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(r.get("caption"), str):
            raise CaptionerError(f"result #{n} ({str(r)[:80]}) is not an object with an integer 'image_id' "
                                 f"and a string 'caption'.")
        if image_id in captions:
            duplicates.append(image_id)
        captions[image_id] = r["caption"]
    expected = set(image_ids)
    problems = [f"{len(ids)} {what} ({', '.join(map(str, sorted(ids)[:5]))}{', ...' if len(ids) > 5 else ''})"
                for what, ids in [("image ids not in the annotations", set(captions) - expected),
                                  ("annotated images without a result", expected - set(captions)),
                                  ("image ids with more than one result", set(duplicates))] if ids]
    if problems:
        raise CaptionerError(f"results do not match the annotations: {'; '.join(problems)}; expected one caption "
                             f"for each of the {len(expected)} annotated images.")
    return captions


_meteor = None


def meteor(gts, res) -> float:
    """METEOR through one java process per Python process: starting it (the JVM and its paraphrase tables) takes
    ~6 s, and training scores its captions every eval_every epochs. A process that died or a failed exchange (which
    leaves the stream mid-answer) starts a new one next time."""
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        _meteor = Meteor()
    try:
        return float(_meteor.compute_score(gts, res)[0])
    except BaseException:
        broken, _meteor = _meteor, None
        if broken.lock.locked():  # compute_score holds it until its answer is read; Meteor.__del__ takes it too
            broken.lock.release()
        raise


def score(results, references: dict, spice: bool = True, per_image: dict = None) -> dict:
    """COCO caption metrics of `results` (a COCO results list) against `references` ({image_id: [caption, ...]},
    every image with at least one caption). Keys as pycocoevalcap names them: Bleu_1..Bleu_4, METEOR, ROUGE_L,
    CIDEr, SPICE; a metric that cannot run here is replaced by `<name>_skipped` with the reason.
    `per_image`: a dict to fill with each image's CIDEr ({image_id: float}), from the same computation."""
    captions = validate_results(results, references)
    java = shutil.which("java") is not None
    if not java:
        _warn_no_java()
    gts = tokenize({i: list(refs) for i, refs in references.items()}, java)
    res = tokenize({i: [captions[i]] for i in references}, java)
    metrics = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"Bleu_{n}": float(b) for n, b in enumerate(bleu, 1)})
    if java:
        metrics["METEOR"] = meteor(gts, res)
    else:
        metrics["METEOR_skipped"] = "java not found"
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    cider, cider_each = Cider().compute_score(gts, res)  # per image in the order of gts' keys
    metrics["CIDEr"] = float(cider)
    if per_image is not None:
        per_image.update(zip(gts, map(float, cider_each)))
    reason = spice_missing(java) if spice else "disabled (spice=false)"
    if reason is None:
        try:  # its jar needs 8 GB of heap and an old-Java-friendly runtime; the other metrics stay valid without it
            metrics["SPICE"] = float(spice_module.Spice().compute_score(gts, res)[0])
        except (subprocess.CalledProcessError, OSError) as e:
            log.warning("SPICE failed (%s); reporting the other metrics.", e)
            reason = f"failed: {e}"
    if reason is not None:
        metrics["SPICE_skipped"] = reason
    return metrics
