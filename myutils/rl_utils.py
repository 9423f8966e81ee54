"""Online RL for diffusion (DDPO, Black et al. 2023; GRPO-style group advantages): each denoising
step is a Gaussian policy, a trajectory's reward comes at the end. DESIGN.md section 7.

    DDIM step with eta > 0:  var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev),  std = eta * sqrt(var)
                             mean = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps
    log_prob = mean over non-batch dims of  -(x_prev - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)
(averaged, not summed: summing over 16k latent dims made training blow up). Everything in fp32.
"""
import collections
import math

import numpy as np
import torch

from .rng import randn_per_sample
from .transfer import batch_timesteps, constant_on


def _per_sample(values, like):
    return values.float().view(-1, *[1] * (like.dim() - 1))


def ddim_step_mean_std(scheduler, model_output, timestep, sample, eta=1.0):
    """(mean, std) of the DDIM step's Gaussian from `timestep` to the previous timestep of the
    scheduler's schedule (set_timesteps called). timestep: int or (B,) tensor."""
    if eta <= 0:
        raise ValueError("eta must be > 0 to train: a deterministic DDIM step (eta = 0) has no variance, hence no log-prob")
    sample, model_output = sample.float(), model_output.float()
    t = batch_timesteps(timestep, sample.shape[0], sample.device).long()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = constant_on(scheduler.alphas_cumprod, sample.device).float()
    a_t = _per_sample(ac[t], sample)
    final = torch.full((), float(scheduler.final_alpha_cumprod), device=sample.device)  # a number: filled in, not copied
    a_prev = _per_sample(torch.where(prev >= 0, ac[prev.clamp(min=0)], final), sample)
    if scheduler.config.prediction_type == "epsilon":
        x0, eps = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt(), model_output
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * sample
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    return mean, std


def gaussian_log_prob(x, mean, std):
    """Log-density of x under N(mean, std^2) per element, averaged over the non-batch dims."""
    lp = -((x.float() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.dim())))


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0, prev_sample=None, generator=None):
    """(prev_sample, log_prob): one stochastic DDIM step, sampled (per-sample generators, or one
    generator) unless `prev_sample` is given, whose log-prob is then re-evaluated."""
    mean, std = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * mean.shape[0]
        noise = randn_per_sample(gens, mean.shape[1:], mean.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.float()
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def gaussian_kl(mean_a, mean_b, std):
    """KL(N(mean_a, std^2) || N(mean_b, std^2)) per element, averaged over non-batch dims: the
    per-step KL between the policy and the reference (same std, different means)."""
    kl = (mean_a.float() - mean_b.float()) ** 2 / (2 * std ** 2)
    return kl.mean(dim=tuple(range(1, kl.dim())))


KL_UNITS = ("exact", "flow_grpo")


def kl_in_unit(kl, unit, step_length=1.0):
    """A per-step KL penalty in the unit its coefficient was tuned for. "exact": the Gaussian KL of the
    step (for a flow SDE step of scale std sqrt|dt|, mean difference^2 / (2 std^2 |dt|)). "flow_grpo":
    flow_grpo's formula, mean difference^2 / (2 std^2), i.e. the exact KL times the step length |dt|
    (10 steps: |dt| 0.05-0.18, so its kl_coef 0.04 is 6-18x weaker than 0.04 of the exact KL).
    A DDIM step has no dt (step_length 1): both units agree."""
    if unit not in KL_UNITS:
        raise ValueError(f"unit must be one of {KL_UNITS}, got {unit!r}")
    return kl * step_length if unit == "flow_grpo" else kl


# ----------------------------------------------------------------------------- advantages

class PerInputStatTracker:
    """Reward normalisation per input (DDPO's per-prompt tracker; here the key is a content hash of
    source and mask, myutils/img_util.content_key). Each input keeps its last `buffer_size` rewards;
    with fewer than `min_count`, the statistics of the whole batch are used instead."""

    def __init__(self, buffer_size=32, min_count=16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers = {}

    def update(self, keys, rewards, eps=1e-6):
        rewards = np.asarray(rewards, dtype=np.float64)
        keys = list(keys)
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        for key in dict.fromkeys(keys):
            mine = np.array([k == key for k in keys])
            buf = self.buffers.setdefault(key, collections.deque(maxlen=self.buffer_size))
            buf.extend(rewards[mine].tolist())
            mean, std = (np.mean(buf), np.std(buf)) if len(buf) >= self.min_count else (batch_mean, batch_std)
            advantages[mine] = (rewards[mine] - mean) / (std + eps)
        return advantages

    def state_dict(self):
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state):
        self.buffers = {k: collections.deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


ADV_STDS = ("group", "batch")


def group_advantages(rewards, keys, std="group", eps=1e-6):
    """GRPO: (r - mean of its group) / (std + eps), a group being the samples of one input (same key)
    in this batch; a group of one gets advantage 0. std "group": the group's own std (DeepSeek's GRPO,
    DanceGRPO); "batch": the std of every reward in the batch (Flow-GRPO's global_std), which keeps a
    group whose samples barely differ from getting advantages of +-1."""
    if std not in ADV_STDS:
        raise ValueError(f"std must be one of {ADV_STDS}, got {std!r}")
    rewards = np.asarray(rewards, dtype=np.float64)
    keys = list(keys)
    advantages = np.zeros_like(rewards)
    for key in dict.fromkeys(keys):
        mine = np.array([k == key for k in keys])
        if mine.sum() > 1:
            group = rewards[mine]
            advantages[mine] = (group - group.mean()) / ((group.std() if std == "group" else rewards.std()) + eps)
    return advantages


def clip_advantages(advantages, max_abs):
    return np.clip(advantages, -max_abs, max_abs)


# ----------------------------------------------------------------------------- losses

def ppo_loss(log_prob, old_log_prob, advantages, clip_range):
    """(loss, approx_kl, clip_fraction): mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))) with
    r = exp(log_prob - old_log_prob); approx_kl = mean((log_prob - old)^2) / 2."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl, clip_fraction


def reinforce_loss(log_prob, advantages):
    """-mean(A * log_prob): the plain policy gradient (one update per batch)."""
    return -(advantages * log_prob).mean()


# ----------------------------------------------------------------------------- flow matching (DESIGN.md section 8)

def flowmatch_step_mean_std(scheduler, model_output, timestep, sample, noise_level=0.7, naive=False, step_index=None):
    """(mean, scale, std_dev_t) of one flow-matching step from `timestep` to the next sigma of
    diffusers' FlowMatchEulerDiscreteScheduler (set_timesteps called); the step's Gaussian is
    N(mean, scale^2), scale = std_dev_t * sqrt(-dt), dt = sigma_next - sigma < 0.

    Default (Flow-GRPO): the SDE with the same marginals as the Euler ODE,
        std_dev_t = noise_level * sqrt(sigma / (1 - sigma))   (sigma_max = sigmas[1] in the denominator when sigma = 1)
        mean = x (1 + std^2 / (2 sigma) dt) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    noise_level = 0 gives back the Euler step x + v dt. naive=True: the Euler step plus Gaussian noise of
    scale noise_level * sqrt(-dt), which does NOT keep the marginals (kept to compare; see the README).
    Everything in fp32. `step_index` (the position of `timestep` in the schedule), when the caller
    knows it, saves looking the timestep up (a device sync per step)."""
    x, v = sample.float(), model_output.float()
    sigmas = constant_on(scheduler.sigmas, x.device).float()
    if step_index is not None:
        idx = torch.full((x.shape[0],), int(step_index), device=x.device)
    else:
        t = torch.as_tensor(timestep).reshape(-1)
        idx = torch.tensor([scheduler.index_for_timestep(tt.to(scheduler.timesteps.device)) for tt in t], device=x.device)
        idx = idx.expand(x.shape[0]) if idx.numel() == 1 else idx
    sigma, sigma_next = _per_sample(sigmas[idx], x), _per_sample(sigmas[idx + 1], x)
    dt = sigma_next - sigma
    if naive:
        std_dev_t = torch.full_like(sigma, float(noise_level))
        mean = x + v * dt
    else:
        denominator = 1 - torch.where(sigma >= 1, sigmas[1].expand_as(sigma), sigma)
        std_dev_t = noise_level * torch.sqrt(sigma / denominator)
        mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-dt), std_dev_t


def flowmatch_step_with_logprob(scheduler, model_output, timestep, sample, noise_level=0.7, prev_sample=None, generator=None,
                                naive=False):
    """One stochastic flow-matching step with its log-prob (flowmatch_step_mean_std has the
    formulas): sampled with per-sample generators (or one) unless `prev_sample` is given, whose
    log-prob is then re-evaluated. Returns (prev_sample, log_prob, prev_sample_mean, std_dev_t); the
    log-prob is averaged over the non-batch dims (0 for the deterministic noise_level = 0)."""
    x = sample.float()
    mean, scale, std_dev_t = flowmatch_step_mean_std(scheduler, model_output, timestep, sample, noise_level, naive)
    if prev_sample is None:
        gens = generator if isinstance(generator, (list, tuple)) else [generator] * x.shape[0]
        prev_sample = mean + scale * randn_per_sample(gens, x.shape[1:], x.device)
    prev_sample = prev_sample.float()
    if noise_level == 0:
        return prev_sample, torch.zeros(x.shape[0], device=x.device), mean, std_dev_t
    return prev_sample, gaussian_log_prob(prev_sample, mean, scale), mean, std_dev_t


# ----------------------------------------------------------------------------- pairwise preference (D3PO-style)

def pair_preferences(rewards, eps=1e-12):
    """Per-sample labels for consecutive pairs (2p, 2p + 1): +1 for the sample with the higher reward,
    -1 for the other, 0 for both when they tie (a tie carries no preference)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, 2)
    first = np.sign(r[:, 0] - r[:, 1]) * (np.abs(r[:, 0] - r[:, 1]) > eps)
    return np.stack([first, -first], 1).reshape(-1)


def pairwise_preference_loss(log_prob, old_log_prob, preference, beta, clip_range):
    """DPO-style loss for one denoising step of consecutive pairs (2p = first, 2p + 1 = second):
    ratio = clamp(exp(log_prob - old_log_prob), 1 - eps, 1 + eps) per sample against the policy that
    sampled the pair (the reference of the step); loss = -log sigmoid(beta * (log ratio_w - log ratio_l))
    averaged over pairs that have a preference. preference: per-sample labels from pair_preferences.
    The clamp is a trust region: outside it a sample's ratio carries no gradient."""
    log_ratio = torch.log(torch.clamp(torch.exp(log_prob - old_log_prob), 1.0 - clip_range, 1.0 + clip_range)).view(-1, 2)
    first = preference.view(-1, 2)[:, 0]
    margin = beta * first * (log_ratio[:, 0] - log_ratio[:, 1])
    labelled = (first != 0).float()
    return -(torch.nn.functional.logsigmoid(margin) * labelled).sum() / labelled.sum().clamp(min=1.0)
