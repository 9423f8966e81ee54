"""myutils/rl_utils.py against diffusers' DDIM step, an independent Gaussian density and hand values."""
import math

import numpy as np
import pytest
import torch

from myutils.rl_utils import (PerInputStatTracker, clip_advantages, ddim_step_with_logprob, gaussian_kl, group_advantages, ppo_loss,
                              reinforce_loss)


def _scheduler(prediction_type):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                      prediction_type=prediction_type)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("prediction_type, eta", [("epsilon", 1.0), ("v_prediction", 1.0), ("epsilon", 0.5)])
def test_step_matches_diffusers_and_log_prob_is_the_gaussian_density(prediction_type, eta):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    sample, out = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = int(sched.timesteps[3])
    prev, log_prob = ddim_step_with_logprob(sched, out, t, sample, eta=eta, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    z = torch.stack([torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    want = sched.step(out, t, sample, eta=eta, variance_noise=z).prev_sample  # diffusers' own stochastic DDIM step
    assert torch.allclose(prev, want, atol=1e-5)
    std = eta * math.sqrt(sched._get_variance(t, t - 100))  # 1000 // 10 steps; diffusers' std_dev_t = eta * sqrt(variance)
    mean = want - std * z
    density = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, density, atol=1e-4)
    again = ddim_step_with_logprob(sched, out, t, sample, eta=eta, prev_sample=prev)[1]
    assert torch.equal(torch.exp(again - log_prob), torch.ones(2))  # re-evaluated with unchanged weights: ratio exactly 1
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(sched, out, t, sample, eta=0.0)


def test_gaussian_kl_by_hand():
    assert gaussian_kl(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor(0.5)).item() == pytest.approx(2.0)  # 1 / (2 * 0.25)


def test_stat_tracker_per_input_with_batch_fallback():
    tracker = PerInputStatTracker(buffer_size=4, min_count=3)
    adv = tracker.update(["a", "a", "b"], [1.0, 3.0, 5.0])  # both below min_count: batch mean 3, std sqrt(8/3)
    assert adv == pytest.approx([(1 - 3) / math.sqrt(8 / 3), 0.0, (5 - 3) / math.sqrt(8 / 3)], rel=1e-5)
    adv = tracker.update(["a", "b"], [5.0, 5.0])  # a has [1, 3, 5]: mean 3, std sqrt(8/3); b has 2 (< 3): batch stats (std 0)
    assert adv[0] == pytest.approx(2 / math.sqrt(8 / 3), rel=1e-5) and adv[1] == 0.0
    tracker.update(["a", "a"], [7.0, 9.0])  # the buffer keeps the last 4: [3, 5, 7, 9]
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 7.0, 9.0]
    restored = PerInputStatTracker(buffer_size=4, min_count=3)
    restored.load_state_dict(tracker.state_dict())
    assert restored.update(["a"], [6.0]) == pytest.approx(tracker.update(["a"], [6.0]))


def test_group_advantages_and_clipping():
    adv = group_advantages([1.0, 3.0, 5.0, 2.0, 2.0], ["a", "a", "b", "c", "c"])
    assert adv == pytest.approx([-1.0, 1.0, 0.0, 0.0, 0.0], abs=1e-5)  # a: mean 2, std 1; b alone: 0; c: all equal
    assert clip_advantages(np.array([-9.0, 0.5, 7.0]), 5).tolist() == [-5.0, 0.5, 5.0]


def test_ppo_and_reinforce_losses_by_hand():
    ratio = torch.tensor([0.5, 1.0, 1.5])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, kl, clipfrac = ppo_loss(torch.log(ratio), old, adv, clip_range=0.2)
    # per sample max(-A r, -A clip(r)): max(-0.5, -0.8) = -0.5; max(1, 1) = 1; max(-3, -2.4) = -2.4
    assert loss.item() == pytest.approx((-0.5 + 1.0 - 2.4) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    assert kl.item() == pytest.approx(0.5 * (math.log(0.5) ** 2 + math.log(1.5) ** 2) / 3)
    assert reinforce_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, -1.0])).item() == pytest.approx(-0.5)  # -(-1 + 2) / 2


def test_pair_preferences_label_the_higher_reward_and_skip_ties():
    from myutils.rl_utils import pair_preferences

    assert pair_preferences([1.0, 0.0, 0.5, 0.5, -1.0, 2.0]).tolist() == [1, -1, 0, 0, -1, 1]


def test_pairwise_preference_loss_by_hand():
    import math

    from myutils.rl_utils import pairwise_preference_loss

    log_prob = torch.tensor([0.1, -0.05, 0.5, 0.0, 0.3, 0.2], requires_grad=True)
    old = torch.zeros(6)
    pref = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0])  # pair 1: first preferred, pair 2: second, pair 3: tie
    loss = pairwise_preference_loss(log_prob, old, pref, beta=2.0, clip_range=0.2)
    first = math.log(1 + math.exp(-2.0 * (0.1 - (-0.05))))            # -log sigmoid(beta (log r_w - log r_l))
    second = math.log(1 + math.exp(-2.0 * (0.0 - math.log(1.2))))     # exp(0.5) clamped to 1.2; w is the second sample
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-5)
    loss.backward()
    assert log_prob.grad[0] < 0 < log_prob.grad[1]  # descent raises the preferred sample's log-prob, lowers the other's
    assert log_prob.grad[2] == 0 and log_prob.grad[4] == 0 and log_prob.grad[5] == 0  # clamped ratio; tie


def test_flowmatch_mean_std_scale_is_std_times_sqrt_minus_dt():
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from myutils.rl_utils import flowmatch_step_mean_std

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(6)
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    mean, scale, std = flowmatch_step_mean_std(s, v, s.timesteps[2], x, 0.5)
    dt = float(s.sigmas[3] - s.sigmas[2])
    assert scale.flatten()[0].item() == pytest.approx(std.flatten()[0].item() * math.sqrt(-dt), rel=1e-6)
    euler, zero, _ = flowmatch_step_mean_std(s, v, s.timesteps[2], x, 0.0)
    assert torch.allclose(euler, x + v * dt, atol=1e-6) and zero.abs().max() == 0


def test_grpo_batch_std_divides_every_group_by_the_std_of_all_rewards():
    r, keys = [1.0, 3.0, 5.0, 5.5, 2.0, 2.0], ["a", "a", "b", "b", "c", "c"]
    adv = group_advantages(r, keys, std="batch")
    s = np.std(r)  # Flow-GRPO's global_std: one scale for the whole batch
    assert adv == pytest.approx([-1 / s, 1 / s, -0.25 / s, 0.25 / s, 0, 0], rel=1e-5)
    assert group_advantages(r, keys, std="group")[2:4] == pytest.approx([-1, 1], rel=1e-5)  # each group's own: +-1 however close
    with pytest.raises(ValueError, match="std must be one of"):
        group_advantages(r, keys, std="global")


def test_kl_units_exact_and_flow_grpo_on_a_flow_step():
    """flow_grpo's KL is mean((mu - mu_ref)^2) / (2 std^2) with std = noise_level sqrt(sigma / (1 - sigma)),
    no |dt|; the exact Gaussian KL of the step (scale std sqrt|dt|) is that divided by |dt|."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from myutils.rl_utils import flowmatch_step_mean_std, kl_in_unit

    s = FlowMatchEulerDiscreteScheduler()
    s.set_timesteps(10)
    x, v, v_ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    mean, scale, std = flowmatch_step_mean_std(s, v, s.timesteps[3], x, 0.7, step_index=3)
    ref_mean, _, _ = flowmatch_step_mean_std(s, v_ref, s.timesteps[3], x, 0.7, step_index=3)
    dt = float(s.sigmas[3] - s.sigmas[4])
    flow_grpo = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std.reshape(-1) ** 2)
    exact = gaussian_kl(mean, ref_mean, scale)
    assert torch.allclose(kl_in_unit(exact, "flow_grpo", dt), flow_grpo, rtol=1e-5)
    assert torch.allclose(kl_in_unit(exact, "exact", dt), flow_grpo / dt, rtol=1e-5) and 5 < 1 / dt < 20
