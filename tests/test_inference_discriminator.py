"""inference_RORem_discriminator.py: a verdict for one image, scores for a meta.json as JSON/CSV,
a scored meta.json that train_RORem_discriminator reads back, agreement with existing labels."""
import csv
import json

import pytest

import inference_RORem_discriminator as idisc
import train_RORem_discriminator
from myutils.errors import UserError


def test_single_and_batch_scoring(tmp_path, tiny_model_dir, toy_meta, disc_dir, capsys):
    entries = json.load(open(toy_meta))
    root = toy_meta.rsplit("/", 1)[0]
    single = idisc.main(["--pretrained_model", tiny_model_dir, "--RORem_discriminator", disc_dir, "--resolution", "32",
                         "--image_path", f"{root}/{entries[0]['source']}", "--mask_path", f"{root}/{entries[0]['mask']}",
                         "--edited_path", f"{root}/{entries[0]['GT']}", "--threshold", "0.3"])
    out = capsys.readouterr().out
    assert f"score {single[0]:.4f} -> {'success' if single[0] >= 0.3 else 'failure'} (threshold 0.3)" in out

    labelled = tmp_path / "labelled.json"  # some entries carry a human score
    for i, e in enumerate(entries):
        for k in ("source", "mask", "GT"):
            e[k] = f"{root}/{e[k]}"
    labelled.write_text(json.dumps([dict(e, **({"score": i % 2} if i < 6 else {})) for i, e in enumerate(entries)]))
    scores = idisc.main(["--pretrained_model", tiny_model_dir, "--RORem_discriminator", disc_dir, "--resolution", "32",
                         "--meta_path", str(labelled), "--output_path", str(tmp_path / "s.csv"), "--batch_size", "5",
                         "--scored_meta_path", str(tmp_path / "scored" / "meta.json")])
    assert abs(scores[0] - single[0]) < 1e-5  # batching does not change a score
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == 12 and all(float(r["score"]) >= 0 for r in rows) and rows[0]["verdict"] in ("0", "1")
    assert "agreement with the 6 existing scores" in capsys.readouterr().out
    scored = json.load(open(tmp_path / "scored" / "meta.json"))
    assert scored[0]["human_score"] == 0 and scored[0]["score"] == int(scores[0] >= 0.5)
    assert [s["discriminator_score"] for s in scored] == pytest.approx(scores)
    args = train_RORem_discriminator.parse_args(["--meta_path", str(tmp_path / "scored" / "meta.json"), "--output_dir", "o"])
    from myutils.data import read_meta

    assert len(read_meta(args.meta_path, "scored")) == 12  # the annotation feeds the next discriminator round

    # a second round on the scored meta keeps the people's scores (the first round's verdicts are not people's)
    idisc.main(["--pretrained_model", tiny_model_dir, "--RORem_discriminator", disc_dir, "--resolution", "32", "--threshold", "0.9",
                "--meta_path", str(tmp_path / "scored" / "meta.json"), "--output_path", str(tmp_path / "s2.json"),
                "--scored_meta_path", str(tmp_path / "round2.json")])
    round2 = json.load(open(tmp_path / "round2.json"))
    assert [r.get("human_score") for r in round2] == [i % 2 if i < 6 else None for i in range(12)]
    assert "agreement with the 6 existing scores" in capsys.readouterr().out


def test_argument_errors(disc_dir):
    with pytest.raises(UserError, match="give either --meta_path"):
        idisc.main(["--RORem_discriminator", disc_dir])
    with pytest.raises(UserError, match="go together"):
        idisc.main(["--RORem_discriminator", disc_dir, "--image_path", "a.png"])
    with pytest.raises(UserError, match="must end in .json or .csv"):
        idisc.main(["--RORem_discriminator", disc_dir, "--meta_path", "m.json", "--output_path", "x.txt"])
    for flag in ("--output_path", "--scored_meta_path"):  # the input would be replaced
        with pytest.raises(UserError, match=f"{flag} m.json is the input --meta_path m.json: it would be replaced"):
            idisc.main(["--RORem_discriminator", disc_dir, "--meta_path", "m.json", flag, "m.json"])
    with pytest.raises(UserError, match="are the same file"):
        idisc.main(["--RORem_discriminator", disc_dir, "--meta_path", "m.json", "--output_path", "s.json", "--scored_meta_path", "s.json"])
