import json
import logging
import shutil

import pytest
import torch

from captioner.evaluation import metrics
from captioner.data.coco import load_split
from captioner.evaluate import compose_evaluate, main, read_references
from conftest import require_coco_mini

METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is needed for the official tokenizer/METEOR")


@pytest.fixture(scope="module")
def human(tmp_path_factory):
    """coco-mini val as a 'captioner' that answers with each image's first human caption; annotation files with
    the other four captions ("rest") and with all five ("all")."""
    ann_file = require_coco_mini() / "annotations" / "captions_val2017.json"
    data = json.loads(ann_file.read_text())
    first = {}
    for ann in data["annotations"]:
        first.setdefault(ann["image_id"], ann)
    rest = tmp_path_factory.mktemp("human") / "captions_rest.json"
    others = [a for a in data["annotations"] if first[a["image_id"]] is not a]
    rest.write_text(json.dumps({**data, "annotations": others}))
    results = [{"image_id": i, "caption": a["caption"]} for i, a in first.items()]
    return {"results": results, "rest": rest, "all": ann_file}


def official(ann_file, results):
    """pycocoevalcap's own pipeline, COCOEvalCap on pycocotools COCO objects, with SPICE left out (it would
    download Stanford CoreNLP)."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    coco = COCO(str(ann_file))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycocoevalcap.eval, "Spice", NoSpice)
        evaluator = pycocoevalcap.eval.COCOEvalCap(coco, coco.loadRes(results))
        evaluator.evaluate()
    return {k: evaluator.eval[k] for k in METRICS}


@pytest.fixture(scope="module")
def official_rest(human):
    return official(human["rest"], human["results"])


def never_download(*args, **kwargs):
    raise AssertionError("SPICE tried to download Stanford CoreNLP")


@pytest.mark.slow  # METEOR loads its paraphrase table in each run: ~15 s
@needs_java
@pytest.mark.parametrize("refs", ["rest", "all"])
def test_scores_equal_cocoevalcap(human, official_rest, refs, monkeypatch):
    monkeypatch.setattr("pycocoevalcap.spice.get_stanford_models.urlretrieve", never_download)
    ours = metrics.score(human["results"], read_references(human[refs]))
    expected = official_rest if refs == "rest" else official(human["all"], human["results"])
    assert {k: ours[k] for k in METRICS} == pytest.approx(expected, abs=1e-6)  # 6 decimals: same computation
    assert "SPICE" in ours or "SPICE_skipped" in ours
    if refs == "all":  # the hypothesis is one of the references
        assert ours["Bleu_4"] == pytest.approx(1.0)


@needs_java
def test_python_tokenizer_matches_ptb_on_coco_mini(human):
    captions = {n: [a["caption"]] for n, a in enumerate(json.loads(human["all"].read_text())["annotations"])}
    java = metrics.tokenize(captions, java=True)
    assert {n: [metrics.ptb_tokenize(c) for c in caps] for n, caps in captions.items()} == java


def test_without_java_bleu_rouge_cider_still_come(human, official_rest, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java anywhere: any attempt to run it would fail loudly
    metrics._warn_no_java.cache_clear()
    with caplog.at_level(logging.WARNING):
        ours = metrics.score(human["results"], read_references(human["rest"]))
    assert "java not found" in caplog.text
    assert ours["METEOR_skipped"] == "java not found" and "SPICE_skipped" in ours and "METEOR" not in ours
    # the Python tokenizer agrees with the Java one on coco-mini, so the numbers are the official ones
    for k in ["Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"]:
        assert ours[k] == pytest.approx(official_rest[k], abs=1e-6)


def test_results_must_match_annotation_ids():
    ids = [1, 2, 3, 4, 5, 6, 7]
    good = [{"image_id": i, "caption": "a cat"} for i in ids]
    assert metrics.validate_results(good, ids) == {i: "a cat" for i in ids}
    bad = good[2:] + [{"image_id": 99, "caption": "a dog"}, {"image_id": 3, "caption": "again"}]
    with pytest.raises(metrics.CaptionerError) as e:
        metrics.validate_results(bad, ids)
    message = str(e.value)
    assert "1 image ids not in the annotations (99)" in message
    assert "2 annotated images without a result (1, 2)" in message
    assert "1 image ids with more than one result (3)" in message
    many_missing = [{"image_id": i, "caption": "x"} for i in range(100, 110)]
    with pytest.raises(metrics.CaptionerError, match=r"10 image ids not in the annotations \(100, 101, 102, 103, 104, "
                                                     r"\.\.\.\); 7 annotated images without a result"):
        metrics.validate_results(many_missing, ids)
    with pytest.raises(metrics.CaptionerError, match="integer 'image_id'"):
        metrics.validate_results([{"image_id": "1", "caption": "x"}], ids)


def test_cli_reports_mismatched_results_in_one_line(human, tmp_path):
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(human["results"][:-2] + [{"image_id": 1, "caption": "a cat"}]))
    with pytest.raises(SystemExit) as e:
        main([f"results={preds}", f"annotations={human['all']}"])
    assert str(e.value).startswith("error: results do not match the annotations: 1 image ids not in the annotations "
                                   "(1); 2 annotated images without a result")
    with pytest.raises(SystemExit, match="needs annotations="):
        main([f"results={preds}"])


@pytest.mark.slow
def test_cli_captions_a_split_and_scores_it(trained, tmp_path, capsys):
    root = trained["cfg"].data.root
    main([f"ckpt_path={trained['ckpt']}", "data=coco", f"data.root={root}", "split=val2017", "beam_size=2",
          f"paths.data_dir={trained['cfg'].paths.data_dir}"])  # its cache: the features training extracted
    eval_dir = trained["run_dir"] / "eval"
    report = json.loads((eval_dir / "coco-val2017-last-beam2-len20-nr2-metrics.json").read_text())
    results = json.loads((eval_dir / "coco-val2017-last-beam2-len20-nr2-results.json").read_text())
    assert report["images"] == len(results) == len(load_split(root, "val2017").image_ids)
    assert all(isinstance(r["image_id"], int) and isinstance(r["caption"], str) for r in results)
    assert report["decode"]["beam_size"] == 2
    assert set(METRICS) <= set(report["metrics"]) and 0 <= report["metrics"]["Bleu_1"] <= 1
    assert "CIDEr\t" in capsys.readouterr().out
    # the written results file, scored on its own against the split's annotations, gives the same numbers
    rescored = tmp_path / "rescored.json"
    main([f"results={report['results']}", f"annotations={report['annotations']}", f"output={rescored}"])
    assert json.loads(rescored.read_text())["metrics"] == report["metrics"]


def test_checkpoint_mode_uses_the_data_the_checkpoint_was_trained_on(trained, tmp_path):
    ckpt, data = f"ckpt_path={trained['ckpt']}", trained["cfg"].data
    cfg, checkpoint = compose_evaluate([ckpt, "split=val"])
    assert checkpoint["hyper_parameters"]["config"]["data"]["root"] == data.root  # read once, for the data and model
    assert (cfg.data.name, cfg.data.root, cfg.data.splits.val) == ("shapes", data.root, "val2017")
    assert cfg.data.generate.val2017 == data.generate.val2017 == 32  # experiment=smoke's, not conf/data/shapes'
    # data.key=value changes the recorded config; a new root carries the paths that were under the old one
    moved = compose_evaluate([ckpt, f"data.root={tmp_path}", "data.splits.val=train2017"])[0]
    assert (moved.data.root, moved.data.splits.val, moved.data.name) == (str(tmp_path), "train2017", "shapes")
    karpathy = torch.load(trained["ckpt"], weights_only=True)  # a Karpathy run records its resolved split_file
    karpathy["hyper_parameters"]["config"]["data"]["split_file"] = f"{data.root}/caption_datasets/dataset_coco.json"
    torch.save(karpathy, tmp_path / "karpathy.ckpt")
    moved = compose_evaluate([f"ckpt_path={tmp_path / 'karpathy.ckpt'}", "data.root=/new"])[0].data
    assert moved.split_file == "/new/caption_datasets/dataset_coco.json"
    assert compose_evaluate([f"ckpt_path={tmp_path / 'karpathy.ckpt'}", "data.root=/new",
                             "data.split_file=/s.json"])[0].data.split_file == "/s.json"
    with pytest.raises(SystemExit, match="data.nope=1: there is no such key in the data .* was trained on"):
        main([ckpt, "data.nope=1"])
    # data=<config> chooses another dataset, whose own defaults apply
    assert compose_evaluate([ckpt, "data=coco", "data.root=/elsewhere"])[0].data.root == "/elsewhere"
    assert compose_evaluate([ckpt, "data=coco"])[0].data.name == "coco"
    # results mode needs no checkpoint
    (tmp_path / "r.json").write_text("[]")
    assert compose_evaluate([f"results={tmp_path / 'r.json'}", "ckpt_path=/missing.ckpt"])[0].data.name == "coco"


@pytest.mark.slow  # two java starts: ~5 s
@needs_java
def test_meteor_keeps_one_java_process_and_replaces_a_dead_one():
    gts = {1: ["a red circle on the left", "one red circle"], 2: ["two blue squares", "blue squares side by side"]}
    res = {1: ["a red circle"], 2: ["three green triangles"]}
    first = metrics.meteor(gts, res)
    process = metrics._meteor.meteor_p
    assert metrics.meteor(gts, res) == first and metrics._meteor.meteor_p is process  # no second JVM start
    process.kill()
    process.wait()
    assert metrics.meteor(gts, res) == first and metrics._meteor.meteor_p is not process
    assert 0 < first < 1
