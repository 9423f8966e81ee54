"""Latent consistency distillation (Luo et al. 2023) for the remover: the DDIM solver, boundary
conditions, x0/epsilon conversions, the loss, and one step's student/target computation.

The solver runs on the 4-channel latents; the UNet sees them with the mask and masked-source
latents appended (myutils/sdxl_inpaint.unet_input), which `unet_fn` below takes care of.
"""
import torch

from .rng import rand_per_sample
from .transfer import batch_timesteps, constant_on


class DDIMSolver:
    """DDIM over N of the T training timesteps: t_n = (n + 1) * T // N - 1, i.e. 19, 39, ..., 999 for
    N = 50; alpha_prev of index n is alphas_cumprod[t_{n-1}] (alphas_cumprod[0] for n = 0)."""

    def __init__(self, alphas_cumprod, timesteps=1000, ddim_timesteps=50):
        if not 1 <= ddim_timesteps <= timesteps:  # more would make every solver timestep -1
            raise ValueError(f"{ddim_timesteps} DDIM timesteps of {timesteps}: between 1 and {timesteps}")
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (torch.arange(1, ddim_timesteps + 1) * self.step_ratio).round().long() - 1
        self.ddim_alpha_cumprods = alphas_cumprod[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.ddim_timesteps[:-1]]])

    def to(self, device):
        for name in ("ddim_timesteps", "ddim_alpha_cumprods", "ddim_alpha_cumprods_prev"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (eta = 0), per sample, in fp32."""
        a_prev = self.ddim_alpha_cumprods_prev.to(pred_x0.device)[timestep_index].float().view(-1, *[1] * (pred_x0.dim() - 1))
        return a_prev.sqrt() * pred_x0.float() + (1 - a_prev).sqrt() * pred_noise.float()


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    """(c_skip, c_out) with c_skip(0) = 1 and c_out(0) = 0, so the consistency function is the
    identity at t = 0: c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2)."""
    scaled = torch.as_tensor(timestep, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def _alpha_sigma(alphas_cumprod, timesteps, like):
    a = constant_on(alphas_cumprod, like.device)[timesteps].float().view(-1, *[1] * (like.dim() - 1))
    return a.sqrt(), (1 - a).sqrt()


def predicted_origin(model_output, timesteps, sample, prediction_type, alphas_cumprod):
    """x0 from the model output at x_t: epsilon (x - sigma eps) / alpha; v: alpha x - sigma v."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    out, x = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * out
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: epsilon or v_prediction")


def predicted_noise(model_output, timesteps, sample, prediction_type, alphas_cumprod):
    """epsilon from the model output at x_t: epsilon itself; v: alpha v + sigma x."""
    alpha, sigma = _alpha_sigma(alphas_cumprod, timesteps, sample)
    if prediction_type == "epsilon":
        return model_output.float()
    if prediction_type == "v_prediction":
        return alpha * model_output.float() + sigma * sample.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: epsilon or v_prediction")


def lcm_denoised(model_output, timesteps, sample, prediction_type, alphas_cumprod):
    """The consistency output, what LCMScheduler.step calls `denoised`: c_skip(t) x_t + c_out(t) x0(x_t),
    fp32; timesteps: an int shared by the batch, or one per sample."""
    tt = batch_timesteps(timesteps, sample.shape[0], sample.device).long()
    view = (-1,) + (1,) * (sample.dim() - 1)
    c_skip, c_out = (c.to(sample.device).view(view) for c in scalings_for_boundary_conditions(tt))
    return c_skip * sample.float() + c_out * predicted_origin(model_output, tt, sample, prediction_type, alphas_cumprod)


def lcm_step_mean_std(model_output, t, prev_t, sample, prediction_type, alphas_cumprod):
    """One step of multistep LCM sampling (diffusers' LCMScheduler.step) as a Gaussian: the consistency
    output noised afresh to prev_t, mean sqrt(a_prev) denoised and std sqrt(1 - a_prev) (a 0-dim tensor); prev_t None
    (the last step): (denoised, None), no noise."""
    denoised = lcm_denoised(model_output, t, sample, prediction_type, alphas_cumprod)
    if prev_t is None:
        return denoised, None
    a_prev = constant_on(alphas_cumprod, denoised.device)[int(prev_t)].float()  # a 0-dim tensor: no host read
    return a_prev.sqrt() * denoised, (1 - a_prev).sqrt()


def per_sample_lcm_loss(pred, target, loss_type="l2", huber_c=0.001):
    """(B,) losses: mean squared error, or pseudo-Huber sqrt((p - t)^2 + c^2) - c, each averaged
    over the non-batch dimensions, in fp32."""
    d = pred.float() - target.float()
    if loss_type == "l2":
        per = d ** 2
    elif loss_type == "huber":
        per = torch.sqrt(d ** 2 + huber_c ** 2) - huber_c
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: l2 or huber")
    return per.flatten(1).mean(1)


def sample_guidance_scale(generators, w_min, w_max, device):
    """w ~ U[w_min, w_max] per sample, from the per-sample generators."""
    u = rand_per_sample(generators, device)
    return w_min + (w_max - w_min) * u


def consistency_step(student, teacher, target_net, latents, noise, index, w, solver, alphas_cumprod, prediction_type):
    """One LCM distillation step's tensors. `student`, `teacher` and `target_net` are callables
    (noisy 4-ch latents, timesteps) -> model output, with the conditioning already bound; `teacher`
    returns the (conditional, unconditional) outputs. Returns (model_pred, target, teacher_x0),
    where teacher_x0 is the guided x0 at the start step (what the `teacher` reward source scores).

        start = t_n, t = t_n - T/N (>= 0);  x_start = q(x_start | x0 = latents, noise)
        student:  c_skip(start) x_start + c_out(start) x0(student(x_start, start))
        teacher:  x0 = x0_c + w (x0_c - x0_u), eps likewise; x_prev = DDIM step to t  (no grad)
        target:   c_skip(t) x_prev + c_out(t) x0(target_net(x_prev, t))            (no grad)
    """
    start = solver.ddim_timesteps.to(latents.device)[index]
    t = (start - solver.step_ratio).clamp(min=0)
    ac = constant_on(alphas_cumprod, latents.device)
    a = ac[start].float().view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()
    model_pred = lcm_denoised(student(noisy, start), start, noisy, prediction_type, ac)
    with torch.no_grad():
        cond, uncond = teacher(noisy, start)
        x0_c, x0_u = (predicted_origin(o, start, noisy, prediction_type, ac) for o in (cond, uncond))
        eps_c, eps_u = (predicted_noise(o, start, noisy, prediction_type, ac) for o in (cond, uncond))
        wv = w.float().view(-1, 1, 1, 1)
        teacher_x0 = x0_c + wv * (x0_c - x0_u)
        x_prev = solver.ddim_step(teacher_x0, eps_c + wv * (eps_c - eps_u), index)
        target = lcm_denoised(target_net(x_prev, t), t, x_prev, prediction_type, ac)
    return model_pred, target, teacher_x0
