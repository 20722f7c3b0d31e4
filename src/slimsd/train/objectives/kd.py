"""objective kd: BK-SDM's knowledge distillation of a compressed U-Net from its frozen teacher (Kim et al. 2023).

    loss = λ_task · task + λ_out · output-KD + λ_feat · Σ feature-KD      (losses.py)

Models: the teacher pipeline and the student U-Net; feature taps hooked on both (before accelerate wraps the
student). Averages: the EMA when ``ema: true``. final/: the student as a plain diffusers pipeline."""

from __future__ import annotations

import torch

from slimsd.errors import SlimsdError
from slimsd.train.objectives.base import Run
from slimsd.train.objectives.unet import UNetObjective, cast


class KD(UNetObjective):
    name = "kd"

    @staticmethod
    def check(cfg) -> None:
        if not (cfg.lambda_task or cfg.lambda_out or cfg.lambda_feat):
            raise SlimsdError(
                "config keys lambda_task, lambda_out and lambda_feat are all 0: nothing to learn"
            )

    def prepare(self, run: Run) -> None:
        from slimsd.train.losses import attach_taps

        super().prepare(run)
        cfg, models = self.cfg, run.models
        self.use_teacher = cfg.lambda_out > 0 or cfg.lambda_feat > 0
        use_feat = cfg.lambda_feat > 0 and bool(models.taps)
        self.s_taps = attach_taps(models.student, [s for s, _ in models.taps]) if use_feat else None
        self.t_taps = attach_taps(models.pipe.unet, [t for _, t in models.taps]) if use_feat else None

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        from slimsd.train.losses import distill_loss, task_target

        cfg, dtype = self.cfg, run.weight_dtype
        x = self.inputs(run, batch, self.num_train_timesteps)
        noisy = self.noise_scheduler.add_noise(x.latents, x.noise, x.timesteps)
        target = task_target(self.noise_scheduler, x.latents, x.noise, x.timesteps)
        teacher_pred = None
        if self.use_teacher:
            with torch.no_grad():
                if self.t_taps:
                    self.t_taps.clear()
                teacher_pred = run.models.pipe.unet(
                    noisy.to(dtype), x.timesteps, x.cond["prompt_embeds"].to(dtype), **cast(x.extra, dtype)
                ).sample
        if self.s_taps:
            self.s_taps.clear()
        student_pred = self.predict(run.student, noisy, x.timesteps, x.cond, x.extra)
        return distill_loss(
            student_pred,
            target,
            teacher_pred,
            self.s_taps.features if self.s_taps else {},
            self.t_taps.features if self.t_taps else {},
            run.models.taps,
            cfg.lambda_task,
            cfg.lambda_out,
            cfg.lambda_feat,
            cfg.feat_norm,
        )

    def close(self) -> None:
        for taps in (self.s_taps, self.t_taps):
            if taps is not None:
                taps.remove()
