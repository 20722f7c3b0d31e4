"""Latent consistency distillation (LCD): the maths of the ``lcm`` and ``lcm-lora`` objectives.

Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference"
(Algorithm 1), as diffusers' ``train_lcm_distill_sd_wds.py`` implements it, and "LCM-LoRA" (Luo et al. 2023):

1. pick a solver step n of a DDIM schedule over ``solver_steps`` of the T training timesteps (k = T / solver_steps
   apart): t_{n+k} = ddim[n], t_n = t_{n+k} − k (clamped at 0); noise the latents to z_{n+k};
2. the online student predicts x̂₀ at t_{n+k}; its consistency function is
   f(z, t) = c_skip(t)·z + c_out(t)·x̂₀ with the boundary scalings of :func:`boundary_scalings`;
3. the frozen teacher runs with and without the caption, combined with a guidance w drawn per sample
   (w = CFG scale − 1: ε = ε_c + w·(ε_c − ε_u)), and one DDIM step takes z_{n+k} to ẑ_n;
4. the target network (an EMA of the student; the student itself for LCM-LoRA) gives f(ẑ_n, t_n);
5. loss = d(f_online, f_target): L2 or pseudo-Huber sqrt(d² + c²) − c.

The guidance w reaches a full LCM student through a guidance embedding (``time_cond_proj_dim``), the sinusoidal
embedding of 1000·w that diffusers' pipelines compute from ``guidance_scale − 1`` (:func:`guidance_embedding`).
Every function here is a formula on tensors, checked in tests against diffusers' own implementations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimsd.errors import SlimsdError

LCM_LOSSES = ("l2", "huber")
SIGMA_DATA = 0.5


def solver_timesteps(num_train_timesteps: int, solver_steps: int) -> torch.Tensor:
    """The DDIM solver's timesteps [k−1, 2k−1, ..., T−1], k = T // solver_steps (ascending; index n)."""
    k = num_train_timesteps // solver_steps
    return torch.arange(1, solver_steps + 1, dtype=torch.long) * k - 1


def boundary_scalings(
    t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = SIGMA_DATA
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip(t) = σ_d² / ((s·t)² + σ_d²), c_out(t) = s·t / sqrt((s·t)² + σ_d²): f(z, 0) = z exactly
    (the consistency model's boundary condition), and f ≈ x̂₀ away from t = 0."""
    st = timestep_scaling * t.double()
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def per_sample(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` per sample, shaped to broadcast over ``like`` (one value per row)."""
    return values.to(like.device)[t.to(like.device)].float().view(-1, *[1] * (like.dim() - 1))


def predicted_x0_eps(
    model_output: torch.Tensor,
    t: torch.Tensor,
    sample: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from a U-Net output at timesteps t, for ε- or v-prediction (z_t = α_t·x₀ + σ_t·ε)."""
    a = per_sample(alphas_cumprod, t, sample).sqrt()
    s = per_sample(1 - alphas_cumprod, t, sample).sqrt()
    out, z = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        return (z - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * z - s * out, a * out + s * z
    raise SlimsdError(f"unsupported prediction_type {prediction_type!r}; allowed: epsilon, v_prediction")


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step (η = 0) to timestep t_prev: sqrt(ᾱ)·x̂₀ + sqrt(1 − ᾱ)·ε̂."""
    a = per_sample(alphas_cumprod, t_prev, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of 1000·w (w = CFG scale − 1) that an LCM U-Net takes as ``timestep_cond``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def consistency_distance(
    online: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001
) -> torch.Tensor:
    """The LCD loss: mean squared error, or pseudo-Huber mean(sqrt((a − b)² + c²) − c) (Song & Dhariwal 2023)."""
    diff = online.float() - target.detach().float()
    if kind == "l2":
        return diff.pow(2).mean()
    if kind == "huber":
        return (diff.pow(2) + huber_c**2).sqrt().sub(huber_c).mean()
    raise SlimsdError(f"lcm_loss {kind!r} is not allowed; allowed: {', '.join(LCM_LOSSES)}")


def with_guidance_embedding(unet, dim: int):
    """The U-Net with a guidance input (``time_cond_proj_dim``), its other weights unchanged. The new projection
    keeps torch's default initialisation, as the reference does (it loads the teacher's weights non-strictly)."""
    from diffusers import UNet2DConditionModel

    if unet.config.time_cond_proj_dim is not None:
        return unet
    out = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=dim)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    return out
