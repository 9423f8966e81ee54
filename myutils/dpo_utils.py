"""Diffusion-DPO (Wallace et al. 2023) for object removal: the loss, its metrics, beta units and schedules.

A batch stacks the pairs as [preferred_1..B, rejected_1..B], all four predictions made with the
same noise and timestep for both halves of a pair. Per-sample denoising error:
    err = mean over C, H, W of (pred - target)^2          (error_reduction="mean", the paper's unit)
    err = sum  over C, H, W of (pred - target)^2          (error_reduction="sum")
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
    sigmoid: loss = mean(-logsigmoid(inside))     (the mean is taken AFTER logsigmoid, per pair)
    hinge:   loss = mean(relu(1 - inside))
    ipo:     loss = mean((inside / beta - 1 / (2 beta))^2)
Beta units: the paper's beta (about 5000 for SD1.5/SDXL) multiplies mean errors; the research plan's
sweep (0.1 ... 2.0) only makes sense for summed errors. beta_sum * sum_err == beta_mean * mean_err
when beta_mean = beta_sum * (C * H * W), which `beta_in_mean_units` converts.
"""
import math

import torch
import torch.nn.functional as F

from .schedules import value_at

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def per_sample_error(pred, target, reduction="mean"):
    """Squared error per sample, reduced over every non-batch dimension, in fp32."""
    sq = (pred.float() - target.float()) ** 2
    dims = list(range(1, sq.dim()))
    return sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)


def beta_in_mean_units(beta, latent_shape, error_reduction):
    """The beta that gives the same loss on mean errors. latent_shape: (C, H, W) of one sample."""
    if error_reduction == "mean":
        return beta
    return beta * math.prod(latent_shape)


def diffusion_dpo_loss(model_pred, ref_pred, target, beta, loss_type="sigmoid", error_reduction="mean"):
    """(loss, metrics). Predictions and target are (2B, ...) stacked [preferred..., rejected...]."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if model_pred.shape[0] % 2:
        raise ValueError("the batch must stack [preferred..., rejected...]: an even number of samples")
    err_w, err_l = per_sample_error(model_pred, target, error_reduction).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = per_sample_error(ref_pred, target, error_reduction).chunk(2)
    model_diff, ref_diff = err_w - err_l, ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        losses = F.relu(1.0 - inside)
    else:
        losses = (inside / beta - 1.0 / (2.0 * beta)) ** 2
    with torch.no_grad():
        metrics = {
            "implicit_accuracy": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean().item(),
            "mse_preferred": err_w.mean().item(), "mse_rejected": err_l.mean().item(),
            "ref_mse_preferred": ref_w.mean().item(), "ref_mse_rejected": ref_l.mean().item(),
            "reward_margin": inside.mean().item(),  # beta-scaled implicit reward of preferred minus rejected
        }
    return losses.mean(), metrics


def sft_loss(model_pred, target):
    """The SFT-on-preferred baseline: plain denoising MSE on the preferred half of the stack."""
    preferred = model_pred.shape[0] // 2
    return F.mse_loss(model_pred[:preferred].float(), target[:preferred].float())


def beta_at(step, max_steps, beta, beta_end=None, schedule="constant"):
    """Beta at an optimizer step: constant, or moving from `beta` (step 0) to `beta_end`
    (max_steps) linearly or along a half cosine; a rising schedule is a warm-up, a falling one an anneal."""
    return value_at(step, max_steps, beta, beta_end, schedule)
