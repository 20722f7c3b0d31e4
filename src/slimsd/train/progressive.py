"""Guided progressive distillation: the maths of the ``progressive`` objective.

Meng et al. 2023, "On Distillation of Guided Diffusion Models" (CVPR), built on Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models". The student has a guidance input (the embedding of
w = CFG scale − 1, as LCM's: consistency.guidance_embedding), w drawn per sample; training runs in rounds over the
DDIM schedules of ``progressive_steps`` (e.g. 32, 16, 8, 4 steps):

- round 0 (stage 1): at a timestep of the first schedule, the student's x̂₀ learns the guided teacher's in one
  evaluation: x̃ = x̂_c + w·(x̂_c − x̂_u), the x̂₀ of ε_c + w·(ε_c − ε_u) (the teacher with and without the caption);
- round r ≥ 1 (stage 2), N steps: from τ_i of the N-step schedule, the round's teacher (the student as round r − 1
  ended, frozen) takes two DDIM steps of the 2N-step schedule, z_t → z_mid → z''; the student's x̂₀ learns the
  x̃ with which ONE DDIM step from z_t lands on z'' (:func:`one_step_target`).

Both rounds weight the x̂₀ error with Salimans & Ho's "truncated SNR" max(SNR_t, 1) (:func:`x0_loss`). For an
ε-predicting student it is the ε-MSE where the signal dominates (SNR ≥ 1; the plain x-space MSE would weight
those steps by 1/SNR, almost nothing at the last step of a sampler) and the x-space MSE where noise dominates
(the first steps, which decide the layout of a few-step sample).

The schedules are DDIM's with trailing spacing, diffusers' formula τ_i = round(T − i·T/N) − 1, ending at
τ_N = −1, the clean end (ᾱ = 1, DDIMScheduler's ``set_alpha_to_one``). The 2N-step schedule holds the N-step one
at its even places, so a student step τ_i → τ_{i+1} is exactly two teacher steps. The final student samples in
plain diffusers with DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True) on these timesteps when N
divides T (diffusers steps to τ − T // N).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimsd.train.consistency import ddim_step, per_sample, predicted_x0_eps


def schedule(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """[τ_0, ..., τ_{N−1}, −1]: DDIM's N timesteps with trailing spacing (descending) and the clean end."""
    i = torch.arange(steps + 1, dtype=torch.float64)
    return torch.round(num_train_timesteps - i * (num_train_timesteps / steps)).long() - 1


def alphas_with_end(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ with 1 appended: timestep −1 (the schedule's end) indexes it, timesteps 0..T−1 are unchanged."""
    return torch.cat([alphas_cumprod.float(), alphas_cumprod.new_ones(1, dtype=torch.float32)])


def two_ddim_steps(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    t: torch.Tensor,
    mid: torch.Tensor,
    s: torch.Tensor,
    alphas: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """z'' after two deterministic DDIM steps t → mid → s of a model (``predict(z, t)``: its U-Net output)."""
    for a, b in ((t, mid), (mid, s)):
        x0, eps = predicted_x0_eps(predict(z, a), a, z, alphas, prediction_type)
        z = ddim_step(x0, eps, b, alphas)
    return z


def one_step_target(
    z_t: torch.Tensor, z_s: torch.Tensor, t: torch.Tensor, s: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """The x̃ with which one DDIM step from z_t (at t) lands on z_s (at s < t), Salimans & Ho's target:
    z_s = α_s·x̃ + σ_s·(z_t − α_t·x̃)/σ_t  ⇒  x̃ = (z_s − (σ_s/σ_t)·z_t) / (α_s − (σ_s/σ_t)·α_t)."""
    a_t, a_s = per_sample(alphas, t, z_t), per_sample(alphas, s, z_t)
    ratio = ((1 - a_s) / (1 - a_t)).sqrt()
    return (z_s.float() - ratio * z_t.float()) / (a_s.sqrt() - ratio * a_t.sqrt())


def x0_loss(x0: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """mean(max(SNR_t, 1)·(x̂₀ − x̃)²), SNR_t = ᾱ_t / (1 − ᾱ_t): the truncated-SNR weighting."""
    a = per_sample(alphas, t, x0)
    weight = (a / (1 - a)).clamp(min=1.0)
    return (weight * (x0.float() - target.detach().float()) ** 2).mean()
