"""The discriminator as a reward: loading one for scoring, batched scoring on latents or images, score
normalisations and weightings, and the pixel rewards of online RL. Its folder format (LoRA, head,
config) is myutils/discriminator_files.py.

Inputs, as RORem trains it: latents of the edited result at t = 0, the mask, and latents of the
UNMASKED source, with the empty-prompt conditioning.
"""
import math
import os

import torch
from safetensors.torch import load_file, save_file

from model.unet_sdxl_discriminator import UNetSDXLDiscriminator

from .data import RemovalDataset, crop_sample, stack_samples
from .discriminator_files import load_discriminator_weights, read_discriminator_config
from .errors import UserError
from .models import check_kind, load_inpaint_pipeline
from .sdxl_inpaint import batch_latent_params, encode_prompt_once, posterior_mean_latents, unet_input

CONDITIONINGS = ("rorem", "per_sample")
RORem_TIME_IDS = (512, 512, 0, 0, 512, 512)  # original size, crop top-left, target size: fixed in RORem's scripts
TRAINING_FLAGS = ("--pretrained_model_name_or_path", "--discriminator_path")  # the training scripts' names for load_reward_model


# ----------------------------------------------------------------------------- scoring

class DiscriminatorReward:
    """Batched, no-grad scores (B,) from the discriminator, on pixels or directly on latents.

    conditioning "per_sample" (ours): SDXL time ids from each sample's original size and crop, the
    edited latents as they are. "rorem" (RORem's release, as its scripts train and score it): fixed time
    ids (512, 512, 0, 0, 512, 512) and the edited latents through the scheduler's add_noise at t = 0,
    sqrt(a0) x + sqrt(1 - a0) noise; the noise is one fixed draw (seed 0), so a score stays a
    deterministic function of the images."""

    def __init__(self, disc, vae, condition, resolution, conditioning="per_sample", alpha_t0=None):
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if conditioning == "rorem" and alpha_t0 is None:
            raise ValueError("RORem's conditioning needs alphas_cumprod[0] of the noise schedule (alpha_t0)")
        self.disc, self.vae, self.resolution = disc.eval().requires_grad_(False), vae, resolution  # a judge, never trained here
        self.condition = condition.to(disc.device, disc.dtype)
        self.conditioning, self.alpha_t0 = conditioning, alpha_t0

    def _rorem_noised(self, latents):
        g = torch.Generator("cpu").manual_seed(0)
        noise = torch.randn(latents.shape[1:], generator=g, device=g.device).to(latents.device, torch.float32)
        return self.alpha_t0 ** 0.5 * latents.float() + (1 - self.alpha_t0) ** 0.5 * noise

    @torch.no_grad()
    def score_latents(self, source_latents, mask_latent, edited_latents, original_size=None, crop_top_left=None):
        """Latents already scaled by the VAE's scaling factor (what a sampler produces): no decode."""
        return self.score_latents_differentiable(source_latents, mask_latent, edited_latents, original_size, crop_top_left)

    def score_latents_differentiable(self, source_latents, mask_latent, edited_latents, original_size=None, crop_top_left=None):
        """score_latents with gradients flowing to the edited latents (direct reward fine-tuning); the
        discriminator's own weights stay frozen."""
        b, device = edited_latents.shape[0], self.disc.device
        if self.conditioning == "rorem":
            edited_latents = self._rorem_noised(edited_latents)
            original_size = torch.tensor([RORem_TIME_IDS[:2]], device=device).expand(b, 2)
            crop_top_left, target = torch.tensor([RORem_TIME_IDS[2:4]], device=device).expand(b, 2), RORem_TIME_IDS[4:]
        else:
            target = (self.resolution, self.resolution)
            if original_size is None:
                original_size = torch.full((b, 2), self.resolution, device=device)
            if crop_top_left is None:
                crop_top_left = torch.zeros(b, 2, device=device)
        # callers hand latents from anywhere (a CPU batch, the sampler's device): each part meets the judge on its device
        x = unet_input(*(t.to(device, self.disc.dtype) for t in (edited_latents, mask_latent, source_latents)))
        kw = self.condition.unet_kwargs(original_size, crop_top_left, target)
        return self.disc(x, 0, kw["encoder_hidden_states"], kw["added_cond_kwargs"]).float()

    @torch.no_grad()
    def score_pixels(self, source, mask, edited, original_size=None, crop_top_left=None):
        """source/edited (B, 3, H, W) in [-1, 1], mask (B, 1, H, W) in {0, 1}. The posterior mean is
        used (no sampling noise), so a score is a deterministic function of the images. The images may
        be on any device (a data loader's CPU batch): they are moved to the VAE's."""
        device = self.vae.device
        images = {"source": source.to(device), "mask": mask.to(device), "GT": edited.to(device)}
        params = batch_latent_params(self.vae, images, ["GT", "source"])
        edited_latents = posterior_mean_latents(params["params:GT"], self.vae.config)
        source_latents = posterior_mean_latents(params["params:source"], self.vae.config)
        return self.score_latents(source_latents, params["mask_latent"], edited_latents, original_size, crop_top_left)


def score_entries(reward, entries, resolution, batch_size):
    """Discriminator scores of (source, mask, GT=edited) entries, in order (centre crop at the
    discriminator's training resolution)."""
    from tqdm.auto import tqdm

    dataset = RemovalDataset(entries, "triplet", resolution)
    scores = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="scoring", disable=len(dataset) <= batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        b = stack_samples(items, ("source", "mask", "GT", "original_size", "crop_top_left"))
        scores += reward.score_pixels(b["source"], b["mask"], b["GT"], b["original_size"], b["crop_top_left"]).tolist()
    return scores


def score_results(reward, samples, results, batch_size=16):
    """Scores of PIL results (processing size) for dataset samples: each judged with its sample's
    source, mask, original size and crop."""
    from .img_util import pil_to_tensor

    scores = []
    for i in range(0, len(samples), batch_size):
        part = samples[i:i + batch_size]
        stack = stack_samples(part, ("source", "mask", "original_size", "crop_top_left"))
        edited = torch.stack([pil_to_tensor(r) for r in results[i:i + batch_size]])
        scores += reward.score_pixels(stack["source"], stack["mask"], edited, stack["original_size"], stack["crop_top_left"]).tolist()
    return scores


def score_images(reward, source, mask, edited):
    """The score of one result given as PIL images (source, mask, edited), centre-cropped at the
    discriminator's resolution as the scored data is."""
    from .img_util import crop_params

    sample = crop_sample({"source": source, "mask": mask, "GT": edited}, crop_params(source.size, reward.resolution))
    b = stack_samples([sample])
    return reward.score_pixels(b["source"], b["mask"], b["GT"], b["original_size"], b["crop_top_left"]).item()


def load_reward_model(pretrained_model, discriminator_path, resolution=512, device="cpu", dtype=torch.float32, variant=None,
                      conditioning="auto", flags=("--pretrained_model", "--RORem_discriminator")):
    """(DiscriminatorReward) from an SDXL-inpainting model and a discriminator folder. conditioning
    "auto": what the folder was trained with (RORem's release: RORem's; ours: per sample). flags: the
    arguments the user gave the two as (messages name them)."""
    from diffusers import DDPMScheduler

    if not os.path.isdir(discriminator_path):
        raise UserError(f"{flags[1]} {discriminator_path}: folder not found")
    check_kind(discriminator_path, ("discriminator",), flags[1])  # a remover's run folder is not one
    cfg = read_discriminator_config(discriminator_path)
    pipe = load_inpaint_pipeline(pretrained_model, variant=variant, flags=(flags[0], "--pretrained_unet"))
    condition = encode_prompt_once(pipe, "")
    alpha_t0 = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.tolist()[0]
    disc = UNetSDXLDiscriminator.from_unet(pipe.unet, cfg["head_activation"])
    load_discriminator_weights(disc, discriminator_path)
    vae = pipe.vae.to(device)
    del pipe
    return DiscriminatorReward(disc.to(device, dtype), vae, condition, resolution,
                               cfg["conditioning"] if conditioning == "auto" else conditioning, alpha_t0)


# ----------------------------------------------------------------------------- normalisations

def clamp01(scores):
    """Scores clipped to [0, 1] (RORem's softplus scores are trained toward 0 and 1)."""
    return scores.clamp(0.0, 1.0)


def squash01(scores, center=0.5, sharpness=10.0):
    """A smooth map to (0, 1): sigmoid(sharpness * (score - center)); 0.5 at the center."""
    return torch.sigmoid(sharpness * (scores - center))


def zscore(scores, eps=1e-6):
    """(s - mean) / (std + eps) within the batch (population std); all-equal scores give zeros."""
    scores = scores.float()
    return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)


def percentile_rank(scores, reference=None):
    """Fraction of the reference below each score, ties counted half (the mid-rank). Without a
    reference, ranks within the batch excluding the score itself: the lowest gets 0, the highest 1."""
    scores = scores.float().reshape(-1)
    if reference is None:
        if scores.numel() < 2:
            return torch.full_like(scores, 0.5)
        below = (scores[None, :] < scores[:, None]).sum(1).float()
        equal = (scores[None, :] == scores[:, None]).sum(1).float() - 1  # not counting itself
        return (below + 0.5 * equal) / (scores.numel() - 1)
    ref = reference.float().reshape(-1).to(scores.device)
    below = (ref[None, :] < scores[:, None]).sum(1).float()
    equal = (ref[None, :] == scores[:, None]).sum(1).float()
    return (below + 0.5 * equal) / ref.numel()


def save_reference(scores, path):
    """Keep a reference set of scores (e.g. the base model's on held-out inputs) for percentile_rank."""
    save_file({"scores": scores.detach().float().cpu().reshape(-1).contiguous()}, path)


def load_reference(path):
    if not os.path.isfile(path):
        raise UserError(f"reference scores {path}: file not found")
    return load_file(path)["scores"]


# ----------------------------------------------------------------------------- reward weighting

WEIGHTINGS = ("none", "filter", "softmax", "percentile")


def reward_weights(scores, strategy, threshold=0.5, temperature=0.5, reference=None):
    """Per-sample loss weights from scores, averaging 1 over the batch (so the loss keeps its scale),
    or all zeros when nothing is kept:
        none:       1 for every sample
        filter:     kept = score >= threshold; weight B / (number kept) for kept samples, 0 otherwise
        softmax:    B * softmax(score / temperature)
        percentile: the mid-rank percentile (within the batch, or against `reference` scores), rescaled
    """
    s = scores.float().reshape(-1)
    n = s.numel()
    if strategy == "none":
        return torch.ones_like(s)
    if strategy == "filter":
        raw = (s >= threshold).float()
    elif strategy == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax weighting needs a positive temperature, got {temperature}")
        return torch.softmax(s / temperature, dim=0) * n
    elif strategy == "percentile":
        raw = percentile_rank(s, reference)
    else:
        raise ValueError(f"unknown weighting {strategy!r}: one of {WEIGHTINGS}")
    total = raw.sum()  # all zero: weights 0 (decided on the device, without a host read)
    return raw * (n / torch.where(total > 0, total, 1.0))


def weight_stats(weights):
    """Mean, max, effective sample size (sum w)^2 / sum w^2 (and as a fraction of the batch), and the
    fraction of samples with weight 0: tensors where the weights are (a training step does not wait
    for them; they are read when logged)."""
    w = weights.float().reshape(-1)
    sq = (w ** 2).sum()
    ess = torch.where(sq > 0, w.sum() ** 2 / torch.where(sq > 0, sq, 1.0), 0.0)
    return {"weight_mean": w.mean(), "weight_max": w.max(), "weight_ess": ess,
            "weight_ess_fraction": ess / w.numel(), "filtered_fraction": (w == 0).float().mean()}


class ScoreMemory:
    """Scores per training sample (dataset index), refreshed at most every `every` steps; in between a
    sample's last score is reused. Checkpointed (state_dict), so a resumed run reuses what the
    interrupted one scored."""

    def __init__(self, every=1):
        self.every, self.scores, self.stamps = max(1, int(every)), {}, {}

    def state_dict(self):
        return {"scores": dict(self.scores), "stamps": dict(self.stamps)}

    def load_state_dict(self, state):
        self.scores, self.stamps = dict(state["scores"]), dict(state["stamps"])

    def stale(self, indices, step):
        """Bool mask of the samples that need a fresh score at this step."""
        return torch.tensor([int(i) not in self.stamps or step - self.stamps[int(i)] >= self.every for i in indices.tolist()])

    def update(self, indices, scores, step, mask):
        for i, s in zip(indices[mask].tolist(), scores.reshape(-1).tolist()):
            self.scores[int(i)], self.stamps[int(i)] = s, step

    def get(self, indices):
        return torch.tensor([self.scores[int(i)] for i in indices.tolist()])


# ----------------------------------------------------------------------------- rewards for online RL

REWARDS = ("discriminator", "preserve", "gt", "jpeg")


def parse_reward_spec(spec, flag="--reward"):
    """'discriminator=1,preserve=0.5' -> {"discriminator": 1.0, "preserve": 0.5}; a bare name has weight 1.
    A weight is a finite number >= 0 (a negative one would train against the reward), and a name comes once."""
    out = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in REWARDS:
            raise UserError(f"{flag}: unknown reward {name!r} (one of {', '.join(REWARDS)})")
        if name in out:
            raise UserError(f"{flag} {spec}: {name!r} is named twice; give each reward once")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"{flag}: weight of {name!r} is not a number: {weight!r}") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{flag}: weight of {name!r} must be a finite number >= 0, got {weight}")
        out[name] = value
    if not out:
        raise UserError(f"{flag}: give at least one name=weight")
    if not any(out.values()):
        raise UserError(f"{flag} {spec}: every weight is 0, so nothing would be rewarded")
    return out


def preservation_reward(result, source, mask):
    """-(mean squared difference to the source outside the mask), pixels in [-1, 1], mask 1 = hole:
    0 for a result that leaves everything outside the hole untouched."""
    keep = (mask < 0.5).float().expand_as(result)
    return -(((result.float() - source.float()) ** 2) * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3)).clamp(min=1)


def gt_reward(result, gt, mask):
    """-(mean squared error against GT inside the mask): agreement with the true background."""
    hole = (mask >= 0.5).float().expand_as(result)
    return -(((result.float() - gt.float()) ** 2) * hole).sum((1, 2, 3)) / hole.sum((1, 2, 3)).clamp(min=1)


def latent_rewards(weights, reward_model, cond, latents, gt_latents=None):
    """({component: (B,)}, weighted total (B,)) of final latents, differentiable (direct reward
    fine-tuning): the discriminator on the latents as it reads them; gt and preserve as gt_reward and
    preservation_reward in latent space (the mask downsampled to the latents), so no decode is needed.
    weights: {name: weight} of discriminator, gt, preserve."""
    parts = {}
    if "discriminator" in weights:
        parts["discriminator"] = reward_model.score_latents_differentiable(cond["source_latents"], cond["mask_latent"], latents,
                                                                           cond["original_size"], cond["crop_top_left"])
    if "gt" in weights:
        parts["gt"] = gt_reward(latents, gt_latents, cond["mask_latent"])
    if "preserve" in weights:
        parts["preserve"] = preservation_reward(latents, cond["source_latents"], cond["mask_latent"])
    return parts, sum(w * parts[n].float() for n, w in weights.items())


def jpeg_reward(result, quality=95):
    """-(JPEG size in kB) of each image: a cheap reward with a known answer (flat images compress)."""
    import io

    from .img_util import tensor_to_pil

    sizes = []
    for image in result:
        buf = io.BytesIO()
        tensor_to_pil(image).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return -torch.tensor(sizes)
