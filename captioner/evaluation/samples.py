"""A samples page to look at after an evaluation: the best, median and worst images of a split by per-image CIDEr,
each with its generated caption and references. One self-contained HTML file (thumbnails embedded as base64 JPEG,
no JavaScript), so it opens anywhere and can be mailed."""
import base64
import html
import io
import logging

from PIL import Image

from captioner.data.coco import CaptionSplit
from captioner.utils import atomic_write_text, to_rgb

log = logging.getLogger(__name__)

PER_SECTION = 8
THUMB = 224  # px on the long side: ~10 KB of JPEG per image

CSS = """body{font:14px/1.4 sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px}
.card img{display:block;max-width:224px;max-height:224px;margin:0 auto 6px}
.gen{font-weight:bold}.cider{float:right;color:#555;font-variant-numeric:tabular-nums}
ul{margin:4px 0 0;padding-left:18px;color:#555}.meta{color:#555}.file{color:#999;font-size:12px;margin-top:4px}"""


def sections(ids_by_score: list) -> dict:
    """Image ids sorted by CIDEr, high to low -> {"Best": ids, "Median": ids, "Worst": ids}: PER_SECTION each, or
    with fewer than 3 * PER_SECTION images all of them in three near-equal parts (each image shown once)."""
    n, k = len(ids_by_score), PER_SECTION
    if n <= 3 * k:
        a, b = round(n / 3), round(2 * n / 3)
        return {"Best": ids_by_score[:a], "Median": ids_by_score[a:b], "Worst": ids_by_score[b:]}
    mid = n // 2 - k // 2  # the middle k: with n > 3k clear of the first and last k
    return {"Best": ids_by_score[:k], "Median": ids_by_score[mid:mid + k], "Worst": ids_by_score[-k:]}


def thumbnail(path) -> str:
    """The image at `path` as a data: URI of a JPEG at most THUMB px on its long side."""
    with Image.open(path) as im:
        im = to_rgb(im)
        im.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def card(path, caption: str, references: list, cider: float) -> str:
    try:
        img = f'<img src="{thumbnail(path)}" alt="{html.escape(path.name)}">'
    except OSError as e:  # one unreadable file spoils one card, not the page
        img = f'<p class="meta">cannot read {html.escape(str(path))}: {html.escape(str(e))}</p>'
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in references)
    return (f'<div class="card">{img}<span class="cider">CIDEr {cider:.3f}</span>'
            f'<div class="gen">{html.escape(caption)}</div><ul>{refs}</ul>'
            f'<div class="file">{html.escape(path.name)}</div></div>')


def samples_page(split: CaptionSplit, results: list, cider: dict, title: str, notes=()) -> str:
    """The page's HTML for `results` (a COCO results list) on `split`, `cider` being {image_id: CIDEr}."""
    row = {i: n for n, i in enumerate(split.image_ids)}
    caption = {r["image_id"]: r["caption"] for r in results}
    ranked = sorted(cider, key=lambda i: -cider[i])
    body = [f"<h1>{html.escape(title)}</h1>"]
    body += [f'<div class="meta">{html.escape(note)}</div>' for note in
             [*notes, "Each image: its generated caption (bold), its CIDEr, its reference captions."]]
    for name, ids in sections(ranked).items():
        body.append(f"<h2>{name} {len(ids)} of {len(ranked)} images by CIDEr</h2><div class=\"grid\">")
        body += [card(split.image_dir / split.files[row[i]], caption[i], split.captions[row[i]], cider[i])
                 for i in ids]
        body.append("</div>")
    page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return page.encode("ascii", "xmlcharrefreplace").decode()  # readable whatever encoding the file is opened in


def write_samples(path, split: CaptionSplit, results: list, cider: dict, title: str, notes=()) -> None:
    atomic_write_text(path, samples_page(split, results, cider, title, notes))
    log.info("Wrote the samples page %s.", path)
