"""Diffusion-DPO (Wallace et al. 2023) for object removal: the loss, its metrics, beta units and schedules;
and Diffusion-KTO (Li et al. 2024), the same implicit reward on single results labelled good or bad.

A batch stacks the pairs as [preferred_1..B, rejected_1..B], all four predictions made with the
same noise and timestep for both halves of a pair. Per-sample denoising error:
    err = mean over C, H, W of (pred - target)^2          (error_reduction="mean", the paper's unit)
    err = sum  over C, H, W of (pred - target)^2          (error_reduction="sum")
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
    sigmoid: loss = mean(-logsigmoid(inside))     (the mean is taken AFTER logsigmoid, per pair)
    hinge:   loss = mean(relu(1 - inside))
    ipo:     loss = mean((inside / beta - 1 / (2 beta))^2)
Diffusion-SDPO (Fu et al. 2025, the safeguard): the rejected half's error enters the loss as
err_l.detach() + lambda * (err_l - err_l.detach()) (same value, gradient scaled by lambda), with
    lambda = min(1, (1 - mu) |g_w|^2 / <g_l, g_w>)  when <g_l, g_w> > 0, else 1,
g_w and g_l the output-space gradients of the preferred and rejected halves' errors (pairs share
noise and timestep, so their elements line up): to first order the step then lowers the preferred
error by at least mu |g_w|^2, instead of letting it rise with the rejected one's.
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


def winner_preserving_scale(model_pred, target, mu, reduce_sum=None, max_scale=1.0):
    """Diffusion-SDPO's lambda (see the top) for a stacked [preferred..., rejected...] batch, one
    scalar for the batch. The mean errors' output-space gradients are 2 (pred - target) / n, so
    their common factor cancels in the ratio; `reduce_sum` (e.g. a sum over ranks) makes the ratio
    the global batch's."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    with torch.no_grad():
        r_w, r_l = (model_pred.float() - target.float()).chunk(2)
        stats = torch.stack([(r_w * r_w).sum(), (r_l * r_w).sum()])
        if reduce_sum is not None:
            stats = reduce_sum(stats)
        num, den = stats[0], stats[1]
        # den <= 0: the rejected gradient does not pull the preferred error up, no need to scale it
        # (decided on the device: a host branch would wait for the GPU every micro-batch)
        scale = ((1.0 - mu) * num / torch.where(den > 0, den, 1.0)).clamp(0.0, max_scale)
        return torch.where(den > 0, scale, torch.full_like(scale, max_scale))


def diffusion_dpo_loss(model_pred, ref_pred, target, beta, loss_type="sigmoid", error_reduction="mean", loser_scale=None):
    """(loss, metrics). Predictions and target are (2B, ...) stacked [preferred..., rejected...].
    loser_scale: Diffusion-SDPO's lambda (winner_preserving_scale), scaling the rejected half's
    gradient only."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if model_pred.shape[0] % 2:
        raise ValueError("the batch must stack [preferred..., rejected...]: an even number of samples")
    err_w, err_l = per_sample_error(model_pred, target, error_reduction).chunk(2)
    if loser_scale is not None:
        err_l = err_l.detach() + loser_scale * (err_l - err_l.detach())
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
    with torch.no_grad():  # tensors on the device: read once per logging step, not here
        metrics = {
            "implicit_accuracy": ((inside > 0).float() + 0.5 * (inside == 0).float()).mean(),
            "mse_preferred": err_w.mean(), "mse_rejected": err_l.mean(),
            "ref_mse_preferred": ref_w.mean(), "ref_mse_rejected": ref_l.mean(),
            "reward_margin": inside.mean(),  # beta-scaled implicit reward of preferred minus rejected
        }
        if loser_scale is not None:
            metrics["loser_scale"] = torch.as_tensor(loser_scale, dtype=torch.float32, device=inside.device)
    return losses.mean(), metrics


def sft_loss(model_pred, target):
    """The SFT-on-preferred baseline: plain denoising MSE on the preferred half of the stack."""
    preferred = model_pred.shape[0] // 2
    return F.mse_loss(model_pred[:preferred].float(), target[:preferred].float())


def beta_at(step, max_steps, beta, beta_end=None, schedule="constant"):
    """Beta at an optimizer step: constant, or moving from `beta` (step 0) to `beta_end`
    (max_steps) linearly or along a half cosine; a rising schedule is a warm-up, a falling one an anneal."""
    return value_at(step, max_steps, beta, beta_end, schedule)


# ----------------------------------------------------------------------------- Diffusion-KTO

def kto_class_weights(n_desirable, n_undesirable):
    """(lambda_D, lambda_U) so that lambda_D * n_D == lambda_U * n_U, the larger class at weight 1: the
    KTO paper's balance (it recommends lambda_D n_D / (lambda_U n_U) in [1, 4/3]; 1 here)."""
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError(f"KTO needs desirable and undesirable samples (got {n_desirable} and {n_undesirable})")
    if n_desirable >= n_undesirable:
        return n_undesirable / n_desirable, 1.0
    return 1.0, n_desirable / n_undesirable


def diffusion_kto_loss(model_pred, ref_pred, target, labels, beta, lambda_desirable=1.0, lambda_undesirable=1.0,
                       reduce_mean=None):
    """(loss, metrics) of Diffusion-KTO (Li et al. 2024) on a batch of single results, policy and
    reference predicting at the same noise and timestep per sample.

        r     = ref_err - err                        the implicit reward (err: mean squared error per sample)
        z     = max(0, mean of r over the batch)     the reference point, detached; reduce_mean (e.g. the
                                                     mean over every rank) turns the local mean into the global one
        loss  = lambda_D (1 - sigmoid(beta (r - z)))  for a desirable result (label 1)
                lambda_U (1 - sigmoid(beta (z - r)))  for an undesirable one (label 0)
    averaged over the batch. labels: (B,) in {0, 1}."""
    err = per_sample_error(model_pred, target)
    with torch.no_grad():
        ref_err = per_sample_error(ref_pred, target)
    reward = ref_err - err
    z = reward.detach().mean()
    z = (reduce_mean(z) if reduce_mean is not None else z).detach().clamp(min=0)
    sign = 2 * labels.to(reward.dtype) - 1
    desirable = labels >= 0.5
    weight = torch.where(desirable, torch.full_like(reward, lambda_desirable), torch.full_like(reward, lambda_undesirable))
    losses = weight * (1 - torch.sigmoid(sign * beta * (reward - z)))
    with torch.no_grad():  # tensors on the device: read once per logging step; class means as (sum, count)
        d = desirable.float()
        metrics = {"reference_point": z, "implicit_accuracy": ((sign * (reward - z)) > 0).float().mean(),
                   "reward_desirable": ((reward * d).sum(), d.sum()), "reward_undesirable": ((reward * (1 - d)).sum(), (1 - d).sum()),
                   "mse": err.mean(), "ref_mse": ref_err.mean()}
    return losses.mean(), metrics
