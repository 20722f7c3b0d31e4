"""objective vae-decoder (issue 24): a tiny VAE decoder (models/decoders.py, diffusers' AutoencoderTiny) trained
to decode what the teacher's VAE decoder decodes, so that a few-step image is not half decoding.

    loss = λ_out · pixel + λ_feat · feature

- data: the same sources and latent cache as kd; a micro-batch's latents are drawn from the teacher VAE's
  posterior (its encoder, or the cache's mean and std) and scaled as the U-Net sees them (× scaling_factor): the
  tiny decoder decodes U-Net latents (models/decoders.py: the scaling convention);
- latent_noise (σ, default 0): σ · N(0, 1) added to those U-Net latents, drawn after the posterior's draw; the
  teacher decodes the same noised latents (the target), so the decoder learns the full decoder off the posterior's
  manifold, where a few-step student's latents lie;
- pixel: mean squared error against the teacher's decode of the same latents, clipped to [-1, 1] as a pipeline
  clips it into an image (PSNR is what is measured against the full decode);
- feature: the teacher VAE's own encoder as the perceptual network, which needs no downloaded weights (LPIPS
  needs VGG/AlexNet weights): the outputs of its down blocks for the student's and the teacher's image, each
  tap's mean squared error divided by the teacher feature's mean square (taps of every scale weigh alike), mean
  over taps. That encoder was trained on the same images to keep what the latents must carry, from edges at full
  resolution to layout at 1/8: it penalises the blur and lost detail a pixel loss alone tolerates (taesd#24);
- no adversarial term (TAESD's GAN): not implemented; nothing here depends on one.

Config: ``student`` is a tiny-decoder preset (TINY_DECODERS) or a folder holding one (trained further);
``lambda_task`` must be 0 (no task term: the target is the teacher's decode). final/: a plain diffusers
AutoencoderTiny folder with slimsd.json (teacher, family, latent scaling convention)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from slimsd.errors import SlimsdError
from slimsd.models.decoders import LATENT_SCALING, TINY_DECODERS, is_decoder_folder
from slimsd.train.objectives.base import Models, Objective, Run, write_provenance


def encoder_features(vae, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the VAE encoder's input convolution and down blocks (the feature term's taps)."""
    enc = vae.encoder
    h = enc.conv_in(pixels.to(vae.dtype))
    feats = []
    for block in enc.down_blocks:
        h = block(h)
        feats.append(h)
    return feats


def feature_loss(
    vae, student_img: torch.Tensor, teacher_img: torch.Tensor, batch_mean: Callable | None = None
) -> torch.Tensor:
    """BATCH_MEAN: the mean of a per-process scalar over the processes (the teacher features' mean square is
    then the global micro-batch's, so that P processes compute what one process with their whole batch does)."""
    with torch.no_grad():
        targets = [t.float() for t in encoder_features(vae, teacher_img)]
        scales = [t.square().mean() for t in targets]
        scales = [batch_mean(x) for x in scales] if batch_mean else scales
    ours = encoder_features(vae, student_img)
    terms = [
        F.mse_loss(s.float(), t) / scale.clamp_min(1e-8)
        for s, t, scale in zip(ours, targets, scales, strict=True)
    ]
    return torch.stack(terms).mean()


class VAEDecoder(Objective):
    name = "vae-decoder"
    label = "decoder"

    @staticmethod
    def check(cfg) -> None:
        if cfg.student not in TINY_DECODERS and not is_decoder_folder(cfg.student):
            raise SlimsdError(
                f"config key 'student': {cfg.student!r} is not a tiny decoder for objective vae-decoder; allowed: "
                f"{', '.join(TINY_DECODERS)} or a folder holding an AutoencoderTiny"
            )
        if cfg.lambda_task:
            raise SlimsdError(
                f"config key 'lambda_task': {cfg.lambda_task:g} is not allowed for objective vae-decoder (no task "
                "term: the target is the teacher's decode); allowed: 0"
            )
        if not (cfg.lambda_out or cfg.lambda_feat):
            raise SlimsdError("config keys lambda_out and lambda_feat are both 0: nothing to learn")
        if cfg.feature_taps is not None:
            raise SlimsdError(
                "config key 'feature_taps' is for the U-Net objectives; vae-decoder's feature term taps the "
                "teacher VAE's encoder"
            )

    def load(self, device, weight_dtype: torch.dtype) -> Models:
        """The teacher pipeline (frozen, in the compute dtype: its VAE decodes the targets and its encoder gives
        the features, the rest samples validation latents) and the tiny decoder (fp32, only its decoder trained)."""
        from slimsd.models.decoders import build_tiny_decoder, check_fits, load_decoder
        from slimsd.models.loading import load
        from slimsd.train.objectives.unet import freeze

        cfg = self.cfg
        teacher = load(
            cfg.teacher, device=device, dtype=weight_dtype, optimize=False, allow_pickle=cfg.allow_pickle
        )
        vae_config = dict(teacher.vae.config)
        if cfg.student in TINY_DECODERS:
            student, source = build_tiny_decoder(cfg.student, vae_config, seed=cfg.seed), None
        else:
            student, source = load_decoder(cfg.student), cfg.student
        check_fits(student, vae_config, cfg.student)
        student = student.float().requires_grad_(False)
        student.decoder.requires_grad_(True)  # the encoder is not trained (models/decoders.py)
        # Its forward is what is trained, decoding: DDP synchronises the gradients of what runs through the
        # wrapper's forward, and AutoencoderTiny's own forward encodes too. Its state dict is unchanged.
        student.forward = student.decode
        frozen = freeze(teacher, student)
        self.teacher = teacher
        recipe = {
            "name": cfg.student,
            "config": {k: v for k, v in student.config.items() if not k.startswith("_")},
        }
        return Models(teacher, student, frozen, recipe, student_source=source)

    def architecture(self, student, models: Models) -> str:
        c = student.config
        params = sum(p.numel() for p in student.parameters())
        return (
            f"{self.cfg.student} (AutoencoderTiny, decoder channels {list(c.decoder_block_out_channels)}, blocks "
            f"{list(c.num_decoder_blocks)}, {params:,} parameters)"
        )

    def validation(self, run: Run, step: int, log_with) -> None:
        """The validation grid of STEP (the main process): for each fixed prompt the teacher samples latents
        (same seeds every time), shown decoded by the teacher's VAE beside the tiny decoder."""
        import io

        from slimsd.atomic import atomic_write_bytes
        from slimsd.images import make_grid

        if not run.accelerator.is_main_process:
            return
        cfg, tp, decoder = self.cfg, self.teacher, run.accelerator.unwrap_model(run.student)
        images = []
        decoder.eval()
        for i, prompt in enumerate(cfg.validation_prompts):
            g = torch.Generator().manual_seed(cfg.seed + i)
            size = {"height": run.resolution, "width": run.resolution}
            with torch.no_grad(), run.accelerator.autocast():
                z = tp(
                    prompt,
                    num_inference_steps=cfg.validation_steps,
                    generator=g,
                    output_type="latent",
                    **size,
                )
                z = z.images
                full = tp.vae.decode(z.to(tp.vae.dtype) / tp.vae.config.scaling_factor).sample
                tiny = decoder.decode(z.float()).sample
            images += tp.image_processor.postprocess(
                torch.cat([full.float(), tiny.float()]), output_type="pil"
            )
        decoder.train()
        grid = make_grid(images, cols=2)
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        atomic_write_bytes(run.output_dir / "validation" / f"step-{step:08d}.png", buf.getvalue())
        if log_with:
            import numpy as np

            writer = run.accelerator.get_tracker("tensorboard").writer
            writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    def prepare(self, run: Run) -> None:
        from slimsd.models.loading import is_sdxl

        if run.engine not in ("single", "ddp"):
            raise SlimsdError(
                f"objective vae-decoder trains on one process or under DDP (`accelerate launch --multi_gpu`), "
                f"not {run.engine}: a tiny decoder fits every device whole"
            )
        self.sdxl = is_sdxl(self.teacher)

    def latents(self, run: Run, batch: dict) -> torch.Tensor:
        """The micro-batch's U-Net latents: a draw from the teacher VAE's posterior for the whole global
        micro-batch (identical on every process, each takes its rows), × the VAE's scaling factor, plus
        latent_noise × N(0, 1) drawn next from the same generator (the same on every process too)."""
        from slimsd.train.encoders import encode_images

        vae = self.teacher.vae
        rows = run.accelerator.process_index * self.cfg.batch_size + batch["slot"]
        if run.cached:
            mean, std = batch["latent_mean"].to(run.device), batch["latent_std"].to(run.device)
        else:
            with torch.no_grad():
                mean, std = encode_images(vae, batch["pixels"].to(run.device))
        shape = (run.global_batch, *mean.shape[1:])
        eps = torch.randn(shape, generator=run.gen)[rows].to(run.device)
        z = (mean.float() + std.float() * eps) * vae.config.scaling_factor
        if self.cfg.latent_noise:  # drawn after the posterior's, for the global micro-batch like it
            z = z + self.cfg.latent_noise * torch.randn(shape, generator=run.gen)[rows].to(run.device)
        return z

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, vae = self.cfg, self.teacher.vae
        z = self.latents(run, batch)
        with torch.no_grad():
            target = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)
        image = run.student(
            z
        ).sample.float()  # its forward decodes (load); through DDP's wrapper when wrapped
        pixel = F.mse_loss(image, target)
        acc = run.accelerator
        mean = (lambda x: acc.reduce(x.reshape(1), reduction="mean")[0]) if acc.num_processes > 1 else None
        feat = feature_loss(vae, image, target, mean) if cfg.lambda_feat else torch.zeros((), device=z.device)
        return {"loss": cfg.lambda_out * pixel + cfg.lambda_feat * feat, "pixel": pixel, "feat": feat}

    def save_final(self, run: Run, weights: dict, state: dict) -> Path:
        """final/: the tiny decoder as a plain diffusers AutoencoderTiny folder (fp32), with slimsd.json."""
        from diffusers import AutoencoderTiny

        from slimsd.atomic import atomic_dir
        from slimsd.models.loading import model_source
        from slimsd.models.sources import quiet_libraries

        cfg = self.cfg
        # block_out_channels: what AutoencoderTiny registers of its own accord, not an argument (diffusers warns)
        config = {k: v for k, v in run.models.student.config.items() if k != "block_out_channels"}
        decoder = AutoencoderTiny.from_config(config)
        decoder.load_state_dict({k: v.float() for k, v in weights.items()})
        out = Path(cfg.output_dir) / "final"
        with atomic_dir(out, overwrite=True) as tmp, quiet_libraries():  # the libraries' bars and notes
            decoder.save_pretrained(tmp, safe_serialization=True)
            fields = {
                "kind": "tiny-decoder",
                "teacher": cfg.teacher,
                "teacher_source": model_source(cfg.teacher),
                "family": "sdxl" if self.sdxl else "sd",
                "latent_scaling": LATENT_SCALING,
                "teacher_scaling_factor": self.teacher.vae.config.scaling_factor,
                "decoder": cfg.student if cfg.student in TINY_DECODERS else None,
                "encoder": "untrained (seeded random weights): encode with the model's own VAE",
                "distill": asdict(cfg),
            }
            write_provenance(tmp, state, fields)
        return out
