"""objective finetune (`slimsd finetune`): LoRA adapters on ONE model's U-Net, trained with the task loss alone,
no teacher; with ``class_prompt``, DreamBooth's prior preservation (Ruiz et al. 2023; prior.py): the frozen
model's images of the class join each micro-batch, their task loss added with ``prior_loss_weight``.

Models: the model (its U-Net fp32 with the adapters, the rest frozen in the compute dtype). final/: the adapters
alone (pytorch_lora_weights.safetensors) and slimsd.json naming the base model (use them with ``--lora``).
Config: the same DistillConfig under the names a fine-tuner expects (FINETUNE_NAMES), and only the keys that
mean something without a teacher (FINETUNE_KEYS)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from slimsd.models.lora import LORA_FILE
from slimsd.train.adapters import ATTENTION_TARGETS, add_lora, write_adapters
from slimsd.train.objectives.base import Models, Run, write_provenance
from slimsd.train.objectives.unet import UNetObjective, freeze

FINETUNE_NAMES = {
    "model": "student",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "target_modules": "lora_targets",
}
FINETUNE_KEYS = (
    *("data", "output_dir", "max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate"),
    *("weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler"),
    *("lr_warmup_steps", "resolution", "center_crop", "random_flip", "caption_dropout", "checkpoint_every"),
    *("keep_last", "resume", "overwrite", "allow_config_change", "stop_at_step", "mixed_precision", "seed"),
    *("gradient_checkpointing", "use_8bit_adam", "validation_prompts", "validation_every"),
    *("validation_steps", "log_every", "num_workers", "tensorboard", "progress", "allow_pickle"),
    "max_skipped_fraction",
    *("class_prompt", "num_class_images", "class_steps", "prior_loss_weight"),
    "data_filter",
)
FINETUNE_DEFAULTS = {
    "objective": "finetune",
    "lambda_out": 0.0,
    "lambda_feat": 0.0,
    "learning_rate": 1e-4,  # diffusers' train_text_to_image_lora.py
    "lora_rank": 4,
    "lora_targets": ATTENTION_TARGETS,
    "output_dir": "runs/finetune",
}


def finetune_view(cfg) -> dict:
    """The config under finetune's key names: what `slimsd finetune --dry-run` prints and final/ records."""
    values = asdict(cfg)
    return {name: values[key] for name, key in FINETUNE_NAMES.items()} | {k: values[k] for k in FINETUNE_KEYS}


class Finetune(UNetObjective):
    name = "finetune"
    label = "finetune"

    def load(self, device, weight_dtype: torch.dtype) -> Models:
        """ONE model, whose U-Net (fp32) gets the adapters and fills the student's slot; its other parts serve
        as the frozen VAE and text encoder(s), in the compute dtype. No teacher is loaded."""
        from slimsd.models.loading import load
        from slimsd.models.sources import resolve_model

        cfg = self.cfg
        ref = resolve_model(cfg.student)  # read once: the loader and the provenance take it
        pipe = load(ref, device="cpu", dtype="fp32", optimize=False, allow_pickle=cfg.allow_pickle)
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module) and part is not pipe.unet:
                part.to(device)
                if weight_dtype != torch.float32:  # (a cast to the dtype it has already makes diffusers warn)
                    part.to(weight_dtype)
        info = (ref.info or {}) if ref.kind == "local" else {}
        unet = add_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or ATTENTION_TARGETS)
        frozen = freeze(pipe, unet)
        return Models(pipe, unet, frozen, info.get("recipe"), info.get("weight_map"))

    def prepare(self, run: Run) -> None:
        """With class_prompt: the class images, sampled once before the first step, read as latents."""
        from slimsd.train import prior as PR

        super().prepare(run)
        self.prior = None
        if self.cfg.class_prompt is not None:
            pipe = run.models.pipe
            if run.accelerator.is_main_process:
                PR.ensure_class_images(pipe, self.cfg, run.resolution, run.accelerator.autocast)
            run.accelerator.wait_for_everyone()
            folder = run.output_dir / PR.CLASS_DIR
            self.prior = PR.read_class_rows(pipe, folder, self.cfg, run.resolution, self.sdxl)

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        from slimsd.train import prior as PR
        from slimsd.train.losses import finetune_loss, task_target

        T = self.num_train_timesteps
        x = self.inputs(run, batch, T)
        rows = (x.latents, x.noise, x.timesteps, x.cond, x.extra)
        instances = x.latents.shape[0]
        if self.prior is not None:  # the class rows (DreamBooth), after the instance rows
            scaling = run.models.pipe.vae.config.scaling_factor
            rows = PR.add_class_rows(self.prior, run.gen, run.global_batch, x.rows, T, scaling, rows)
        latents, noise, timesteps, cond, extra = rows
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = task_target(self.noise_scheduler, latents, noise, timesteps)
        pred = self.predict(run.student, noisy, timesteps, cond, extra)
        return finetune_loss(pred, target, instances, self.cfg.prior_loss_weight)

    def save_final(self, run: Run, weights: dict, state: dict) -> Path:
        from slimsd.atomic import atomic_dir

        cfg = self.cfg
        out = Path(cfg.output_dir) / "final"
        with atomic_dir(out, overwrite=True) as tmp:
            write_adapters(tmp, type(run.models.pipe), run.models.student, weights)
            fields = {
                "kind": "lora",
                "base_model": cfg.student,
                "lora": LORA_FILE,
                "finetune": finetune_view(cfg),
            }
            write_provenance(tmp, state, fields)
        return out
