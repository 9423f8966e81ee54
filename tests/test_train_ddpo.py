"""train_RORem_ddpo.py and pipelines/rl_sampler.py: the recorded trajectory, strength, ratio 1 on
re-evaluation, each algorithm trains only the LoRA, resume equality, rewards by hand, errors."""
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_RORem_ddpo as tddpo
from myutils.errors import UserError
from training import adapters, checkpoint, prepare, rl_loop, validation


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--report_to", "none", "--sample_steps", "4", "--sample_batch_size", "2", "--sample_batches_per_epoch", "2",
            "--train_batch_size", "2", "--num_train_epochs", "2", "--learning_rate", "1e-3", "--eval_samples", "2",
            "--num_validation_images", "2", "--lora_rank", "4", *extra]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, toy_meta, tmp_path_factory):
    from accelerate import Accelerator

    from myutils.data import RemovalDataset, read_meta

    args = tddpo.parse_args(_args(tiny_model_dir, toy_meta, str(tmp_path_factory.mktemp("x")), "--reward", "preserve=1"))
    comps = prepare.Components(args, Accelerator(), torch.float32, guidance_prompts=("", ""))
    adapters.add_lora(comps.unet, args, torch.float32)
    ds = RemovalDataset(read_meta(toy_meta, "input"), "input", 32)
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(3)])
             for k in ("source", "mask", "original_size", "crop_top_left", "index", "epoch")}
    return args, comps, batch


def _sampler(comps, steps, strength):
    from pipelines.rl_sampler import SDXLInpaintSampler

    return SDXLInpaintSampler(comps, steps, strength, 1.0, 32)


def test_strength_half_denoises_half_the_steps_from_the_noised_source(setup):
    from myutils.rng import sample_generators
    from pipelines.rl_sampler import sample_trajectory

    args, comps, batch = setup
    sampler = _sampler(comps, 10, 0.5)
    b = rl_loop.expand_batch(batch, sampler, 1)
    gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0)
    traj = sample_trajectory(sampler, comps.unet, b, gens)
    sched = sampler.scheduler
    assert traj["log_probs"].shape == (3, 5) and traj["latents"].shape == (3, 6, 4, 16, 16)
    assert sampler.timesteps == sched.timesteps[5:].tolist()
    gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0)
    noise = torch.stack([torch.randn(4, 16, 16, generator=g) for g in gens])
    start = sched.add_noise(b["source_latents"], noise, sched.timesteps[5:6].repeat(3))
    assert torch.allclose(traj["latents"][:, 0], start)  # the source noised to the first remaining timestep
    full_sampler = _sampler(comps, 10, 1.0)
    full = sample_trajectory(full_sampler, comps.unet, b, sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0))
    assert full["log_probs"].shape == (3, 10) and torch.equal(full["latents"][:, 0], noise)  # strength 1: pure noise


def test_sampler_step_is_diffusers_ddim_step(setup):
    """The recorded step is diffusers' own DDIM step at eta 1 with the same noise, and the
    deterministic step is its eta-0 step."""
    from myutils.rng import sample_generators
    from pipelines.rl_sampler import predict, sample_trajectory

    args, comps, batch = setup
    sampler = _sampler(comps, 4, 1.0)
    b = rl_loop.expand_batch(batch, sampler, 1)
    traj = sample_trajectory(sampler, comps.unet, b, sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0))
    kw = comps.condition.unet_kwargs(b["original_size"], b["crop_top_left"], (32, 32))
    x, t = traj["latents"][:, 1], sampler.timesteps[1]
    with torch.no_grad():
        out = predict(comps.unet, x, t, b["mask_latent"], b["masked_latents"], kw)
        mean, std = sampler.distribution(comps.unet, x, 1, b)
        z = (traj["latents"][:, 2] - mean) / std
        want = sampler.scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        assert torch.allclose(traj["latents"][:, 2], want, atol=1e-5)
        det = sampler.distribution(comps.unet, x, 1, b, deterministic=True)
        assert det[1] is None and torch.allclose(det[0], sampler.scheduler.step(out, t, x, eta=0.0).prev_sample, atol=1e-6)


def test_reevaluating_a_recorded_step_gives_ratio_one(setup):
    """The training pass recomputes each recorded step's log-prob exactly as the sampler did."""
    from myutils.rl_utils import gaussian_log_prob
    from myutils.rng import sample_generators
    from pipelines.rl_sampler import sample_trajectory

    args, comps, batch = setup
    with torch.no_grad():
        for n, p in comps.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a policy different from the base model
    sampler = _sampler(comps, 4, 1.0)
    b = rl_loop.expand_batch(batch, sampler, 1)
    traj = sample_trajectory(sampler, comps.unet, b, sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0))
    for j in range(len(sampler.timesteps)):
        mean, std = sampler.distribution(comps.unet, traj["latents"][:, j], j, b)  # with grad, as in training
        ratio = torch.exp(gaussian_log_prob(traj["latents"][:, j + 1], mean, std) - traj["log_probs"][:, j])
        assert torch.equal(ratio.detach(), torch.ones(3))


@pytest.mark.parametrize("family", ["sdxl", "flow"])
def test_ratio_is_one_on_shuffled_minibatches_in_training(tmp_path, tiny_model_dir, tiny_flux_dir, toy_meta, run_script, monkeypatch,
                                                          family):
    """Training recomputes log-probs on shuffled minibatches of samples and shuffled steps: with the
    policy frozen (lr 0), every recomputed step must match the log-prob recorded for that very sample
    and step (a sample paired with another's latents or log-probs gives a ratio far from one)."""
    seen = []
    real = rl_loop.ppo_loss

    def spy(log_prob, old_log_prob, advantages, clip_range):
        seen.append((log_prob.detach().clone(), old_log_prob.clone()))
        return real(log_prob, old_log_prob, advantages, clip_range)

    monkeypatch.setattr(rl_loop, "ppo_loss", spy)
    model = tiny_model_dir if family == "sdxl" else tiny_flux_dir
    extra = ["--max_sequence_length", "16"] if family == "flow" else []
    run_script(tddpo, _args(model, toy_meta, str(tmp_path / family), "--algorithm", "ppo", "--reward", "preserve=1", "--learning_rate", "0",
                            "--num_train_epochs", "1", "--num_inner_epochs", "2", "--train_batch_size", "2",
                            "--sample_batches_per_epoch", "2", "--timestep_fraction", "1.0", *extra))
    steps = 4 if family == "sdxl" else 3  # the flow sampler's last step is the ODE's, never trained
    assert len(seen) == 2 * 2 * steps  # inner epochs x minibatches x steps
    for new, old in seen:
        assert torch.allclose(torch.exp(new - old), torch.ones_like(new), atol=1e-5)
    first, second = [o for _, o in seen[:2 * steps]], [o for _, o in seen[2 * steps:]]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))  # the second pass drew another order
    everything = torch.cat([o for _, o in seen])
    assert len(set(everything.tolist())) > len(everything) // 4  # distinct samples and steps, not one repeated


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo", "grpo"])
def test_each_algorithm_trains_only_the_lora(tmp_path, tiny_model_dir, toy_meta, disc_dir, run_script, monkeypatch, algorithm):
    from diffusers import UNet2DConditionModel

    saved = {}
    real_final = checkpoint.save_final
    monkeypatch.setattr(checkpoint, "save_final", lambda acc, args, model, save, **kw: (saved.setdefault("m", acc.unwrap_model(model)),
                                                                               real_final(acc, args, model, save, **kw)))
    out = str(tmp_path / algorithm)
    extra = ["--algorithm", algorithm, "--discriminator_path", disc_dir, "--reward", "discriminator=1,preserve=0.5,jpeg=0.01",
             "--kl_coef", "0.1", "--clip_range", "0.2"]
    if algorithm == "grpo":
        extra += ["--group_size", "2", "--sample_batch_size", "1"]
    final = run_script(tddpo, _args(tiny_model_dir, toy_meta, out, *extra))
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in saved["m"].state_dict().items() if "lora" not in k}
    assert all(torch.equal(trained[k].float(), base[k].float()) for k in base)
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    assert {"start_eval_reward", "eval_reward", "eval_reward_discriminator", "eval_reward_preserve", "eval_reward_jpeg", "eval_sde_reward",
            "eval_kl_to_start"} <= set(final)
    assert final["start_eval_kl_to_start"] == 0.0 and final["eval_kl_to_start"] > 0  # the policy moved away from its start
    assert os.path.isfile(os.path.join(out, "checkpoint-4", "custom_checkpoint_0.pkl"))  # the reward tracker is checkpointed
    assert os.path.isfile(os.path.join(out, "validation", "step-000004.png"))
    import json
    shown = json.load(open(os.path.join(out, "validation", "step-000004.json")))  # the grid's columns with their rewards
    assert len(shown["current"]) == 2 and {"reward", "discriminator", "preserve", "jpeg"} <= set(shown["current"][0])


def test_resume_equals_a_straight_run(tmp_path, tiny_model_dir, toy_meta, run_script, sigterm_at_step):
    """From an epoch's end, and from a SIGTERM inside an epoch (step 1 of 2 in epoch 0): the checkpoint
    holds that epoch's samples, the resumed run trains on them from where it stopped, then samples
    epoch 1 as the straight run did."""
    common = ["--reward", "preserve=1", "--algorithm", "ppo", "--clip_range", "0.2", "--stat_min_count", "2"]
    run_script(tddpo, _args(tiny_model_dir, toy_meta, str(tmp_path / "straight"), *common))
    a = load_file(str(tmp_path / "straight" / "pytorch_lora_weights.safetensors"))
    half = str(tmp_path / "resumed")
    run_script(tddpo, _args(tiny_model_dir, toy_meta, half, *common) + ["--num_train_epochs", "1"])
    assert not os.path.exists(os.path.join(half, "checkpoint-2", rl_loop.EPOCH_SAMPLES.format(0)))  # an epoch's end needs none
    run_script(tddpo, _args(tiny_model_dir, toy_meta, half, *common, "--resume_from_checkpoint", "latest"))
    b = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    killed = str(tmp_path / "killed")
    sigterm_at_step(1)
    with pytest.raises(SystemExit) as stop:
        run_script(tddpo, _args(tiny_model_dir, toy_meta, killed, *common))
    assert stop.value.code == 0 and checkpoint.list_checkpoints(killed) == ["checkpoint-1"]
    assert os.path.isfile(os.path.join(killed, "checkpoint-1", rl_loop.EPOCH_SAMPLES.format(0)))
    run_script(tddpo, _args(tiny_model_dir, toy_meta, killed, *common, "--resume_from_checkpoint", "latest"))
    c = load_file(os.path.join(killed, "pytorch_lora_weights.safetensors"))
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6


def test_argument_errors(tiny_model_dir, toy_meta, tmp_path):
    base = ["--meta_path", toy_meta, "--output_dir", str(tmp_path)]
    for extra, message in [(["--reward", "preserve=1", "--algorithm", "grpo"], "--group_size must be at least 2"),
                           (["--reward", "preserve=1", "--eta", "0"], "--eta must be > 0"),
                           (["--reward", "discriminator=1"], "needs --discriminator_path"),
                           (["--reward", "beauty=1"], "unknown reward 'beauty'"),
                           (["--reward", "preserve=x"], "not a number"),
                           (["--reward", "preserve=1", "--train_batch_size", "3"], "must divide"),
                           (["--reward", "preserve=1", "--no-use_lora"], "trains a LoRA"),
                           (["--reward", "preserve=1", "--gradient_accumulation_steps", "3"], "never span epochs")]:
        with pytest.raises(UserError, match=message):
            tddpo.parse_args(base + extra)


@pytest.mark.parametrize("sign,algorithm", [(1.0, "reinforce"), (-1.0, "reinforce"), (1.0, "pairwise"), (-1.0, "pairwise")])
def test_a_reward_on_the_image_rises_either_way(tmp_path, tiny_model_dir, toy_meta, run_script, monkeypatch, sign, algorithm):
    """A task with a known answer: reward = +-(mean of the result's latents). Whichever way it points,
    REINFORCE moves the held-out reward (fixed inputs and noises, deterministic sampler) that way; so
    does the pairwise-preference loss with the reward as the judge of each pair."""
    def mean_latent_reward(args, reward_model, sampler, final_latents, batch):
        r = sign * final_latents.float().mean((1, 2, 3)).cpu()
        return {"mean_latent": r}, r

    monkeypatch.setattr(rl_loop, "compute_rewards", mean_latent_reward)
    extra = ["--group_size", "2", "--sample_batch_size", "6", "--beta", "2", "--clip_range", "0.5"] if algorithm == "pairwise" else []
    final = run_script(tddpo, _args(tiny_model_dir, toy_meta, str(tmp_path / "run"), "--reward", "preserve=1", "--algorithm",
                                    algorithm, "--sample_batch_size", "12", "--sample_batches_per_epoch", "1", "--train_batch_size",
                                    "12", "--num_train_epochs", "20", "--learning_rate", "1e-2", "--eval_samples", "4",
                                    "--checkpointing_epochs", "0", "--stat_min_count", "1000", *extra))
    assert final["eval_reward"] > final["start_eval_reward"]


def test_configs_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    real = tddpo.parse_args(["--config", os.path.join(root, "configs", "ddpo_config.yaml"), "--meta_path", "m.json",
                             "--output_dir", "o", "--discriminator_path", "d"])
    assert real.algorithm == "ppo" and real.rewards == {"discriminator": 1.0, "preserve": 0.1} and real.clip_range == 1e-4
    toy = tddpo.parse_args(["--config", os.path.join(root, "configs", "toy_ddpo.yaml"), "--meta_path", "m.json",
                            "--output_dir", "o", "--discriminator_path", "d"])
    assert toy.algorithm == "grpo" and toy.group_size == 4


def _label_by_reward(path):
    """Fill an exported pairs.json's labels the way pair_preferences judges by the reward."""
    with open(path) as f:
        doc = json.load(f)
    for p in doc["pairs"]:
        p["label"] = "a" if p["reward_a"] > p["reward_b"] else "b" if p["reward_b"] > p["reward_a"] else "tie"
    with open(path, "w") as f:
        json.dump(doc, f)
    return doc


PAIRWISE = ["--reward", "preserve=1", "--algorithm", "pairwise", "--group_size", "2", "--beta", "2", "--clip_range", "0.5",
            "--learning_rate", "1e-2"]


def test_pairs_labelled_by_hand_train_exactly_like_the_reward_that_labelled_them(tmp_path, tiny_model_dir, toy_meta, run_script):
    """Two labelling rounds (export, label, train on the labels, export from the trained policy...)
    with labels copied from the reward give the same LoRA as two online pairwise epochs judged by
    that reward: the label path feeds the same trajectories and preferences to the same update."""
    online = str(tmp_path / "online")
    run_script(tddpo, _args(tiny_model_dir, toy_meta, online, *PAIRWISE))
    out = str(tmp_path / "labelled")
    for r in range(2):
        pairs_dir = tmp_path / f"round{r}"
        assert run_script(tddpo, _args(tiny_model_dir, toy_meta, out, *PAIRWISE, "--export_pairs", pairs_dir,
                                       "--resume_from_checkpoint", "latest")) is None
        doc = _label_by_reward(pairs_dir / "pairs.json")
        assert doc["global_step"] == 4 * r  # the policy each round samples with: the previous round's
        assert len(doc["pairs"]) == 4 and sorted(os.listdir(pairs_dir)) == [
            "pair-00000.png", "pair-00001.png", "pair-00002.png", "pair-00003.png", "pairs.json", "trajectories-rank0.pt"]
        assert Image.open(pairs_dir / "pair-00000.png").size == (4 * 32 * 4, 32 * 4)  # source | mask | a | b, upscaled
        run_script(tddpo, _args(tiny_model_dir, toy_meta, out, *PAIRWISE, "--pair_labels", pairs_dir / "pairs.json",
                                "--resume_from_checkpoint", "latest"))
    assert checkpoint.list_checkpoints(out) == checkpoint.list_checkpoints(online)
    a = load_file(os.path.join(online, "pytorch_lora_weights.safetensors"))
    b = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_pair_label_errors(tmp_path, tiny_model_dir, toy_meta, run_script):
    pairs_dir, out = tmp_path / "pairs", str(tmp_path / "run")
    run_script(tddpo, _args(tiny_model_dir, toy_meta, out, *PAIRWISE, "--export_pairs", pairs_dir))
    path = pairs_dir / "pairs.json"
    with open(path) as f:
        doc = json.load(f)

    def train_with(labels, *extra):
        for p, label in zip(doc["pairs"], labels):
            p["label"] = label
        with open(path, "w") as f:
            json.dump(doc, f)
        return run_script(tddpo, _args(tiny_model_dir, toy_meta, out, *PAIRWISE, "--pair_labels", path, *extra))

    with pytest.raises(UserError, match=r"pairs\.json: pairs\[1\] \(pair-00001\.png\): label must be .*got 'left'"):
        train_with(["a", "left", None, None])
    with pytest.raises(UserError, match="no pair is labelled"):
        train_with(["tie", None, None, None])
    with pytest.raises(UserError, match="sampled with --sample_steps 4, this run has 3"):
        train_with(["a", "b", None, "tie"], "--sample_steps", "3")
    train_with(["a", "b", None, "tie"])
    with pytest.raises(UserError, match="sampled by the policy at step 0, but this run resumes at step 4"):
        train_with(["a", "b", None, "tie"], "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match="--export_pairs is for --algorithm pairwise"):
        tddpo.parse_args(_args(tiny_model_dir, toy_meta, out, "--reward", "preserve=1", "--export_pairs", "x"))


def test_evaluation_runs_in_bounded_chunks_with_the_same_result(setup, toy_meta):
    """--eval_batch_size bounds what the UNet and the VAE see at once, however many held-out inputs
    there are; the metrics and images equal a one-chunk evaluation (noise is keyed by sample index)."""
    import argparse

    from myutils.data import read_meta

    args, comps, _ = setup
    sampler = _sampler(comps, 3, 1.0)
    samples = validation.validation_samples(args, read_meta(toy_meta, "input"), "input", 6)
    seen = {"unet": [], "decode": [], "encode": []}
    hooks = [comps.unet.conv_in.register_forward_pre_hook(lambda m, i: seen["unet"].append(i[0].shape[0])),
             comps.vae.decoder.conv_in.register_forward_pre_hook(lambda m, i: seen["decode"].append(i[0].shape[0])),
             comps.vae.encoder.conv_in.register_forward_pre_hook(lambda m, i: seen["encode"].append(i[0].shape[0]))]
    try:
        chunked = rl_loop.evaluate(comps.unet, sampler, argparse.Namespace(**{**vars(args), "eval_batch_size": 2}), samples, None)
    finally:
        for h in hooks:
            h.remove()
    assert len(samples) == 6 and max(max(v) for v in seen.values()) <= 2 and sum(seen["decode"]) >= 6
    whole = rl_loop.evaluate(comps.unet, sampler, argparse.Namespace(**{**vars(args), "eval_batch_size": 6}), samples, None)
    assert chunked[0].keys() == whole[0].keys() and all(abs(chunked[0][k] - whole[0][k]) < 1e-5 for k in whole[0])
    assert torch.allclose(chunked[1], whole[1], atol=1e-5) and len(chunked[2]) == 6


def test_evaluation_memory_does_not_grow_with_the_held_out_set(setup, toy_meta):
    """Every tensor evaluate() makes is tracked: with --eval_batch_size 2, three times the held-out
    inputs raise the peak by no more than the extra results it returns (decoded images, kept on the
    host in a real run), while one chunk of all of them raises it by the models' activations too."""
    import argparse

    from myutils import planner as pl
    from myutils.data import read_meta

    args, comps, _ = setup
    sampler = _sampler(comps, 3, 1.0)
    samples = validation.validation_samples(args, read_meta(toy_meta, "input"), "input", 6)

    def peak(n, chunk):
        live = pl.LiveTensorBytes()
        with live:
            rl_loop.evaluate(comps.unet, sampler, argparse.Namespace(**{**vars(args), "eval_batch_size": chunk}), samples[:n], None)
        return live.peak

    image = 3 * 32 * 32 * 4
    base, chunked, whole = peak(2, 2), peak(6, 2), peak(6, 6)
    assert chunked - base <= 2 * 4 * image  # the 4 extra images, and their concatenation at the end
    assert whole - base > 4 * (chunked - base)


def test_eval_kl_to_start_is_zero_at_the_start_and_grows_with_the_square_of_the_update(setup, toy_meta):
    """eval_kl_to_start compares the policy with its start (the LoRA off): zero while the LoRA's update is
    zero, and, the step means moving linearly with a small update, four times larger for twice the update."""
    import copy

    from myutils.data import read_meta

    args, comps, _ = setup
    model = copy.deepcopy(comps.unet)  # the module's shared UNet is left as it is
    sampler = _sampler(comps, 3, 1.0)
    samples = validation.validation_samples(args, read_meta(toy_meta, "input"), "input", 2)
    ups = [p for n, p in model.named_parameters() if "lora_B" in n]
    directions = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(ups)]

    def kl_at(scale):
        with torch.no_grad():
            for p, d in zip(ups, directions):
                p.copy_(scale * 1e-3 * d)
        return rl_loop.evaluate(model, sampler, args, samples, None)[0]["eval_kl_to_start"]

    small, double = kl_at(1.0), kl_at(2.0)
    assert kl_at(0.0) == 0.0 and small > 0
    assert double / small == pytest.approx(4.0, rel=0.05)
