"""scripts/build_preference_pairs.py: natural pairs from scored annotations, generated pairs from
discriminator-scored candidates (fixed seeds, best against worst above the margin), resume, errors."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from myutils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("build_preference_pairs", os.path.join(ROOT, "scripts", "build_preference_pairs.py"))
bpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bpp)


@pytest.fixture(scope="module")
def scored_and_inputs(tmp_path_factory, toy_meta):
    """Scored annotations for inputs 0-3 (GT scored 1, source scored 0: natural pairs); inputs 0-5 to generate for."""
    root = os.path.dirname(toy_meta)
    entries = [{k: os.path.join(root, v) for k, v in e.items()} for e in json.load(open(toy_meta))]
    d = tmp_path_factory.mktemp("scored")
    scored = [{"source": e["source"], "mask": e["mask"], "GT": e[key], "score": s}
              for e in entries[:4] for key, s in (("GT", 1), ("source", 0))]
    (d / "scored.json").write_text(json.dumps(scored))
    (d / "inputs.json").write_text(json.dumps([{"source": e["source"], "mask": e["mask"]} for e in entries[:6]]))
    return str(d / "scored.json"), str(d / "inputs.json")


def _gen_args(model, disc, inputs, out, *extra):
    return ["--pretrained_model", model, "--RORem_discriminator", disc, "--meta_path", inputs, "--output_dir", out,
            "--num_candidates", "3", "--inference_steps", "2", "--strength", "1.0", "--resolution", "32", "--seed", "5", *extra]


def test_natural_then_generated_for_unpaired_inputs_only(tmp_path, tiny_model_dir, disc_dir, scored_and_inputs):
    scored, inputs = scored_and_inputs
    out = str(tmp_path / "pairs")
    report = bpp.main(_gen_args(tiny_model_dir, disc_dir, inputs, out, "--scored_meta_path", scored, "--min_margin", "-1"))
    assert report["natural"] == {"inputs": 4, "inputs_with_pairs": 4, "inputs_without_pairs": 0, "pairs": 4}
    assert report["generated"]["inputs"] == 2 and report["generated"]["pairs"] == 2  # inputs 4 and 5 only
    pairs = json.load(open(os.path.join(out, "meta.json")))
    assert len(pairs) == 6
    records = {i: json.load(open(os.path.join(out, "records", f"{i:06d}.json"))) for i in (4, 5)}
    assert sorted(os.listdir(os.path.join(out, "records"))) == ["000004.json", "000005.json"]
    for pair, (i, rec) in zip(pairs[4:], records.items()):
        scores = [c["score"] for c in rec["candidates"]]
        assert [c["seed"] for c in rec["candidates"]] == [5 + 3 * i + k for k in range(3)]
        assert pair["preferred_score"] == max(scores) and pair["rejected_score"] == min(scores)
        assert pair["source"] == rec["source"] and os.path.isabs(pair["preferred"])
        images = [np.asarray(Image.open(c["path"]), dtype=float) for c in rec["candidates"]]
        assert np.abs(images[0] - images[1]).max() > 0  # different seeds, different candidates
    candidates = json.load(open(os.path.join(out, "candidates.json")))
    assert len(candidates) == 6 and all(c["score"] == int(c["discriminator_score"] >= 0.5) for c in candidates)

    from train_RORem_dpo import parse_args  # the output is what the DPO script reads
    from myutils.data import check_entries, read_meta
    assert parse_args(["--preference_data", os.path.join(out, "meta.json"), "--output_dir", str(tmp_path)]).meta_path
    check_entries(read_meta(os.path.join(out, "meta.json"), "pair"))  # raises on any broken pair


def test_margin_filter_resume_and_settings(tmp_path, tiny_model_dir, disc_dir, scored_and_inputs):
    _, inputs = scored_and_inputs
    out = str(tmp_path / "pairs")
    argv = _gen_args(tiny_model_dir, disc_dir, inputs, out, "--guidance_scales", "1", "2", "--num_candidates", "4")
    bpp.main(argv + ["--min_margin", "-1"])
    recs = [json.load(open(os.path.join(out, "records", f))) for f in sorted(os.listdir(os.path.join(out, "records")))]
    assert len(recs) == 6
    assert [c["guidance_scale"] for c in recs[0]["candidates"]] == [1.0, 1.0, 2.0, 2.0]
    margins = sorted(max(c["score"] for c in r["candidates"]) - min(c["score"] for c in r["candidates"]) for r in recs)
    assert margins[0] < margins[-1]
    stamps = {c["path"]: os.stat(c["path"]).st_mtime_ns for r in recs for c in r["candidates"]}
    cut = (margins[2] + margins[3]) / 2
    report = bpp.main(argv + ["--min_margin", str(cut)])  # resumes: nothing regenerated, pairs re-chosen
    assert report["generated"]["pairs"] == 3 and report["generated"]["inputs_below_margin"] == 3
    assert all(os.stat(p).st_mtime_ns == s for p, s in stamps.items())
    assert len(json.load(open(os.path.join(out, "meta.json")))) == 3
    # records are named by input index: other settings or another dataset in the same folder are refused
    with pytest.raises(UserError, match=r"records/000000.json holds candidates made from other inputs or settings"):
        bpp.main([a if a != "5" else "6" for a in argv])  # --seed 6
    other = tmp_path / "other.json"
    rows = json.load(open(inputs))
    other.write_text(json.dumps(rows[1:] + rows[:1]))  # the same files, in another order
    with pytest.raises(UserError, match=r"holds candidates made from other inputs"):
        bpp.main([str(other) if a == inputs else a for a in argv])
    assert all(os.stat(p).st_mtime_ns == s for p, s in stamps.items())


def test_gt_judge_scores_candidates_by_masked_error_against_gt(tmp_path, tiny_model_dir, toy_meta):
    """--judge gt: no discriminator; each candidate's score is minus its masked MSE against the input's GT
    (recomputed here from the saved image), best against worst by that error; inputs without GT are refused."""
    from myutils.img_util import load_image, load_mask
    from myutils.metrics import masked_mse

    root = os.path.dirname(toy_meta)
    entries = [{k: os.path.join(root, v) for k, v in e.items()} for e in json.load(open(toy_meta))[:3]]
    (tmp_path / "triplets.json").write_text(json.dumps(entries))
    out = str(tmp_path / "pairs")
    report = bpp.main(["--pretrained_model", tiny_model_dir, "--meta_path", str(tmp_path / "triplets.json"), "--judge", "gt",
                       "--output_dir", out, "--num_candidates", "3", "--inference_steps", "2", "--strength", "1.0",
                       "--resolution", "32", "--seed", "5", "--min_margin", "0"])
    assert report["generated"]["judge"] == "gt" and report["generated"]["min_margin"] == 0
    pairs = json.load(open(os.path.join(out, "meta.json")))
    for i, e in enumerate(entries):
        rec = json.load(open(os.path.join(out, "records", f"{i:06d}.json")))
        errors = [masked_mse(load_image(c["path"]), load_image(e["GT"]), load_mask(e["mask"])) for c in rec["candidates"]]
        assert [c["score"] for c in rec["candidates"]] == pytest.approx([-x for x in errors])
        best, worst = (rec["candidates"][int(np.argmin(errors))]["path"], rec["candidates"][int(np.argmax(errors))]["path"])
        assert [(p["preferred"], p["rejected"]) for p in pairs if p["source"] == e["source"]] == [(best, worst)]
    candidates = json.load(open(os.path.join(out, "candidates.json")))
    assert all(c["score"] == int(c["masked_mse"] <= 0.02) for c in candidates)  # the default verdict: -0.02
    (tmp_path / "inputs.json").write_text(json.dumps([{"source": e["source"], "mask": e["mask"]} for e in entries]))
    with pytest.raises(UserError, match="GT"):
        bpp.main(["--pretrained_model", tiny_model_dir, "--meta_path", str(tmp_path / "inputs.json"), "--judge", "gt",
                  "--output_dir", str(tmp_path / "p2"), "--num_candidates", "2", "--resolution", "32"])


def test_argument_errors(tiny_model_dir, scored_and_inputs, tmp_path):
    _, inputs = scored_and_inputs
    with pytest.raises(UserError, match="--RORem_discriminator"):
        bpp.parse_args(["--meta_path", inputs, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: "argument --num_candidates: must be at least 2, got 1" (tests/test_bad_input.py)
        bpp.parse_args(["--meta_path", inputs, "--output_dir", str(tmp_path), "--RORem_discriminator", "d", "--num_candidates", "1"])
    with pytest.raises(UserError, match="--scored_meta_path"):
        bpp.parse_args(["--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match="--threshold: a discriminator verdict threshold is on its labels' scale"):
        bpp.parse_args(["--meta_path", inputs, "--output_dir", str(tmp_path), "--RORem_discriminator", "d", "--threshold", "-0.1"])
    args = bpp.parse_args(["--meta_path", inputs, "--output_dir", str(tmp_path), "--judge", "gt"])  # no discriminator needed
    assert (args.min_margin, args.threshold) == (0.005, -0.02)


def test_preference_pairs_group_by_content(tmp_path):
    import json

    from myutils.data import read_meta
    meta_to_preference_dataset_format = bpp.meta_to_preference_dataset_format

    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a).save(tmp_path / "a_copy.png")  # the same input under another name
    Image.fromarray(np.clip(a.astype(int) + 2, 0, 255).astype(np.uint8)).save(tmp_path / "a_near.png")  # similar
    Image.fromarray(b).save(tmp_path / "b.png")
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (4, 4, 10, 10))
    m.save(tmp_path / "m.png")
    for name in ("r1", "r2", "r3", "r4", "r5"):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    scored = [
        {"source": "a.png", "mask": "m.png", "GT": "r1.png", "score": 1},
        {"source": "a_copy.png", "mask": "m.png", "GT": "r2.png", "score": 0},  # pairs with r1 (same content)
        {"source": "a.png", "mask": "m.png", "GT": "r3.png", "score": 0},
        {"source": "b.png", "mask": "m.png", "GT": "r4.png", "score": 1},  # no counterpart
        {"source": "a_near.png", "mask": "m.png", "GT": "r5.png", "score": 1},  # only similar to a
    ]
    (tmp_path / "scored.json").write_text(json.dumps(scored))
    report = meta_to_preference_dataset_format(str(tmp_path / "scored.json"), str(tmp_path / "pairs.json"))
    assert report == {"inputs": 3, "inputs_with_pairs": 1, "inputs_without_pairs": 2, "pairs": 2}
    pairs = read_meta(str(tmp_path / "pairs.json"), "pair")
    assert {(os.path.basename(p.paths["preferred"]), os.path.basename(p.paths["rejected"])) for p in pairs} == {("r1.png", "r2.png"), ("r1.png", "r3.png")}
    assert pairs[0].extra["preferred_score"] == 1 and pairs[0].extra["rejected_score"] == 0
    one = meta_to_preference_dataset_format(str(tmp_path / "scored.json"), str(tmp_path / "p1.json"), max_pairs_per_input=1)
    assert one["pairs"] == 1
    similar = meta_to_preference_dataset_format(str(tmp_path / "scored.json"), str(tmp_path / "p2.json"), pair_similar=True)
    assert similar == {"inputs": 3, "inputs_with_pairs": 2, "inputs_without_pairs": 1, "pairs": 4}  # a_near borrows r2, r3
