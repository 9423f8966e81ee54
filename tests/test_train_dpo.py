"""train_RORem_dpo.py: shared noise and timestep within a pair, the reference is the base model with
adapters off, log 2 at the start, only LoRA weights change, beta units, bad pair files."""
import json
import math
import os

import pytest
import torch

import train_RORem_dpo as tdpo
from myutils.errors import UserError
from training import adapters, checkpoint, preference, prepare


@pytest.fixture(scope="module")
def pair_meta(tmp_path_factory, toy_meta):
    """The toy setting of DESIGN.md section 12: preferred = GT, rejected = the source (object left in)."""
    root = os.path.dirname(toy_meta)
    pairs = [{"source": os.path.join(root, e["source"]), "mask": os.path.join(root, e["mask"]),
              "preferred": os.path.join(root, e["GT"]), "rejected": os.path.join(root, e["source"])}
             for e in json.load(open(toy_meta))]
    d = tmp_path_factory.mktemp("pairs")
    path = d / "pairs.json"
    path.write_text(json.dumps(pairs))
    return str(path)


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--preference_data", meta, "--output_dir", out, "--resolution", "32",
            "--train_batch_size", "2", "--report_to", "none", "--checkpointing_steps", "100", "--learning_rate", "1e-3", *extra]


def test_same_noise_and_timestep_for_both_halves(tiny_model_dir, pair_meta, tmp_path):
    from accelerate import Accelerator

    from myutils.data import RemovalDataset, read_meta

    args = tdpo.parse_args(_args(tiny_model_dir, pair_meta, str(tmp_path)))
    comps = prepare.Components(args, Accelerator(), torch.float32)
    ds = RemovalDataset(read_meta(pair_meta, "pair"), "pair", 32)
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(3)]) for k in ("source", "mask", "preferred", "rejected",
                                                                                    "original_size", "crop_top_left", "index", "epoch")}
    x, t, target, kw = tdpo.pair_inputs(comps, batch, 32, seed=0)
    assert x.shape == (6, 9, 16, 16) and torch.equal(t[:3], t[3:])
    assert torch.equal(target[:3], target[3:])  # epsilon target = the noise: shared within each pair
    assert not torch.equal(target[0], target[1])  # but not across pairs
    assert torch.equal(x[:3, 4:], x[3:, 4:])  # same mask and masked source for both halves
    assert not torch.equal(x[:3, :4], x[3:, :4])  # different images noised


def test_reference_is_the_base_model_with_adapters_off(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    args = tdpo.parse_args(["--preference_data", "p", "--output_dir", "o", "--use_lora"])
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    adapters.add_lora(unet, args, torch.float32)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    x, t = torch.randn(2, 9, 16, 16), torch.tensor([10, 500])
    kw = {"encoder_hidden_states": torch.randn(2, 77, 64),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6) * 32}}
    ref = tdpo.reference_prediction(unet, None, x, t, kw)
    with torch.no_grad():
        assert torch.allclose(ref, base(x, t, **kw).sample, atol=1e-6)
        assert not torch.allclose(unet(x, t, **kw).sample, ref)  # adapters are back on afterwards


def test_lora_run_starts_at_log2_and_changes_only_lora(tmp_path, tiny_model_dir, pair_meta, run_script, monkeypatch):
    from diffusers import UNet2DConditionModel

    seen, saved = [], {}
    real_loss, real_final = tdpo.diffusion_dpo_loss, checkpoint.save_final
    monkeypatch.setattr(tdpo, "diffusion_dpo_loss", lambda *a, **k: seen.append(real_loss(*a, **k)) or seen[-1])
    monkeypatch.setattr(checkpoint, "save_final", lambda acc, args, model, save, **kw: (saved.setdefault("m", acc.unwrap_model(model)),
                                                                               real_final(acc, args, model, save, **kw)))
    out = str(tmp_path / "lora")
    run_script(tdpo, _args(tiny_model_dir, pair_meta, out, "--use_lora", "--lora_rank", "4", "--max_train_steps", "3",
                           "--cache_latents", "--random_flip"))
    assert len(os.listdir(os.path.join(out, "latent_cache"))) == 12  # preferred, rejected, masked source, both flips
    assert seen[0][0].item() == pytest.approx(math.log(2), abs=1e-6) and seen[0][1]["implicit_accuracy"] == 0.5
    assert seen[-1][0].item() != pytest.approx(math.log(2), abs=1e-6)
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in saved["m"].state_dict().items() if "lora" not in k}
    assert all(torch.equal(trained[k].float(), base[k].float()) for k in base)  # the base UNet is untouched
    assert any(v.abs().max() > 0 for k, v in saved["m"].state_dict().items() if "lora_B" in k)
    assert os.path.isfile(os.path.join(out, "pytorch_lora_weights.safetensors"))



@torch.no_grad()
def _accuracy_by_hand(policy, ref, comps, samples):
    """Preference accuracy written out (not preference.preference_accuracy, which the script calls): one pair
    at a time, over the evaluation's seeds and timesteps, the summed DPO margin (the policy's error gain over
    the reference on the preferred image minus that on the rejected one); a pair is won when it is positive."""
    from myutils.data import stack_samples

    won = []
    for sample in samples:
        batch = stack_samples([sample], ("source", "mask", "preferred", "rejected", "original_size", "crop_top_left", "index", "epoch"))
        margin = 0.0
        for seed in preference.EVAL_SEEDS:
            for timestep in preference.EVAL_TIMESTEPS:
                x, t, target, kw = preference.pair_inputs(comps, batch, 32, seed, timestep)
                err, ref_err = (((m(x, t, **kw).sample - target) ** 2).flatten(1).mean(1) for m in (policy, ref))
                margin += float((ref_err[0] - err[0]) - (ref_err[1] - err[1]))
        won.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)
    return sum(won) / len(won)

def test_full_finetune_with_beta_in_summed_units(tmp_path, tiny_model_dir, pair_meta, run_script, monkeypatch):
    """Beta in summed units; the full fine-tune's validation accuracy is that of the saved UNet against
    the start (both loaded afresh here) on the held-out pairs."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    seen, held_out = [], []
    real_loss, real_accuracy = tdpo.diffusion_dpo_loss, preference.preference_accuracy
    monkeypatch.setattr(tdpo, "diffusion_dpo_loss", lambda p, r, t, beta, lt, **k: seen.append(beta) or real_loss(p, r, t, beta, lt, **k))
    monkeypatch.setattr(preference, "preference_accuracy", lambda u, r, c, samples, *a: held_out.append(samples) or real_accuracy(u, r, c, samples, *a))
    out = str(tmp_path / "full")
    argv = _args(tiny_model_dir, pair_meta, out, "--max_train_steps", "2", "--beta", "0.5", "--beta_unit", "sum", "--learning_rate", "1e-2",
                 "--validation_steps", "2", "--num_validation_images", "3", "--validation_inference_steps", "2")
    metrics = run_script(tdpo, argv)
    assert seen[0] == 0.5 * 4 * 16 * 16  # converted to mean units for 4 x 16 x 16 latents
    assert os.path.isfile(os.path.join(out, "unet", "config.json"))
    assert "val_win_rate" not in metrics  # no discriminator given
    comps = prepare.Components(tdpo.parse_args(argv), Accelerator(cpu=True), torch.float32)
    trained = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    start = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    want = _accuracy_by_hand(trained, start, comps, held_out[-1])
    assert len(held_out[-1]) >= 3 and metrics["val_preference_accuracy"] == pytest.approx(want)
    assert want not in (0.5, _accuracy_by_hand(start, trained, comps, held_out[-1]))  # the check tells the two models apart
    assert os.path.isfile(os.path.join(out, "validation", "step-000002.png"))


def test_win_rate_of_a_trained_policy_is_its_paired_score_comparison(tmp_path, tiny_model_dir, pair_meta, disc_dir, run_script,
                                                                     monkeypatch):
    """When the policy really differs from the reference, the validation win rate is the fraction of
    held-out inputs whose policy result the discriminator scores above the reference's (ties half),
    and the scores and results are the policy's, not the reference's."""
    import myutils.reward_utils as ru

    scored, raw = [], []
    real_score = ru.score_results

    def score(reward, samples, results):
        s = real_score(reward, samples, results)
        raw.append(s)
        if scored:  # the policy's results (the reference is scored first): six of eight made clearly better, so the
            s = [v + 1.0 if i < 6 else v for i, v in enumerate(s)]  # rate cannot come out 0.5 by chance and hide a swap
        scored.append(s)
        return s

    monkeypatch.setattr(ru, "score_results", score)
    out = str(tmp_path / "trained")
    metrics = run_script(tdpo, _args(tiny_model_dir, pair_meta, out, "--use_lora", "--lora_rank", "4", "--learning_rate", "2e-2",
                                     "--max_train_steps", "3", "--validation_steps", "3", "--validation_inference_steps", "2",
                                     "--num_validation_images", "2", "--discriminator_path", disc_dir, "--win_rate_samples", "8"))
    reference, policy = scored[0], scored[1]  # the reference is scored once, then the policy
    assert len(policy) == 8 and raw[1] != raw[0]  # the trained policy's own results score differently
    by_hand = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)) / len(policy)
    assert metrics["val_win_rate"] == pytest.approx(by_hand) and metrics["val_win_rate"] >= 0.75
    assert metrics["val_score"] == pytest.approx(sum(policy) / 8) and metrics["val_reference_score"] == pytest.approx(sum(reference) / 8)
    # Wilson's interval holds the rate strictly inside, except at 1.0, where its upper end is 1.0 too
    assert metrics["val_win_rate_low"] < metrics["val_win_rate"] <= metrics["val_win_rate_high"] <= 1.0


def test_win_rate_of_an_unchanged_policy_is_one_half(tmp_path, tiny_model_dir, pair_meta, disc_dir, run_script):
    """With lr 0 the LoRA stays zero: policy and reference sample the same images with the same seeds,
    so every comparison is a tie; the grid shows source, mask, reference, policy, preferred."""
    from PIL import Image

    out = str(tmp_path / "same")
    metrics = run_script(tdpo, _args(tiny_model_dir, pair_meta, out, "--use_lora", "--learning_rate", "0", "--max_train_steps", "2",
                                     "--validation_steps", "2", "--validation_inference_steps", "2", "--num_validation_images", "2",
                                     "--discriminator_path", disc_dir, "--win_rate_samples", "5"))
    assert metrics["val_win_rate"] == 0.5 and metrics["val_preference_accuracy"] == 0.5
    assert metrics["val_win_rate_low"] < 0.5 < metrics["val_win_rate_high"]
    assert metrics["val_score"] == metrics["val_reference_score"]
    grid = Image.open(os.path.join(out, "validation", "step-000002.png"))
    assert grid.size == (2 * 32 * 4, 5 * 32 * 4)  # 2 columns, 5 rows, upscaled 4x


def test_bad_pair_files(tmp_path, tiny_model_dir, pair_meta, run_script):
    pairs = json.load(open(pair_meta))[:4]
    cases = [({k: v for k, v in pairs[0].items() if k != "rejected"}, "missing key 'rejected'"),
             (dict(pairs[0], rejected=pairs[0]["preferred"]), "'preferred' and 'rejected' are the same image")]
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "small.png")
    cases.append((dict(pairs[0], rejected=str(tmp_path / "small.png")), "'rejected' is 16x16 but 'source' is 32x32"))
    for bad, message in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps([pairs[1], bad]))
        with pytest.raises(UserError, match=f"bad.json: entry 1: {message}"):
            run_script(tdpo, _args(tiny_model_dir, str(path), str(tmp_path / "o"), "--max_train_steps", "1"))


def test_dpo_config_parses():
    cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "dpo_config.yaml")
    args = tdpo.parse_args(["--config", cfg, "--preference_data", "p.json", "--output_dir", "o"])
    assert args.beta == 5000 and args.beta_unit == "mean" and args.use_lora and args.meta_path == ["p.json"]
    assert not tdpo.parse_args(["--config", cfg, "--preference_data", "p.json", "--output_dir", "o", "--no-use_lora"]).use_lora


def test_safeguard_scale_reaches_the_loss(tmp_path, tiny_model_dir, pair_meta, run_script, monkeypatch):
    """--safeguard_mu: each step's loss gets Diffusion-SDPO's lambda of that step's own prediction,
    (1 - mu) |r_w|^2 / <r_l, r_w> clipped to [0, 1] (residuals r = prediction - target); SFT refuses it."""
    seen = []
    real = tdpo.diffusion_dpo_loss

    def spy(pred, ref, target, beta, loss_type, loser_scale=None):
        seen.append((pred.detach().clone(), target.clone(), loser_scale))
        return real(pred, ref, target, beta, loss_type, loser_scale=loser_scale)

    monkeypatch.setattr(tdpo, "diffusion_dpo_loss", spy)
    run_script(tdpo, _args(tiny_model_dir, pair_meta, str(tmp_path / "o"), "--use_lora", "--max_train_steps", "2",
                           "--safeguard_mu", "0.6"))
    assert len(seen) == 2
    for pred, target, scale in seen:
        r_w, r_l = (pred - target).chunk(2)
        den = (r_l * r_w).sum().item()
        expected = 1.0 if den <= 0 else min(1.0, 0.4 * (r_w * r_w).sum().item() / den)
        assert float(scale) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match="--safeguard_mu scales the rejected half's gradient; --loss_type sft has no rejected half"):
        tdpo.parse_args(["--preference_data", "p.json", "--output_dir", "o", "--loss_type", "sft", "--safeguard_mu", "0.5"])


def test_preference_accuracy_is_half_at_init_and_rises_with_training(tmp_path, tiny_model_dir, pair_meta):
    from accelerate import Accelerator

    from myutils.data import RemovalDataset, read_meta

    args = tdpo.parse_args(_args(tiny_model_dir, pair_meta, str(tmp_path), "--use_lora"))
    comps = prepare.Components(args, Accelerator(), torch.float32)
    samples = [RemovalDataset(read_meta(pair_meta, "pair"), "pair", 32)[i] for i in range(6)]
    unet = comps.unet
    adapters.add_lora(unet, args, torch.float32)
    assert preference.preference_accuracy(unet, None, comps, samples, 32) == 0.5  # policy == reference: all ties
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)  # 1e-2 spikes (a known DPO failure)
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}
    for step in range(20):  # plain DPO steps on these pairs
        x, t, target, kw = tdpo.pair_inputs(comps, {**batch, "epoch": torch.full((6,), step)}, 32, seed=0)
        loss, _ = tdpo.diffusion_dpo_loss(unet(x, t, **kw).sample, tdpo.reference_prediction(unet, None, x, t, kw), target, 5000.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    whole = preference.preference_accuracy(unet, None, comps, samples, 32, chunk=6)
    assert whole > 0.5
    # in chunks of 2 pairs: the same accuracy, no UNet batch above 2 pairs (4 images), each image encoded once
    seen = {"unet": [], "encode": []}
    hooks = [unet.conv_in.register_forward_pre_hook(lambda m, i: seen["unet"].append(i[0].shape[0])),
             comps.vae.encoder.conv_in.register_forward_pre_hook(lambda m, i: seen["encode"].append(i[0].shape[0]))]
    try:
        assert preference.preference_accuracy(unet, None, comps, samples, 32, chunk=2) == whole
    finally:
        for h in hooks:
            h.remove()
    assert max(seen["unet"]) == 4 and sum(seen["encode"]) == 3 * 6  # preferred, rejected, masked source: once each


def test_sweep_runs_each_variant_once_and_tabulates(tmp_path, tiny_model_dir, pair_meta, disc_dir, capsys):
    import importlib.util

    from tests.test_build_preference_pairs import ROOT

    spec = importlib.util.spec_from_file_location("sweep_dpo", os.path.join(ROOT, "scripts", "sweep_dpo.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    argv = ["--output_root", str(tmp_path / "sweep"), "--betas", "0.5", "--variants", "lora", "sft", "--",
            "--pretrained_model_name_or_path", tiny_model_dir, "--preference_data", pair_meta, "--resolution", "32",
            "--train_batch_size", "2", "--report_to", "none", "--learning_rate", "1e-3", "--max_train_steps", "2",
            "--validation_steps", "2", "--validation_inference_steps", "2", "--num_validation_images", "2",
            "--discriminator_path", disc_dir, "--win_rate_samples", "4"]
    rows = sweep.main(argv)
    assert [r["run"] for r in rows] == ["start (reference)", "lora_beta0.5", "sft"]
    assert rows[1]["beta"] == "0.5 (sum)" and rows[1]["trained"].startswith("LoRA") and rows[2]["loss"] == "sft"
    assert rows[0]["win_rate"] == 0.5 and rows[0]["preference_accuracy"] == 0.5  # the start against itself
    for row, run in zip(rows[1:], ("lora_beta0.5", "sft")):  # each row is its run's own final validation
        m = json.load(open(tmp_path / "sweep" / run / "final_metrics.json"))["metrics"]
        assert (row["win_rate"], row["preference_accuracy"]) == (m["val_win_rate"], m["val_preference_accuracy"])
    for ext in ("md", "csv", "json"):
        assert os.path.isfile(tmp_path / "sweep" / f"sweep_results.{ext}")
    assert "| lora_beta0.5 | sigmoid | 0.5 (sum) |" in open(tmp_path / "sweep" / "sweep_results.md").read()
    capsys.readouterr()
    assert sweep.main(argv) == rows  # finished runs are skipped, the table is rebuilt from their files
    assert "done before, skipped" in capsys.readouterr().out


def test_dpo_resume_equals_a_straight_run(tmp_path, tiny_model_dir, pair_meta, run_script, crash_then_resume):
    """Killed right after checkpoint-1 and resumed: equal to a straight run (the beta schedule, which
    depends on the step, and the SDPO safeguard included)."""
    from safetensors.torch import load_file

    common = ["--use_lora", "--random_flip", "--checkpointing_steps", "1", "--beta_schedule", "linear", "--beta_end", "100",
              "--max_train_steps", "3", "--safeguard_mu", "0.6"]
    run_script(tdpo, _args(tiny_model_dir, pair_meta, str(tmp_path / "straight"), *common))
    half = str(tmp_path / "resumed")
    crash_then_resume(tdpo, _args(tiny_model_dir, pair_meta, half, *common))
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
