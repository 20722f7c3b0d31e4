"""objective lcm: latent consistency distillation (Luo et al. 2023, Algorithm 1; consistency.py) into a student
that takes the guidance w as an input (``time_cond_proj_dim``).

Models: the teacher pipeline, guided by a w drawn per sample; the student with a guidance embedding.
Averages: the target network, an EMA of the student (μ = target_decay), and the EMA when ``ema: true``.
final/: the student as a pipeline with LCMScheduler, and its ``sampling`` (steps, guidance) in slimsd.json."""

from __future__ import annotations

import copy

import torch

from slimsd.errors import SlimsdError
from slimsd.train import consistency as C
from slimsd.train.objectives.base import Run, update_average
from slimsd.train.objectives.unet import UNetObjective, init_params


def check_sample_guidance(cfg) -> None:
    """A guidance-input student samples inside the range it was trained on."""
    if cfg.sample_guidance is not None and not (cfg.guidance_min <= cfg.sample_guidance <= cfg.guidance_max):
        raise SlimsdError(
            f"config key 'sample_guidance': {cfg.sample_guidance:g} is outside the trained range "
            f"{cfg.guidance_min:g} to {cfg.guidance_max:g}"
        )


class LCM(UNetObjective):
    name = "lcm"
    guided = True
    embedded = True  # the student takes w as an input (lcm-lora: the guidance is baked into the adapters)

    @staticmethod
    def check(cfg) -> None:
        check_sample_guidance(cfg)

    def adapt(self, student):
        return C.with_guidance_embedding(student, self.cfg.cond_proj_dim).requires_grad_(True)

    def prepare(self, run: Run) -> None:
        super().prepare(run)
        cfg, T = self.cfg, self.num_train_timesteps
        if not 1 <= cfg.solver_steps <= T // 2:
            raise SlimsdError(
                f"config key 'solver_steps': {cfg.solver_steps} is out of range for a teacher with "
                f"{T} timesteps; allowed: 1 to {T // 2}"
            )
        self.ddim_ts = C.solver_timesteps(T, cfg.solver_steps).to(run.device)
        student = run.models.student
        self.emb_dim = student.config.time_cond_proj_dim if self.embedded else None
        # The target network, an EMA of the student (LCM-LoRA takes the student itself as its target).
        self.target_unet = copy.deepcopy(student).requires_grad_(False) if self.embedded else None

    def averages(self, student) -> dict[str, dict | None]:
        out = super().averages(student)
        if self.target_unet is not None:
            out["target"] = self.target_unet.state_dict()  # views of its parameters
        return out

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """LCD on one micro-batch: the student's consistency function at t_{n+k} against the target network's
        at t_n, after one DDIM step of the guided teacher."""
        cfg, device, ac = self.cfg, run.device, self.alphas_cumprod
        x = self.inputs(run, batch, cfg.solver_steps)
        kind = self.noise_scheduler.config.prediction_type
        start = self.ddim_ts[x.timesteps]  # t_{n+k}
        prev = (start - self.num_train_timesteps // cfg.solver_steps).clamp(min=0)  # t_n
        noisy = self.noise_scheduler.add_noise(x.latents, x.noise, start)
        w_emb = C.guidance_embedding(x.w, self.emb_dim).to(device) if self.emb_dim else None
        (skip_s, out_s), (skip_p, out_p) = (
            [v.to(device).view(-1, 1, 1, 1) for v in C.boundary_scalings(t, cfg.timestep_scaling)]
            for t in (start, prev)
        )
        pred = self.predict(run.student, noisy, start, x.cond, x.extra, w_emb)
        online = skip_s * noisy + out_s * C.predicted_x0_eps(pred, start, noisy, ac, kind)[0]
        with torch.no_grad():  # the guided teacher, then one DDIM step to t_n
            x_prev = C.ddim_step(*self.guided_teacher(run, noisy, start, x.cond, x.extra, x.w), prev, ac)
            net = (
                self.target_unet
                if self.target_unet is not None
                else run.accelerator.unwrap_model(run.student)
            )
            t_pred = self.predict(net, x_prev, prev, x.cond, x.extra, w_emb)
            target = skip_p * x_prev + out_p * C.predicted_x0_eps(t_pred, prev, x_prev, ac, kind)[0]
        loss = C.consistency_distance(online, target, cfg.lcm_loss, cfg.huber_c)
        return {"loss": loss, "lcm": loss}

    def after_step(self, run: Run, step: int, online: dict | None) -> None:
        if self.target_unet is not None:  # the target network trails the student
            update_average(self.target_unet.state_dict(), online, self.cfg.target_decay)
        super().after_step(run, step, online)

    def final_scheduler(self, teacher_config: dict):
        from diffusers import LCMScheduler

        cfg = self.cfg
        own = init_params(LCMScheduler)  # the teacher's scheduler may have options this one has not
        return LCMScheduler.from_config(
            {k: v for k, v in teacher_config.items() if k in own},
            original_inference_steps=cfg.solver_steps,
            timestep_scaling=cfg.timestep_scaling,
        )

    def sampling(self) -> dict:
        """How the few-step student samples by default (``slimsd generate`` reads it from slimsd.json): a
        guidance embedding takes the scale (no doubled batch)."""
        cfg = self.cfg
        return {
            "kind": self.name,
            "scheduler": "lcm",
            "steps": cfg.sample_steps,
            "guidance": cfg.sample_guidance or (cfg.guidance_min if self.embedded else 1.0),
            "guidance_range": [cfg.guidance_min, cfg.guidance_max] if self.embedded else None,
            "solver_steps": cfg.solver_steps,
        }
