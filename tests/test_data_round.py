"""scripts/data_round.py: one round of RORem's data loop on the tiny models: it stops for people,
takes their labels from the annotation app, writes the next training data and a report; resumes and
refuses other settings; two ranks make the same round as one; the simulated annotator is the known
answer."""
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from myutils import annotation as ann
from myutils.data import read_meta
from myutils.errors import UserError
from myutils.img_util import load_image, load_mask
from myutils.metrics import border_fill, masked_mse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("data_round", os.path.join(ROOT, "scripts", "data_round.py"))
data_round = importlib.util.module_from_spec(spec)
spec.loader.exec_module(data_round)


def _args(model, disc, meta, round_dir, *extra):
    return ["--pretrained_model", model, "--RORem_discriminator", disc, "--inputs_meta", meta, "--train_meta", meta,
            "--round_dir", round_dir, "--resolution", "32", "--inference_steps", "3", "--batch_size", "4", *extra]


def _scores(round_dir):
    return {int(k): v for k, v in data_round.read_scores(str(round_dir)).items()}


def test_a_round_waits_for_people_then_writes_the_next_data(tmp_path, tiny_model_dir, disc_dir, toy_meta, run_script):
    import annotate_RORem

    rd = tmp_path / "r1"
    first = run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, rd, "--accept", "1.0", "--reject", "0.0"))
    scores = _scores(rd)
    assert sorted(scores) == list(range(12)) and len(os.listdir(rd / "results")) == 12
    uncertain = [i for i, s in scores.items() if 0.0 <= s < 1.0]
    to_annotate = json.loads((rd / "annotate" / "meta.json").read_text())
    assert first == {"waiting": len(to_annotate)} and sorted(e["round_index"] for e in to_annotate if e["why"] == "uncertain") == uncertain
    assert all(e["discriminator_score"] == pytest.approx(scores[e["round_index"]]) for e in to_annotate)

    # a person labels them in the app: the even items good, the odd ones bad
    labels = annotate_RORem.Labels(annotate_RORem.parse_args(["--meta_path", str(rd / "annotate")]))
    for n, key in enumerate(labels.keys):
        labels.give("alice", n, "good" if labels.items[key]["round_index"] % 2 == 0 else "bad")
    report = run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, rd, "--accept", "1.0", "--reject", "0.0"))
    human = {e["round_index"]: int(e["round_index"] % 2 == 0) for e in to_annotate}
    machine = {i: "accepted" if s >= 1.0 else "rejected" if s < 0.0 else "uncertain" for i, s in scores.items()}
    kept = sorted(i for i in range(12) if (human[i] == 1 if i in human else machine[i] == "accepted"))
    train = read_meta(str(rd / "train" / "meta.json"), "triplet")
    assert len(train) == 12 + len(kept) and report["kept"] == len(kept) and report["train_entries"] == 12 + len(kept)
    assert [e.paths["GT"] for e in train[12:]] == [str(rd / "results" / f"{i:06d}.png") for i in kept]
    assert [e.paths["GT"] for e in train[:12]] == [e.paths["GT"] for e in read_meta(toy_meta, "triplet")]  # the data so far, first
    assert report["inputs"] == 12 and report["accepted"] + report["uncertain"] + report["rejected"] == 12
    assert report["annotators"] == {"alice": len(to_annotate)} and "kept:" in (rd / "report.md").read_text()

    # another setting in the same round is refused before any work
    with pytest.raises(UserError, match="this round was made with --accept 1.0"):
        run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, rd, "--accept", "0.9", "--reject", "0.0"))
    # a lost result and its scores are made again, the same (input i's seed is --seed + i)
    before = np.asarray(Image.open(rd / "results" / "000005.png"))
    os.remove(rd / "results" / "000005.png")
    for f in os.listdir(rd / "scores"):
        os.remove(rd / "scores" / f)
    run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, rd, "--accept", "1.0", "--reject", "0.0"))
    assert np.array_equal(np.asarray(Image.open(rd / "results" / "000005.png")), before)
    assert _scores(rd) == pytest.approx(scores)


def test_the_simulated_annotator_is_the_known_answer(tmp_path, tiny_model_dir, disc_dir, toy_meta, run_script):
    rd = tmp_path / "sim"
    report = run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, rd, "--accept", "1.0", "--reject", "0.0",
                                          "--simulate_annotator", "gt"))
    entries = read_meta(toy_meta, "triplet")
    truth = {}
    for i, e in enumerate(entries):  # by hand: the result's masked error against half the border fill's, or 0.02
        source, mask, gt = load_image(e.paths["source"]), load_mask(e.paths["mask"]), load_image(e.paths["GT"])
        error = masked_mse(load_image(str(rd / "results" / f"{i:06d}.png")), gt, mask)
        truth[i] = int(error < max(0.5 * masked_mse(border_fill(source, mask), gt, mask), 0.02))
    journal = ann.read_journal(ann.journal_path(str(rd / "annotate" / "annotations"), "simulated"))
    to_annotate = json.loads((rd / "annotate" / "meta.json").read_text())
    assert len(journal) == len(to_annotate)
    for e in to_annotate:
        assert journal[ann.result_key(e["GT"], str(rd / "annotate"))]["label"] == ("good" if truth[e["round_index"]] else "bad")
    assert report["true_success_rate"] == pytest.approx(sum(truth.values()) / 12)


def test_consensus_and_the_gt_label_by_hand():
    journals = {"a": {"x": {"label": "good"}, "y": {"label": "bad"}, "z": {"label": "good"}},
                "b": {"x": {"label": "good"}, "y": {"label": "good"}, "z": {"label": "skip"}},
                "c": {"x": {"label": "bad"}}}
    settled, votes = ann.consensus(journals, ["x", "y", "z", "w"])
    assert settled == {"x": 1, "z": 1} and votes == {"x": 3, "y": 2, "z": 1, "w": 0}  # y is a tie: unsettled
    assert ann.gt_label(0.09, 0.2) == 1 and ann.gt_label(0.11, 0.2) == 0  # half the fill's 0.2
    assert ann.gt_label(0.019, 0.01) == 1 and ann.gt_label(0.021, 0.01) == 0  # the floor 0.02


def test_two_ranks_make_the_same_round_as_one(tmp_path, tiny_model_dir, disc_dir, toy_meta, run_script):
    from test_multiprocess import launch_two_ranks

    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--accept", "0.6", "--reject", "0.4", "--device", "cpu"]
    run_script(data_round, _args(tiny_model_dir, disc_dir, toy_meta, one, *extra))
    res = launch_two_ranks("scripts/data_round.py", _args(tiny_model_dir, disc_dir, toy_meta, str(two), *extra), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(os.listdir(two / "scores")) == ["rank0.json", "rank1.json"]  # each rank scored its own share
    assert sorted(json.loads((two / "scores" / "rank1.json").read_text()), key=int) == [str(i) for i in range(6, 12)]
    for i in range(12):
        assert np.array_equal(np.asarray(Image.open(one / "results" / f"{i:06d}.png")),
                              np.asarray(Image.open(two / "results" / f"{i:06d}.png")))
    assert _scores(two) == pytest.approx(_scores(one), abs=1e-5)
    chosen = [[(e["round_index"], e["why"]) for e in json.loads((d / "annotate" / "meta.json").read_text())] for d in (one, two)]
    assert chosen[0] == chosen[1] and chosen[0]  # the same annotation set (uncertain band and seeded audit)


def test_ranks_split_the_work_left_evenly_check_the_data_together_and_wait_long(tmp_path, tiny_model_dir, disc_dir, toy_meta,
                                                                                 monkeypatch):
    """On 8 GPUs a rerun finds some results on disk: the work left is split evenly (a rank whose own
    inputs were done must not wait at the barrier, past NCCL's 10 minutes, while another removes its
    whole share), every rank checks its part of the inputs, and the process group waits --ddp_timeout
    minutes. Two ranks faked in turn, each one's work recorded."""
    import shutil
    from datetime import timedelta

    import accelerate
    import accelerate.utils
    from training import prepare

    rd = tmp_path / "round"
    (rd / "results").mkdir(parents=True)
    root = os.path.dirname(toy_meta)
    for i, e in enumerate(json.load(open(toy_meta))[:8]):  # inputs 0-7 were removed by an earlier run, none scored
        shutil.copy(os.path.join(root, e["GT"]), data_round.result_path(argparse_ns(rd), i))
    seen = {}

    def fake_rank(rank):
        class State:
            process_index, num_processes, is_main_process = rank, 2, rank == 0
            device = "cpu"

            def __init__(self, cpu=False, **kwargs):
                seen[rank, "timeout"] = kwargs.get("timeout")

            def wait_for_everyone(self):
                pass
        return State

    real_scan = prepare.scan_entries
    monkeypatch.setattr(prepare, "scan_entries", lambda entries, **kw: seen.setdefault((rank, "checked"), [e.index for e in entries])
                        and real_scan(entries, **kw))
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda x: x)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda x: x)
    monkeypatch.setattr(data_round, "generate", lambda args, entries, todo, *a: seen.__setitem__((rank, "generate"), todo))
    monkeypatch.setattr(data_round, "score", lambda args, entries, todo, r, *a: seen.__setitem__((rank, "score"), todo))
    for rank in (0, 1):
        monkeypatch.setattr(accelerate, "PartialState", fake_rank(rank))
        argv = _args(tiny_model_dir, disc_dir, toy_meta, str(rd), "--device", "cpu", *(["--ddp_timeout", "45"] if rank else []))
        if rank == 0:
            with pytest.raises(UserError, match="12 results have no score"):  # nothing was scored (score() is faked)
                data_round.main(argv)
        else:
            assert data_round.main(argv) is None
    assert seen[0, "generate"] == [8, 9] and seen[1, "generate"] == [10, 11]
    assert seen[0, "score"] == list(range(6)) and seen[1, "score"] == list(range(6, 12))
    assert seen[0, "checked"] == list(range(0, 12, 2)) and seen[1, "checked"] == list(range(1, 12, 2))
    assert seen[0, "timeout"] == timedelta(minutes=120) and seen[1, "timeout"] == timedelta(minutes=45)


def argparse_ns(round_dir):
    import argparse
    return argparse.Namespace(round_dir=str(round_dir))
