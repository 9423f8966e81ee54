"""Diffusion-DPO math against hand-computed values."""
import math

import pytest
import torch

from myutils.dpo_utils import beta_at, beta_in_mean_units, diffusion_dpo_loss, per_sample_error, sft_loss


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
