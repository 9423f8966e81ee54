"""flowmatch_step_with_logprob: the SDE step against DESIGN.md section 8's formulas, its log-prob
against a Gaussian density, noise_level 0 = diffusers' Euler step, and on a 1-D flow with a known
velocity field the SDE keeps the ODE's marginals while the naive Euler-plus-noise step does not."""
import math

import pytest
import torch

from myutils.rl_utils import flowmatch_step_with_logprob


def _scheduler(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(steps)
    return s


def test_sde_step_formulas_and_density():
    sched = _scheduler(10)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    k = 3
    t = sched.timesteps[k]
    prev, log_prob, mean, std_t = flowmatch_step_with_logprob(sched, v, t, x, 0.7, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    sigma, sigma_next = float(sched.sigmas[k]), float(sched.sigmas[k + 1])
    dt = sigma_next - sigma
    want_std = 0.7 * math.sqrt(sigma / (1 - sigma))
    want_mean = x * (1 + want_std ** 2 / (2 * sigma) * dt) + v * (1 + want_std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    assert std_t.flatten()[0].item() == pytest.approx(want_std, rel=1e-5)
    assert torch.allclose(mean, want_mean, atol=1e-5)
    z = torch.stack([torch.randn(3, 4, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    assert torch.allclose(prev, want_mean + want_std * math.sqrt(-dt) * z, atol=1e-5)
    density = torch.distributions.Normal(want_mean, want_std * math.sqrt(-dt)).log_prob(prev).mean(dim=(1, 2))
    assert torch.allclose(log_prob, density, atol=1e-4)
    again = flowmatch_step_with_logprob(sched, v, t, x, 0.7, prev_sample=prev)[1]
    assert torch.equal(again, log_prob)
    first = flowmatch_step_with_logprob(sched, v, sched.timesteps[0], x, 0.7, generator=g)[3]  # sigma = 1: sigma_max below
    assert first.flatten()[0].item() == pytest.approx(0.7 * math.sqrt(1 / (1 - float(sched.sigmas[1]))), rel=1e-5)


def test_noise_level_zero_is_the_euler_step():
    sched = _scheduler(10)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    t = sched.timesteps[4]
    ours = flowmatch_step_with_logprob(sched, v, t, x, 0.0)[0]
    sched._step_index = None
    euler = sched.step(v, t, x).prev_sample
    assert torch.allclose(ours, euler.float(), atol=1e-6)


def _sample(mode, steps=40, n=20000, m=2.0, s=0.5, seed=0):
    """x0 ~ N(m, s^2), x_sigma = (1 - sigma) x0 + sigma eps; the exact velocity E[eps - x0 | x_sigma]."""
    sched = _scheduler(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    for k, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[k])
        a = 1 - sigma
        var = a * a * s * s + sigma * sigma
        v = -m + (sigma - a * s * s) / var * (x - a * m)
        if mode == "ode":
            x = flowmatch_step_with_logprob(sched, v, t, x, 0.0)[0]
        else:
            noise = torch.randn(n, 1, generator=g)
            _, _, mean, std_t = flowmatch_step_with_logprob(sched, v, t, x, 0.7, prev_sample=x, naive=mode == "naive")
            x = mean + std_t * math.sqrt(float(sched.sigmas[k]) - float(sched.sigmas[k + 1])) * noise
    return x.mean().item(), x.std().item()


def test_sde_keeps_the_ode_marginals_and_the_naive_step_does_not():
    ode, sde, naive = _sample("ode"), _sample("sde"), _sample("naive")
    assert ode[0] == pytest.approx(2.0, abs=0.02) and ode[1] == pytest.approx(0.5, abs=0.02)
    assert sde[0] == pytest.approx(ode[0], abs=0.03) and sde[1] == pytest.approx(ode[1], abs=0.04)
    assert abs(naive[1] - ode[1]) > 0.1  # the extra variance is not undone
