"""train_RORem_discriminator.py: learns a separable toy set, writes RORem's layout, resumes exactly,
rejects bad scores with one-line errors."""
import json
import os

import pytest
import torch

import train_RORem_discriminator as tdisc
from myutils.errors import UserError


@pytest.fixture(scope="module")
def scored_meta(tmp_path_factory):
    from myutils.toy_world import write_scored_toy_dataset, write_toy_dataset

    d = tmp_path_factory.mktemp("scored")
    return write_scored_toy_dataset(write_toy_dataset(str(d / "toy"), 24, 32, seed=5), str(d / "scored"), seed=0)


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "8", "--report_to", "none", "--validation_steps", "0", "--checkpointing_steps", "100",
            "--learning_rate", "3e-4", *extra]


def test_training_raises_auc_and_writes_rorem_layout(tmp_path, tiny_model_dir, scored_meta, run_script):
    out = str(tmp_path / "d")
    res = run_script(tdisc, _args(tiny_model_dir, scored_meta, out, "--max_train_steps", "60", "--train_full",
                                  "--val_meta_path", scored_meta))  # fit measured on the training set itself
    assert res["initial"]["val_auc"] < 0.65 and res["final"]["val_auc"] > 0.8
    assert res["final"]["val_auc"] > res["initial"]["val_auc"] + 0.2
    assert {"cls_pred_branch.pt", "discriminator.safetensors", "discriminator_config.json"} <= set(os.listdir(out))


def test_lora_run_resumes_exactly(tmp_path, tiny_model_dir, scored_meta, run_script, monkeypatch):
    from myutils import train_util
    from myutils.reward_utils import load_reward_model

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--val_fraction", "0.25"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script(tdisc, _args(tiny_model_dir, scored_meta, straight, *common))
    assert {"cls_pred_branch.pt", "pytorch_lora_weights.safetensors"} <= set(os.listdir(straight))

    real = train_util.save_checkpoint

    def die_after(accelerator, args, step):
        real(accelerator, args, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_util, "save_checkpoint", die_after)
    with pytest.raises(KeyboardInterrupt):
        run_script(tdisc, _args(tiny_model_dir, scored_meta, split, *common))
    monkeypatch.setattr(train_util, "save_checkpoint", real)
    run_script(tdisc, _args(tiny_model_dir, scored_meta, split, *common, "--resume_from_checkpoint", "latest"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 4:20, 4:20] = 1
    a = load_reward_model(tiny_model_dir, straight, 32).score_pixels(x, mask, x.flip(0))
    b = load_reward_model(tiny_model_dir, split, 32).score_pixels(x, mask, x.flip(0))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("score, message", [(None, "missing key 'score'"), ("high", "'score' must be a number in [0, 1], found 'high'"),
                                            (1.5, "'score' must be a number in [0, 1], found 1.5")])
def test_bad_scores_are_named(tmp_path, tiny_model_dir, scored_meta, run_script, score, message):
    entries = json.load(open(scored_meta))[:4]
    if score is None:
        del entries[2]["score"]
    else:
        entries[2]["score"] = score
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(UserError, match=f"bad.json: entry 2: {message}".replace("[", r"\[").replace("]", r"\]")):
        run_script(tdisc, _args(tiny_model_dir, str(bad), str(tmp_path / "o"), "--max_train_steps", "1"))
