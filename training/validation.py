"""Validation during training: held-out samples, sampling with the pipeline the user will run, image
grids, tensorboard/wandb images and histograms, comparison with a reference (win rate, masked MSE).
"""
import contextlib
import logging
import os

import torch

from myutils.data import RemovalDataset

logger = logging.getLogger("rorem")


def log_validation(accelerator, metrics, step):
    """Validation metrics to the trackers and the log."""
    accelerator.log(metrics, step=step)
    if metrics:
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def log_images(accelerator, name, image, step):
    """One PIL image to every active tracker."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: [wandb.Image(image)]}, step=step)


def log_histogram(accelerator, name, values, step):
    """A histogram of values to every active tracker."""
    values = torch.as_tensor(values).detach().float().cpu()
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_histogram(name, values, step)
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Histogram(values.numpy())}, step=step)


def validation_samples(args, entries, kind="triplet", count=None):
    """Fixed held-out samples, centre-cropped, never flipped: the first `count` (default
    --num_validation_images) entries, one per input (pairs of the same source and mask count once)."""
    seen, chosen = set(), []
    for e in entries:
        key = (e.paths["source"], e.paths["mask"])
        if key not in seen and len(chosen) < (count or args.num_validation_images):
            seen.add(key)
            chosen.append(e)
    dataset = RemovalDataset(chosen, kind, args.resolution)
    return [dataset[i] for i in range(len(dataset))]


@contextlib.contextmanager
def mixed_precision_unet(accelerator, unet):
    """Only the UNet's forward runs under the training's autocast, its output cast back to its input's
    dtype, so the pipeline around it keeps one dtype. Autocast around the whole pipeline would run the
    VAE's convolutions in fp16 too, where the SDXL VAE overflows (black or NaN images)."""
    forward = unet.forward
    own = "forward" in vars(unet)  # already wrapped (e.g. a call counter): put that back afterwards

    def autocast_forward(sample, *args, **kwargs):
        with accelerator.autocast():
            out = forward(sample, *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.to(sample.dtype) if torch.is_tensor(o) else o for o in out)
        out.sample = out.sample.to(sample.dtype)
        return out

    unet.forward = autocast_forward
    try:
        yield unet
    finally:
        if own:
            unet.forward = forward
        else:
            del unet.forward


@contextlib.contextmanager
def vae_dtype_kept(vae):
    """The stock SDXL pipeline encodes and decodes in fp32 when the VAE's config says force_upcast (the
    SDXL VAE does), but afterwards casts the VAE it was given to the UNet's dtype: the VAE that training
    shares would then encode in fp16 from the first validation on. Put its dtype back."""
    dtype = vae.dtype
    try:
        yield vae
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


@torch.no_grad()
def sample_validation(accelerator, args, comps, model, samples, seed=None, steps=None, scheduler=None, strength=None):
    """Inpaint validation samples with the unwrapped `model`, image i with seed (seed or --seed) + i,
    `steps` (default --validation_inference_steps) at `strength` (default --validation_strength) with
    `scheduler` (default: the pipeline's); results pasted into their sources (PIL)."""
    from pipelines.inpaint import inpaint, make_pipeline
    from myutils.img_util import paste_back

    was_training = model.training
    model.eval()
    pipe = make_pipeline(comps.vae, model, scheduler or scheduler_from_config(comps.sample_scheduler_config))
    sources, masks = input_rows(samples)
    results = []
    n = args.validation_batch_size  # bounded memory for long win-rate sets
    for i in range(0, len(samples), n):
        with mixed_precision_unet(accelerator, model), vae_dtype_kept(comps.vae):
            results += inpaint(pipe, comps.condition, sources[i:i + n], masks[i:i + n], args.resolution,
                               steps or args.validation_inference_steps, args.validation_strength if strength is None else strength,
                               seed=(args.seed if seed is None else seed) + i)
    model.train(was_training)
    return [paste_back(r, s, m.convert("L")) for r, s, m in zip(results, sources, masks)]


def viewable_grid(rows, resolution):
    """A grid of equally long rows of PIL images; toy-sized images are upscaled so a person can see them."""
    from myutils.img_util import image_grid

    grid = image_grid([im for row in rows for im in row], rows=len(rows), cols=len(rows[0]))
    scale = max(1, 128 // resolution)
    return grid.resize((grid.width * scale, grid.height * scale), resample=0)


def save_validation_grid(accelerator, args, rows, step):
    """viewable_grid of the rows under <output_dir>/validation/step-N.png, sent to the trackers."""
    grid = viewable_grid(rows, args.resolution)
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    path = os.path.join(args.output_dir, "validation", f"step-{step:06d}.png")
    grid.save(path)
    log_images(accelerator, "validation", grid, step)
    return path


def input_rows(samples, *keys):
    """Grid rows of PIL images: the source, the mask (white = remove), then the given keys."""
    from myutils.img_util import tensor_to_pil

    return ([[tensor_to_pil(s["source"]) for s in samples], [tensor_to_pil(s["mask"].expand(3, -1, -1) * 2 - 1) for s in samples]]
            + [[tensor_to_pil(s[k]) for s in samples] for k in keys])


def run_validation(accelerator, args, comps, unet, samples, step, target_key="GT"):
    """Inpaint the fixed validation samples with fixed seeds; save a grid (rows: source, mask,
    result, target). Main process only."""
    if not accelerator.is_main_process or not samples:
        return None
    results = sample_validation(accelerator, args, comps, accelerator.unwrap_model(unet), samples)
    source, mask, target = input_rows(samples, target_key)
    return save_validation_grid(accelerator, args, [source, mask, results, target], step)


@torch.no_grad()
def compare_with_reference(accelerator, args, samples, results, reference, step, target_key, reward=None, cache=None,
                           mse_key=None):
    """Held-out comparison of a trained model with its reference (DPO: the starting model; LCM: the
    many-step teacher). `results` are the model's (PIL, from sample_validation); `reference()` makes
    the reference's, called once and kept in the dict `cache`. With a reward model both are scored
    and the paired win rate (ties half) comes back with its 95% Wilson interval and both mean scores.
    With `mse_key` (e.g. "GT"), also the masked-region MSE of both against that image.
    Saves a grid of the first --num_validation_images: source, mask, reference, model, target."""
    from myutils.metrics import masked_mse, win_rate
    from myutils.reward_utils import score_results

    if mse_key:
        _, masks, truths = input_rows(samples, mse_key)  # once, not per scored set

    def mean_mse(images):
        return sum(masked_mse(r, g, m) for r, g, m in zip(images, truths, masks)) / len(images)

    cache = {} if cache is None else cache
    if "results" not in cache:
        cache["results"] = reference()
        cache["scores"] = score_results(reward, samples, cache["results"]) if reward else None
        cache["mse"] = mean_mse(cache["results"]) if mse_key else None
    metrics = {"val_masked_mse": mean_mse(results), "val_reference_masked_mse": cache["mse"]} if mse_key else {}
    if reward:
        scores, ref_scores = score_results(reward, samples, results), cache["scores"]
        rate, (low, high) = win_rate(scores, ref_scores)
        metrics.update(val_win_rate=rate, val_win_rate_low=low, val_win_rate_high=high,
                       val_score=sum(scores) / len(scores), val_reference_score=sum(ref_scores) / len(ref_scores))
    n = args.num_validation_images
    source, mask, target = input_rows(samples[:n], target_key)
    save_validation_grid(accelerator, args, [source, mask, cache["results"][:n], results[:n], target], step)
    return metrics


def scheduler_from_config(config):
    """The sampling scheduler the pretrained pipeline ships (Euler for SDXL-inpainting)."""
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)
