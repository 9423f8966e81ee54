"""myutils/lcm_utils.py against hand-computed values and an independent recomputation with
diffusers' own DDIM and LCM schedulers."""
import math

import pytest
import torch

from myutils.lcm_utils import (DDIMSolver, consistency_step, lcm_denoised, lcm_step_mean_std, per_sample_lcm_loss, predicted_noise,
                               predicted_origin, scalings_for_boundary_conditions)

ALPHAS = 1.0 - torch.arange(1000, dtype=torch.float64) / 1000.0  # alphas_cumprod[t] = 1 - t / 1000: easy by hand


def test_solver_timesteps_and_one_ddim_step_by_hand():
    solver = DDIMSolver(ALPHAS, 1000, 50)
    assert solver.ddim_timesteps.tolist() == list(range(19, 1000, 20))
    assert solver.ddim_alpha_cumprods_prev[0].item() == 1.0  # alphas_cumprod[0] before the first solver step
    assert solver.ddim_alpha_cumprods_prev[3].item() == pytest.approx(1 - 59 / 1000)  # index 3 steps back to t = 59
    x0, eps = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0)
    out = solver.ddim_step(x0, eps, torch.tensor([3, 0]))
    assert out[0].item() == pytest.approx(math.sqrt(0.941) + 2 * math.sqrt(0.059), abs=1e-6)
    assert out[1].item() == pytest.approx(1.0, abs=1e-6)  # a_prev = 1: x0 itself


def test_boundary_scalings():
    c_skip, c_out = scalings_for_boundary_conditions(torch.tensor([0, 1, 999]))
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0  # identity at t = 0
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25, rel=1e-5)  # (s t)^2 = 100
    assert c_out[1].item() == pytest.approx(10 / math.sqrt(100.25), rel=1e-5)
    assert c_skip[2].item() < 1e-8 and c_out[2].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_and_noise_round_trip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g), torch.tensor([10, 500, 990])
    a = ALPHAS[t].float().view(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v = alpha eps - sigma x0
    assert torch.allclose(predicted_origin(out, t, x, prediction_type, ALPHAS), x0, atol=1e-4)
    assert torch.allclose(predicted_noise(out, t, x, prediction_type, ALPHAS), eps, atol=1e-4)


def test_losses_by_hand():
    pred, target = torch.tensor([[0.003, 0.0]]), torch.zeros(1, 2)
    assert per_sample_lcm_loss(pred, target, "l2").item() == pytest.approx(0.003 ** 2 / 2)
    assert per_sample_lcm_loss(pred, target, "huber", 0.001).item() == pytest.approx((math.sqrt(1e-5) - 0.001) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        per_sample_lcm_loss(pred, target, "l1")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_consistency_step_matches_diffusers_ddim_and_lcm_schedulers(prediction_type):
    """Teacher CFG + one DDIM step = DDIMScheduler (trailing spacing, eta 0) on the guided output;
    student and target boundary conditions = LCMScheduler's `denoised`."""
    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False)  # as SDXL's scheduler: no x0 clipping
    ac = base.alphas_cumprod
    g = torch.Generator().manual_seed(1)
    w1, w2, w3 = (torch.randn(4, 4, generator=g) * 0.3 for _ in range(3))

    def net(weight):  # a fixed linear "UNet" per role, with a timestep dependence
        return lambda x, t: torch.einsum("oc,bchw->bohw", weight, x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    student, cond_net, uncond_net = net(w1), net(w2), net(w3)
    latents, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    index, w = torch.tensor([7, 0]), torch.tensor([2.5, 0.0])
    solver = DDIMSolver(ac, 1000, 50)
    pred, target, _ = consistency_step(student, lambda x, t: (cond_net(x, t), uncond_net(x, t)), student, latents, noise, index, w,
                                       solver, ac, prediction_type)

    ddim = DDIMScheduler.from_config(base.config, timestep_spacing="trailing", set_alpha_to_one=False)
    ddim.set_timesteps(50)
    lcm = LCMScheduler.from_config(base.config)
    for i in range(2):
        start = int(solver.ddim_timesteps[index[i]])
        t_prev = max(start - 20, 0)
        ts = torch.tensor([start])
        noisy = base.add_noise(latents[i:i + 1], noise[i:i + 1], ts)
        c, u = cond_net(noisy, ts), uncond_net(noisy, ts)
        x_prev = ddim.step(c + w[i] * (c - u), start, noisy, eta=0.0).prev_sample
        lcm.set_timesteps(timesteps=[start])
        want_pred = lcm.step(student(noisy, ts), start, noisy).denoised
        lcm.set_timesteps(timesteps=[t_prev])
        want_target = lcm.step(student(x_prev, torch.tensor([t_prev])), t_prev, x_prev).denoised
        assert torch.allclose(pred[i:i + 1], want_pred, atol=1e-4), (prediction_type, i)
        assert torch.allclose(target[i:i + 1], want_target, atol=1e-4), (prediction_type, i)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_step_is_lcm_schedulers_step(prediction_type):
    """Four steps of multistep LCM sampling = LCMScheduler.step with the same noise draws (a CPU
    generator; batch 1, so its draw is the same numbers as the noise handed in)."""
    from diffusers import DDPMScheduler, LCMScheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    lcm = LCMScheduler.from_config(base.config)
    lcm.set_timesteps(4)
    ts = lcm.timesteps.tolist()
    assert ts == [999, 759, 499, 259]  # 4 of the 50 solver steps, as inference_RORem_4S.py runs them
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 4, generator=g) * 0.3
    out_of = lambda x, t: torch.einsum("oc,bchw->bohw", w, x) * (1 + t / 1000)  # noqa: E731
    x = torch.randn(1, 4, 3, 3, generator=g)
    ours, draws = x.clone(), torch.Generator().manual_seed(7)
    theirs, their_draws = x.clone(), torch.Generator().manual_seed(7)
    for j, t in enumerate(ts):
        prev = ts[j + 1] if j + 1 < len(ts) else None
        denoised = lcm_denoised(out_of(ours, t), t, ours, prediction_type, base.alphas_cumprod)
        mean, std = lcm_step_mean_std(out_of(ours, t), t, prev, ours, prediction_type, base.alphas_cumprod)
        ours = mean if std is None else mean + std * torch.randn(1, 4, 3, 3, generator=draws)
        step = lcm.step(out_of(theirs, t), t, theirs, generator=their_draws)
        theirs = step.prev_sample
        assert torch.allclose(denoised, step.denoised, atol=1e-5), (prediction_type, j)
        assert torch.allclose(ours, theirs, atol=1e-5), (prediction_type, j)
    assert torch.equal(ours, denoised)  # the last step returns the consistency output itself


def test_lcm_step_by_hand():
    """t = 1 (c_skip = 0.25 / 100.25, c_out = 10 / sqrt(100.25)), epsilon 0, x = 2: x0 = 2 / sqrt(a_1)."""
    x, out = torch.full((1, 1, 1, 1), 2.0), torch.zeros(1, 1, 1, 1)
    want = 0.25 / 100.25 * 2 + 10 / math.sqrt(100.25) * (2 / math.sqrt(0.999))
    assert lcm_denoised(out, 1, x, "epsilon", ALPHAS).item() == pytest.approx(want, rel=1e-5)
    mean, std = lcm_step_mean_std(out, 1, 0, x, "epsilon", ALPHAS)
    assert mean.item() == pytest.approx(want, rel=1e-5) and std.item() == 0.0  # a_0 = 1: no noise added back
    mean, std = lcm_step_mean_std(out, 1, 500, x, "epsilon", ALPHAS)
    assert mean.item() == pytest.approx(math.sqrt(0.5) * want, rel=1e-5) and std.item() == pytest.approx(math.sqrt(0.5))
    mean, std = lcm_step_mean_std(out, 1, None, x, "epsilon", ALPHAS)
    assert mean.item() == pytest.approx(want, rel=1e-5) and std is None
