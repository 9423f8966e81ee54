"""Diffusion-KTO: the loss against hand values and against the official implementation's steps
(jacklishufan/diffusion-kto, train_kto_sd_v1.5.py, written out independently below), the class
weights, and train_RORem_kto.py: a LoRA that trains, resume equal to a straight run, two ranks equal
to one (the reference point is the mean over both ranks), its validation and its errors."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import train_RORem_kto as tkto
from myutils.dpo_utils import diffusion_kto_loss, kto_class_weights
from myutils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    target = torch.zeros(2, 1)
    labels = torch.tensor([1, 0])
    # errors 0.25 and 1.0, reference errors 1.0 and 0.25: rewards +0.75 and -0.75, mean 0 -> z = 0;
    # both terms 1 - sigmoid(2 * 0.75)
    loss, m = diffusion_kto_loss(torch.tensor([[0.5], [1.0]]), torch.tensor([[1.0], [0.5]]), target, labels, beta=2.0)
    assert loss.item() == pytest.approx(1 - _sig(1.5)) and m["reference_point"] == 0.0 and m["implicit_accuracy"] == 1.0
    loss, _ = diffusion_kto_loss(torch.tensor([[0.5], [1.0]]), torch.tensor([[1.0], [0.5]]), target, labels, beta=2.0,
                                 lambda_desirable=2.0)
    assert loss.item() == pytest.approx((2 * (1 - _sig(1.5)) + (1 - _sig(1.5))) / 2)
    # rewards +0.75 and +0.25: z = 0.5; desirable 1 - sigmoid(2 * 0.25), undesirable 1 - sigmoid(2 * (0.5 - 0.25))
    loss, m = diffusion_kto_loss(torch.tensor([[0.5], [0.5]]), torch.tensor([[1.0], [math.sqrt(0.5)]]), target, labels, beta=2.0)
    assert m["reference_point"] == pytest.approx(0.5) and loss.item() == pytest.approx(1 - _sig(0.5))
    # rewards -0.75 and -0.25: the mean -0.5 is clamped, z = 0
    _, m = diffusion_kto_loss(torch.tensor([[1.0], [math.sqrt(0.5)]]), torch.tensor([[0.5], [0.5]]), target, labels, beta=2.0)
    assert m["reference_point"] == 0.0
    # reduce_mean replaces the local mean (several ranks): z = 0.3 here
    _, m = diffusion_kto_loss(torch.tensor([[0.5], [1.0]]), torch.tensor([[1.0], [0.5]]), target, labels, beta=2.0,
                              reduce_mean=lambda z: z + 0.3)
    assert m["reference_point"] == pytest.approx(0.3)


def test_kto_loss_equals_the_official_steps_and_pushes_the_right_way():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 4, 3, 3, generator=g, requires_grad=True)
    ref, target = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    beta, lam_d, lam_u = 3.0, 1.5, 0.7
    loss, _ = diffusion_kto_loss(pred, ref, target, labels, beta, lam_d, lam_u)
    # the official training step, line by line
    model_losses = ((pred - target) ** 2).mean(dim=[1, 2, 3])
    ref_loss = ((ref - target) ** 2).mean(dim=[1, 2, 3])
    g_term = -model_losses - (-ref_loss)
    kl = g_term.mean().detach().clamp(min=0)
    label_scale_g = (2 * labels - 1) * beta * (g_term - kl)
    w_y = lam_d * (labels == 1) + lam_u * (labels != 1)
    official = (w_y * (1 - torch.sigmoid(label_scale_g))).mean()
    assert loss.item() == pytest.approx(official.item(), rel=1e-6)
    # a step down the gradient lowers the error of the good results and raises that of the bad ones
    loss.backward()
    with torch.no_grad():
        after = ((pred - 0.05 * pred.grad - target) ** 2).mean(dim=[1, 2, 3])
    assert all(after[i] < model_losses[i] for i in (0, 2, 3)) and all(after[i] > model_losses[i] for i in (1, 4, 5))


def test_class_weights_balance_the_classes():
    assert kto_class_weights(30, 10) == (pytest.approx(1 / 3), 1.0)  # 30 * 1/3 == 10 * 1
    assert kto_class_weights(10, 40) == (1.0, pytest.approx(0.25))
    with pytest.raises(ValueError):
        kto_class_weights(0, 5)


@pytest.fixture(scope="module")
def scored_meta(tmp_path_factory, toy_meta):
    """Toy scored triplets: the true removal (1) and a deliberate failure (0) per input."""
    from toy_world.data import write_scored_toy_dataset

    return write_scored_toy_dataset(toy_meta, str(tmp_path_factory.mktemp("scored")))


@pytest.fixture(scope="module")
def pair_meta(tmp_path_factory, toy_meta):
    root = os.path.dirname(toy_meta)
    pairs = [{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
              "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])} for e in json.load(open(toy_meta))]
    path = tmp_path_factory.mktemp("kto_pairs") / "pairs.json"
    path.write_text(json.dumps(pairs[:4]))
    return str(path)


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "4", "--report_to", "none", "--checkpointing_steps", "100", "--learning_rate", "1e-3",
            "--use_lora", "--beta", "50", *extra]


def test_kto_trains_a_lora_validates_and_resumes_exactly(tmp_path, tiny_model_dir, scored_meta, pair_meta, run_script,
                                                         crash_then_resume, monkeypatch):
    """The held-out preference accuracy is that of the saved LoRA, loaded by stock diffusers, against the
    start (computed by hand); a crash and resume saves the straight run's LoRA."""
    from accelerate import Accelerator
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from test_train_dpo import _accuracy_by_hand

    from training import preference, prepare

    held_out, real_accuracy = [], preference.preference_accuracy
    monkeypatch.setattr(preference, "preference_accuracy", lambda u, r, c, samples, *a: held_out.append(samples) or real_accuracy(u, r, c, samples, *a))
    common = ["--random_flip", "--checkpointing_steps", "1", "--max_train_steps", "3"]
    argv = _args(tiny_model_dir, scored_meta, str(tmp_path / "straight"), *common, "--validation_meta_path", pair_meta,
                 "--validation_steps", "3", "--num_validation_images", "2")
    metrics = run_script(tkto, argv)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(tmp_path / "straight"))
    start = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    comps = prepare.Components(tkto.parse_args(argv), Accelerator(cpu=True), torch.float32)
    assert len(held_out[-1]) == 2 and "val_masked_mse" in metrics  # --num_validation_images held-out pairs
    assert metrics["val_preference_accuracy"] == pytest.approx(_accuracy_by_hand(pipe.unet.eval(), start, comps, held_out[-1]))
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    half = str(tmp_path / "resumed")
    crash_then_resume(tkto, _args(tiny_model_dir, scored_meta, half, *common))
    b = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_kto_on_two_ranks_equals_one_rank(tmp_path, tiny_model_dir, scored_meta, run_script):
    """Two ranks x batch 2 save the LoRA of one rank x batch 4: the reference point is the mean over
    both ranks' samples (with each rank's own mean the two runs would differ)."""
    from test_multiprocess import _TIGHT, _lora_moved, _max_weight_diff, _saved_weights, launch_two_ranks

    def args(out, batch):
        return _args(tiny_model_dir, scored_meta, out, "--max_train_steps", "3", "--checkpointing_steps", "3", *_TIGHT) + [
            "--train_batch_size", str(batch)]

    two, one = str(tmp_path / "kto2"), str(tmp_path / "kto1")
    res = launch_two_ranks("train_RORem_kto.py", args(two, 2), str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    run_script(tkto, args(one, 4))
    a, b = _saved_weights(two, "pytorch_lora_weights.safetensors"), _saved_weights(one, "pytorch_lora_weights.safetensors")
    assert _lora_moved(a) and _max_weight_diff(a, b) <= 1e-6


def test_kto_needs_both_kinds_of_result(tmp_path, tiny_model_dir, scored_meta, run_script):
    good = [e for e in json.load(open(scored_meta)) if e["score"] == 1]
    (tmp_path / "good.json").write_text(json.dumps(good))
    with pytest.raises(UserError, match="KTO needs good and bad results; all 12 entries are good"):
        run_script(tkto, _args(tiny_model_dir, str(tmp_path / "good.json"), str(tmp_path / "out"), "--max_train_steps", "1"))


def _sweep_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_dpo", os.path.join(ROOT, "scripts", "sweep_dpo.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_sweep_puts_kto_beside_dpo_on_the_same_scored_data(tmp_path, tiny_model_dir, scored_meta, disc_dir, capsys):
    """sweep_dpo.py --variants lora kto --scored_meta_path: the natural pairs of the scored results
    built once for DPO, KTO on the results themselves, both validated on the same held-out pairs, one
    table whose rows are the runs' own final metrics."""
    sweep = _sweep_module()
    held = json.load(open(scored_meta))
    root = os.path.dirname(scored_meta)
    pairs = [{"source": os.path.join(root, g["source"]), "mask": os.path.join(root, g["mask"]),
              "preferred": os.path.join(root, g["GT"]), "rejected": os.path.join(root, b["GT"])}
             for g, b in zip(held[0::2], held[1::2])][:2]
    (tmp_path / "held.json").write_text(json.dumps(pairs))
    out = tmp_path / "sweep"
    argv = ["--output_root", str(out), "--betas", "50", "--beta_unit", "mean", "--variants", "lora", "kto",
            "--scored_meta_path", scored_meta, "--kto_config", os.path.join(ROOT, "configs", "toy_kto.yaml"), "--",
            "--pretrained_model_name_or_path", tiny_model_dir, "--resolution", "32", "--train_batch_size", "2", "--report_to", "none",
            "--learning_rate", "1e-3", "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--validation_meta_path", str(tmp_path / "held.json"), "--validation_inference_steps", "2", "--num_validation_images", "2",
            "--discriminator_path", disc_dir, "--win_rate_samples", "2", "--beta", "50", "--no-cache_latents",
            "--validation_strength", "1.0"]
    rows = sweep.main(argv)
    assert [r["run"] for r in rows] == ["start (reference)", "lora_beta50", "kto"]
    natural = json.load(open(out / "natural_pairs" / "meta.json"))
    goods = {os.path.abspath(os.path.join(root, e["GT"])) for e in held if e["score"] == 1}
    assert natural and all(os.path.abspath(p["preferred"]) in goods for p in natural)  # pairs of the scored results
    dpo, kto = (json.load(open(out / run / "final_metrics.json")) for run in ("lora_beta50", "kto"))
    assert dpo["args"]["meta_path"] == [str(out / "natural_pairs" / "meta.json")]
    assert kto["args"]["meta_path"] == [scored_meta]
    assert kto["args"]["lora_rank"] == 8 and kto["args"]["beta"] == 50  # toy_kto.yaml's rank; the common --beta overrides
    for row, final in zip(rows[1:], (dpo, kto)):
        m = final["metrics"]
        assert (row["preference_accuracy"], row["win_rate"], row["masked_mse"]) == (
            m["val_preference_accuracy"], m["val_win_rate"], m["val_masked_mse"])
    assert rows[2]["loss"] == "kto" and rows[2]["beta"] == "50 (mean)"
    assert rows[0]["masked_mse"] == rows[1]["reference_masked_mse"] == rows[2]["reference_masked_mse"]  # one start, one held-out set
    assert "| kto | kto | 50 (mean) | LoRA r8 |" in open(out / "sweep_results.md").read()


def test_sweep_kto_arguments_and_refusals():
    sweep = _sweep_module()
    args = sweep.parse_args(["--output_root", "o", "--variants", "kto", "--scored_meta_path", "s.json", "--kto_config", "k.yaml", "--",
                             "--config", "d.yaml", "--preference_data=p.json", "--use_lora", "--meta_path", "x", "--beta", "9"])
    assert sweep.kto_arguments(args) == ["--config", "k.yaml", "--use_lora", "--beta", "9", "--meta_path", "s.json"]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--output_root", "o", "--variants", "kto", "--", "--preference_data", "p.json"])
    with pytest.raises(SystemExit):
        sweep.parse_args(["--output_root", "o", "--variants", "lora"])  # no pairs and nothing to pair
