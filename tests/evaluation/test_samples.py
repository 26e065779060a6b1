import json
import re

import pytest
from PIL import Image

from captioner.data.coco import load_split
from captioner.evaluate import main
from captioner.evaluation import metrics
from captioner.evaluation.samples import sections, write_samples

SCRIPT = "<script>alert(1)</script>"


def tiny_split(root, n=5):
    """A COCO-layout split of n small photos-to-be (flat colours) with two references each."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(1, n + 1):
        Image.new("RGB", (320, 200), (40 * i, 90, 200 - 30 * i)).save(root / "val2017" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg"})
        anns += [{"id": 2 * i, "image_id": i, "caption": f"a red circle number {i} on a blue square"},
                 {"id": 2 * i + 1, "image_id": i, "caption": f"a small red circle {i} & {SCRIPT}"}]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return load_split(root, "val2017")


def page_sections(page: str) -> dict:
    return {m[0]: m[1] for m in re.findall(r"<h2>(\w+) .*?</h2>(.*?)(?=<h2>|</body>)", page, re.S)}


def test_samples_page_for_a_tiny_split(tmp_path):
    split = tiny_split(tmp_path / "data")
    captions = ["a red circle number 1 on a blue square", "a red circle on a square", "a green triangle",
                SCRIPT, "a red circle number 5"]
    results = [{"image_id": i, "caption": c} for i, c in zip(split.image_ids, captions)]
    cider = {}
    metrics.score(results, dict(zip(split.image_ids, split.captions)), spice=False, per_image=cider)
    out = tmp_path / "eval" / "x-samples.html"
    write_samples(out, split, results, cider, "tiny val", ["5 images"])
    page = out.read_text()

    found = page_sections(page)
    assert list(found) == ["Best", "Median", "Worst"]
    scores = {name: [float(v) for v in re.findall(r"CIDEr ([\d.]+)", body)] for name, body in found.items()}
    assert min(scores["Best"]) >= max(scores["Median"]) and min(scores["Median"]) >= max(scores["Worst"])
    # fewer than 24 images: every image once, none twice
    shown = re.findall(r'alt="(\d+)\.jpg"', page)
    assert sorted(shown) == [str(i) for i in split.image_ids]
    assert page.count('src="data:image/jpeg;base64,') == len(split.image_ids)
    # generated captions and references, escaped: no live markup from the data
    assert "<script>" not in page and page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 5 + 1
    assert page.count("a red circle number 3 on a blue square") == 1 and "circle 3 &amp; " in page
    assert "a green triangle" in page and "<title>tiny val</title>" in page


def test_sections_take_the_ends_and_the_middle_of_a_long_list():
    got = sections(list(range(100)))
    assert got == {"Best": list(range(8)), "Median": list(range(46, 54)), "Worst": list(range(92, 100))}
    assert sum(sections(list(range(24))).values(), []) == list(range(24))


@pytest.mark.slow
def test_evaluate_writes_its_samples_page_beside_its_results(trained, tmp_path):
    root = trained["cfg"].data.root
    main([f"ckpt_path={trained['ckpt']}", "data=coco", f"data.root={root}", "split=val2017", "max_images=6",
          "spice=false", f"output_dir={tmp_path}", f"paths.data_dir={trained['cfg'].paths.data_dir}"])
    stem = "coco-val2017-last-beam3-len20-nr2"
    report = json.loads((tmp_path / f"{stem}-metrics.json").read_text())
    page = (tmp_path / f"{stem}-samples.html").read_text()
    assert report["samples"] == str(tmp_path / f"{stem}-samples.html")
    results = json.loads((tmp_path / f"{stem}-results.json").read_text())
    assert page.count("data:image/jpeg;base64,") == len(results) == 6
    assert all(json.dumps(r["caption"])[1:-1] in page for r in results)  # plain-word captions, escaped or not
