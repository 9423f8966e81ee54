"""Diffusion-DPO math against hand-computed values."""
import math

import pytest
import torch

from myutils.dpo_utils import (beta_at, beta_in_mean_units, diffusion_dpo_loss, per_sample_error, sft_loss,
                               winner_preserving_scale)


def _stack(preferred, rejected):
    return torch.tensor([preferred, rejected], dtype=torch.float32).reshape(2, 1, 1, 2)


def test_loss_by_hand():
    target = torch.zeros(2, 1, 1, 2)
    # policy errors: preferred mean(1^2, 1^2) = 1, rejected mean(2^2, 0) = 2 -> model_diff = -1
    model = _stack([1.0, 1.0], [2.0, 0.0])
    # reference errors: preferred 4, rejected 1 -> ref_diff = 3
    ref = _stack([2.0, 2.0], [1.0, 1.0])
    loss, m = diffusion_dpo_loss(model, ref, target, beta=0.5)
    inside = -0.5 * 0.5 * (-1 - 3)  # = 1.0
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-inside)))
    assert m["implicit_accuracy"] == 1.0 and m["reward_margin"] == pytest.approx(1.0)
    assert (m["mse_preferred"], m["mse_rejected"], m["ref_mse_preferred"], m["ref_mse_rejected"]) == (1.0, 2.0, 4.0, 1.0)
    hinge, _ = diffusion_dpo_loss(model, ref, target, beta=0.5, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.0)  # relu(1 - 1)
    hinge, _ = diffusion_dpo_loss(model, ref, target, beta=0.25, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.5)  # inside = -0.5 * 0.25 * (-4) = 0.5: relu(1 - 0.5)
    ipo, _ = diffusion_dpo_loss(model, ref, target, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.0 / 0.5 - 1.0 / (2 * 0.5)) ** 2)  # (2 - 1)^2


def test_mean_of_logsigmoid_not_logsigmoid_of_mean():
    target = torch.zeros(4, 1, 1, 1)
    model = torch.tensor([0.0, 3.0, 1.0, 0.0]).reshape(4, 1, 1, 1)  # pairs: (0 vs 1), (3 vs 0)
    ref = torch.zeros(4, 1, 1, 1)
    loss, m = diffusion_dpo_loss(model, ref, target, beta=1.0)
    insides = [-0.5 * (0 - 1), -0.5 * (9 - 0)]  # 0.5 and -4.5
    expected = sum(math.log(1 + math.exp(-x)) for x in insides) / 2
    assert loss.item() == pytest.approx(expected)
    assert loss.item() != pytest.approx(math.log(1 + math.exp(-sum(insides) / 2)))
    assert m["implicit_accuracy"] == 0.5


def test_log2_and_half_accuracy_at_init_and_sign():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 4, 3, 3, generator=g), torch.randn(8, 4, 3, 3, generator=g)
    loss, m = diffusion_dpo_loss(pred, pred.clone(), target, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2)) and m["implicit_accuracy"] == 0.5  # ties count half
    better = pred.clone()
    better[:4] = 0.9 * pred[:4] + 0.1 * target[:4]  # the winners' error goes down
    assert diffusion_dpo_loss(better, pred, target, beta=5000.0)[0] < loss


def test_beta_units_give_the_same_loss():
    g = torch.Generator().manual_seed(1)
    model, ref, target = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    by_sum, _ = diffusion_dpo_loss(model, ref, target, beta=0.5, error_reduction="sum")
    by_mean, _ = diffusion_dpo_loss(model, ref, target, beta=beta_in_mean_units(0.5, (4, 8, 8), "sum"))
    assert by_sum.item() == pytest.approx(by_mean.item(), rel=1e-5)
    assert beta_in_mean_units(5000, (4, 64, 64), "mean") == 5000
    assert per_sample_error(torch.ones(2, 2, 2), torch.zeros(2, 2, 2), "sum").tolist() == [4.0, 4.0]


def test_sft_and_beta_schedules():
    pred, target = torch.tensor([[1.0], [5.0]]), torch.zeros(2, 1)
    assert sft_loss(pred, target).item() == 1.0  # only the preferred half
    assert beta_at(5, 10, 100.0) == 100.0
    assert beta_at(5, 10, 100.0, 200.0, "linear") == 150.0
    assert beta_at(0, 10, 100.0, 200.0, "cosine") == pytest.approx(100.0)
    assert beta_at(5, 10, 100.0, 200.0, "cosine") == pytest.approx(150.0)
    assert beta_at(10, 10, 200.0, 100.0, "cosine") == pytest.approx(100.0)  # an anneal
    with pytest.raises(ValueError):
        beta_at(1, 10, 1.0, 2.0, "step")
    with pytest.raises(ValueError):
        diffusion_dpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), 1.0)


# ----------------------------------------------------------------------------- Diffusion-SDPO

def test_winner_preserving_scale_by_hand():
    target = torch.zeros(2, 1, 1, 2)
    # residuals: preferred (1, 0), rejected (1, 1): |g_w|^2 ~ 1, <g_l, g_w> ~ 1 -> lambda = 1 - mu
    pred = _stack([1.0, 0.0], [1.0, 1.0])
    assert winner_preserving_scale(pred, target, 0.6).item() == pytest.approx(0.4)
    assert winner_preserving_scale(pred, target, 1.0).item() == 0.0  # the rejected gradient switched off
    # rejected (4, 0): <g_l, g_w> ~ 4 -> lambda = (1 - 0.2) * 1 / 4 = 0.2
    assert winner_preserving_scale(_stack([1.0, 0.0], [4.0, 0.0]), target, 0.2).item() == pytest.approx(0.2)
    # rejected (0.5, 0): (1 - 0) / 0.5 = 2, capped at 1
    assert winner_preserving_scale(_stack([1.0, 0.0], [0.5, 0.0]), target, 0.0).item() == 1.0
    # rejected (-1, 3): <g_l, g_w> < 0, the rejected gradient already helps the preferred: 1
    assert winner_preserving_scale(_stack([1.0, 0.0], [-1.0, 3.0]), target, 0.6).item() == 1.0
    with pytest.raises(ValueError, match="mu must be in"):
        winner_preserving_scale(pred, target, 1.5)


def test_winner_preserving_scale_keeps_the_preferred_error_falling():
    """The safeguard's guarantee, checked with autograd's output-space gradients (the official
    get_adaptive_lose_l_scale's proxies: A, B = mean squared errors of each half): the update
    direction -grad A + lambda grad B has <d, grad A> <= -mu |grad A|^2, and lambda is the largest
    such value in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    binding = 0
    for trial in range(20):
        pred = torch.randn(8, 4, 3, 3, generator=gen)
        target = torch.randn(8, 4, 3, 3, generator=gen)
        if trial % 2:  # rejected residuals about twice the preferred ones: the case the safeguard exists for
            target[4:] = pred[4:] - 2.0 * (pred[:4] - target[:4]) + 0.1 * torch.randn(4, 4, 3, 3, generator=gen)
        mu = 0.1 * (trial % 10)
        p_w, p_l = pred.clone().chunk(2)
        p_w.requires_grad_(True)
        p_l.requires_grad_(True)
        t_w, t_l = target.chunk(2)
        g_a = torch.autograd.grad(((p_w - t_w) ** 2).mean(), p_w)[0].flatten()
        g_b = torch.autograd.grad(((p_l - t_l) ** 2).mean(), p_l)[0].flatten()
        lam = winner_preserving_scale(pred, target, mu).item()
        assert 0.0 <= lam <= 1.0
        assert torch.dot(-g_a + lam * g_b, g_a).item() <= -mu * g_a.pow(2).sum().item() + 1e-6
        if 0 < lam < 1:  # binding: a larger lambda breaks the guarantee
            assert torch.dot(-g_a + (lam + 1e-3) * g_b, g_a).item() > -mu * g_a.pow(2).sum().item()
            binding += 1
    assert binding >= 9  # every aligned trial (mu < 1) was a binding one


def test_safeguarded_loss_scales_only_the_rejected_gradient():
    gen = torch.Generator().manual_seed(1)
    target, ref = torch.randn(4, 2, 2, 2, generator=gen), torch.randn(4, 2, 2, 2, generator=gen)
    pred = torch.randn(4, 2, 2, 2, generator=gen)

    def grads(scale):
        p = pred.clone().requires_grad_(True)
        loss, m = diffusion_dpo_loss(p, ref, target, beta=3.0, loser_scale=scale)
        loss.backward()
        return loss.item(), p.grad, m

    plain_loss, plain, _ = grads(None)
    safe_loss, safe, m = grads(torch.tensor(0.25))
    assert safe_loss == pytest.approx(plain_loss)  # the value is the DPO loss
    assert torch.allclose(safe[:2], plain[:2]) and torch.allclose(safe[2:], 0.25 * plain[2:])
    assert m["loser_scale"] == 0.25


def test_scale_over_two_halves_of_a_batch_equals_the_whole_batch():
    """What --safeguard_mu computes on two ranks (num and den summed over both) equals one rank's."""
    gen = torch.Generator().manual_seed(2)
    pred, target = torch.randn(8, 2, 2, 2, generator=gen), torch.randn(8, 2, 2, 2, generator=gen)
    pw, pl = pred.chunk(2)
    tw, tl = target.chunk(2)
    halves = [(torch.cat([pw[:2], pl[:2]]), torch.cat([tw[:2], tl[:2]])), (torch.cat([pw[2:], pl[2:]]), torch.cat([tw[2:], tl[2:]]))]
    parts = []

    def collect(stats):
        parts.append(stats)
        return stats

    for p, t in halves:
        winner_preserving_scale(p, t, 0.3, reduce_sum=collect)
    total = parts[0] + parts[1]
    whole = winner_preserving_scale(pred, target, 0.3)
    assert winner_preserving_scale(*halves[0], 0.3, reduce_sum=lambda s: total).item() == pytest.approx(whole.item())
