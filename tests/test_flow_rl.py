"""The flow-matching path of train_RORem_ddpo.py (pipelines/flow_inpaint.py): FLUX-Fill conventions
against diffusers' FluxFillPipeline, ratio 1 on re-evaluation, the last step untrained, a trained
LoRA that the stock pipeline loads, and the pairwise-preference mode."""
import os

import pytest
import torch

import train_RORem_ddpo as tddpo
from myutils.rng import sample_generators
from training import rl_loop


def _args(model, meta, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--meta_path", meta, "--output_dir", out, "--resolution", "32",
            "--report_to", "none", "--sample_steps", "4", "--sample_batch_size", "2", "--sample_batches_per_epoch", "1",
            "--train_batch_size", "2", "--num_train_epochs", "2", "--learning_rate", "1e-3", "--eval_samples", "2",
            "--num_validation_images", "2", "--lora_rank", "4", "--max_sequence_length", "16", *extra]


@pytest.fixture(scope="module")
def flow(tiny_flux_dir, toy_meta):
    from myutils.data import RemovalDataset, read_meta
    from pipelines.flow_inpaint import FlowFillSampler

    sampler = FlowFillSampler(tiny_flux_dir, "cpu", torch.float32, 4, 1.0, 32, noise_level=0.7, max_sequence_length=16)
    ds = RemovalDataset(read_meta(toy_meta, "input"), "input", 32)
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(3)])
             for k in ("source", "mask", "original_size", "crop_top_left", "index", "epoch")}
    return sampler, rl_loop.expand_batch(batch, sampler, 1)


def test_step_length_is_the_sigma_drop_of_each_step(flow):
    sampler, _ = flow
    sigmas = sampler.scheduler.sigmas.tolist()
    assert [sampler.step_length(j) for j in range(4)] == pytest.approx([sigmas[j] - sigmas[j + 1] for j in range(4)])


def test_family_is_read_from_the_model_index(tiny_flux_dir, tiny_model_dir):
    from pipelines.flow_inpaint import model_family

    assert model_family(tiny_flux_dir) == "flow" and model_family(tiny_model_dir) == "sdxl"
    assert model_family("black-forest-labs/FLUX.1-Fill-dev") == "flow"


def test_packing_matches_the_fill_pipeline(flow, tiny_flux_dir):
    from diffusers import FluxFillPipeline

    from pipelines.flow_inpaint import pack, pack_mask, unpack

    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(pack(x), FluxFillPipeline._pack_latents(x, 2, 16, 4, 6))
    assert torch.equal(unpack(pack(x), 4, 6), x)
    pipe = FluxFillPipeline.from_pretrained(tiny_flux_dir)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    masked = torch.randn(2, 16, 4, 4)  # latents are passed through as they are
    want_mask, _ = pipe.prepare_mask_latents(mask, masked, 2, 16, 1, 32, 32, torch.float32, "cpu", None)
    assert torch.equal(pack_mask(mask, 8), want_mask)


def test_ode_sampler_equals_the_fill_pipeline(flow, tiny_flux_dir):
    """Deterministic sampling (the ODE used for evaluation) reproduces FluxFillPipeline's own loop from
    the same start and condition: sigmas, shift, timestep scale, guidance and inputs all agree."""
    from diffusers import FluxFillPipeline

    from pipelines.rl_sampler import sample_trajectory

    sampler, b = flow
    gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0)
    ours = sample_trajectory(sampler, sampler.model, b, gens, deterministic=True)
    assert ours["log_probs"].shape == (3, 0) and ours["latents"].shape == (3, 5, 4, 64)
    pipe = FluxFillPipeline.from_pretrained(tiny_flux_dir)
    encode = pipe.vae.encode

    class PosteriorMean:  # the pipeline samples the posterior; the sampler conditions on its mean
        def __init__(self, out):
            self.latent_dist = out.latent_dist
            self.latent_dist.sample = lambda generator=None: out.latent_dist.mean

    pipe.vae.encode = lambda x: PosteriorMean(encode(x))
    call = dict(prompt=[""] * 3, image=(b["source"] + 1) / 2, mask_image=b["mask"], height=32, width=32, num_inference_steps=4,
                guidance_scale=30.0, latents=ours["latents"][:, 0], max_sequence_length=16)
    want = pipe(**call, output_type="latent").images
    assert torch.allclose(ours["latents"][:, -1], want, atol=1e-4)
    # the VAE has FLUX's shift_factor: encoding (above, the condition) and decoding both apply it
    assert pipe.vae.config.shift_factor == pytest.approx(0.1159)
    images = pipe(**call, output_type="pt").images
    assert torch.allclose((sampler.decode(ours["latents"][:, -1]) + 1) / 2, images, atol=1e-4)


def test_sde_records_all_but_the_last_step_and_reevaluates_to_ratio_one(flow):
    from myutils.rl_utils import flowmatch_step_with_logprob, gaussian_log_prob
    from pipelines.rl_sampler import sample_trajectory

    sampler, b = flow
    with torch.no_grad():
        for n, p in sampler.model.named_parameters():
            p.add_(0)  # no-op: the base model is the policy here
    gens = sample_generators({"epoch": b["epoch"], "index": b["noise_index"]}, 0)
    traj = sample_trajectory(sampler, sampler.model, b, gens)
    assert sampler.num_train_steps == 3 and traj["log_probs"].shape == (3, 3)
    for j in range(3):
        mean, scale = sampler.distribution(sampler.model, traj["latents"][:, j], j, b)
        ratio = torch.exp(gaussian_log_prob(traj["latents"][:, j + 1], mean, scale) - traj["log_probs"][:, j])
        assert torch.equal(ratio, torch.ones(3))
        v = sampler.output(sampler.model, traj["latents"][:, j], j, b)
        lp = flowmatch_step_with_logprob(sampler.scheduler, v, sampler.timesteps[j], traj["latents"][:, j], 0.7,
                                         prev_sample=traj["latents"][:, j + 1])[1]
        assert torch.allclose(lp, traj["log_probs"][:, j], atol=1e-5)
    last, _ = sampler.distribution(sampler.model, traj["latents"][:, 3], 3, b, deterministic=True)
    assert torch.equal(traj["latents"][:, 4], last)  # the last step is the ODE step


def test_flow_grpo_trains_a_lora_the_stock_pipeline_loads(tmp_path, tiny_flux_dir, toy_meta, run_script):
    from diffusers import FluxFillPipeline
    from safetensors.torch import load_file

    out = str(tmp_path / "flow")
    final = run_script(tddpo, _args(tiny_flux_dir, toy_meta, out, "--algorithm", "grpo", "--group_size", "2", "--reward",
                                    "preserve=1,gt=1", "--kl_coef", "0.1"))
    assert final["start_eval_kl_to_start"] == 0.0 and final["eval_kl_to_start"] > 0
    assert {"eval_reward_gt", "eval_reward_preserve", "eval_sde_reward"} <= set(final)
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)
    pipe = FluxFillPipeline.from_pretrained(tiny_flux_dir)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(out)
    pipe.fuse_lora()
    after = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items()}
    # the stock pipeline fuses exactly the trained low-rank update (alpha = rank: scale 1) into the layers
    # the file names, and changes nothing else
    pairs = {k[len("transformer."):-len(".lora_A.weight")]: (lora[k], lora[k.replace("lora_A", "lora_B")]) for k in lora if "lora_A" in k}
    assert pairs and any(b.abs().max() > 0 for _, b in pairs.values())
    for layer, (a, b) in pairs.items():
        key = f"{layer}.weight"
        assert torch.allclose(after[key] - before[key], b.float() @ a.float(), atol=1e-6), layer
    assert all(torch.equal(before[k], after[k]) for k in before if k[:-len(".weight")] not in pairs)
    assert os.path.isfile(os.path.join(out, "validation", "step-000004.png"))

    # stopped after the first epoch and resumed: the same LoRA (the FLUX LoRA checkpoint loads back)
    half = str(tmp_path / "half")
    flow = ["--algorithm", "grpo", "--group_size", "2", "--reward", "preserve=1,gt=1", "--kl_coef", "0.1"]
    run_script(tddpo, _args(tiny_flux_dir, toy_meta, half, *flow) + ["--num_train_epochs", "1"])
    run_script(tddpo, _args(tiny_flux_dir, toy_meta, half, *flow, "--resume_from_checkpoint", "latest"))
    resumed = load_file(os.path.join(half, "pytorch_lora_weights.safetensors"))
    assert max((lora[k] - resumed[k]).abs().max().item() for k in lora) <= 1e-6


def test_pairwise_mode_pairs_share_their_start(tmp_path, tiny_flux_dir, toy_meta, run_script, monkeypatch):
    import pipelines.rl_sampler

    seen = {}
    real = pipelines.rl_sampler.sample_trajectory

    def spy(sampler, model, cond, generators, deterministic=False, start_generators=None):
        traj = real(sampler, model, cond, generators, deterministic, start_generators)
        if start_generators is not None:
            seen.setdefault("traj", traj)
        return traj

    monkeypatch.setattr(pipelines.rl_sampler, "sample_trajectory", spy)
    final = run_script(tddpo, _args(tiny_flux_dir, toy_meta, str(tmp_path / "pw"), "--algorithm", "pairwise", "--group_size", "2",
                                    "--reward", "gt=1", "--clip_range", "0.2", "--beta", "1.0"))
    lat = seen["traj"]["latents"]
    assert torch.equal(lat[0, 0], lat[1, 0]) and not torch.equal(lat[0, 1], lat[1, 1])  # same start, different steps
    assert final["eval_kl_to_start"] > 0


def test_flow_argument_errors(tiny_flux_dir, toy_meta, tmp_path):
    from myutils.errors import UserError

    base = ["--pretrained_model_name_or_path", tiny_flux_dir, "--meta_path", toy_meta, "--output_dir", str(tmp_path), "--reward", "gt=1"]
    for extra, message in [(["--noise_level", "0"], "--noise_level must be > 0"),
                           (["--pretrained_unet", "x"], "--pretrained_unet is for SDXL"),
                           (["--algorithm", "pairwise", "--group_size", "3"], "--group_size must be 2")]:
        with pytest.raises(UserError, match=message):
            tddpo.parse_args(base + extra)


def test_flow_configs_parse():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    real = tddpo.parse_args(["--config", os.path.join(root, "configs", "flow_grpo_config.yaml"), "--pretrained_model_name_or_path",
                             "black-forest-labs/FLUX.1-Fill-dev", "--meta_path", "m.json", "--output_dir", "o", "--discriminator_path", "d"])
    assert real.family == "flow" and real.noise_level == 0.7 and real.kl_coef == 0.04 and real.lora_alpha == 64
    toy = tddpo.parse_args(["--config", os.path.join(root, "configs", "toy_flow_grpo.yaml"), "--pretrained_model_name_or_path",
                            "toy/flux-fill", "--meta_path", "m.json", "--output_dir", "o"])
    assert toy.rewards == {"gt": 1.0, "preserve": 1.0} and toy.sample_steps == 8
