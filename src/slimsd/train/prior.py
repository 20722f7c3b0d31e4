"""DreamBooth's prior preservation (objective=finetune with ``class_prompt``; Ruiz et al. 2023): the frozen
model's own images of the class, trained on beside the data, keep the class from drifting to the data.

The images are sampled once, seeded (image i from seed + i), into ``OUTPUT/class_images/`` (``class-NNNNN.png``
and ``class.json``, what made them), written whole or not at all; a resume reads them back instead of sampling
again. Training always reads the PNGs, so a resumed run sees the very pixels an uninterrupted one saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from slimsd.train.settings import DistillConfig

CLASS_DIR = "class_images"


@dataclass
class ClassRows:
    mean: torch.Tensor  # (N, C, h, w) the VAE posterior of each class image, fp32, on the device
    std: torch.Tensor
    cond: dict[str, torch.Tensor]  # the class prompt's embeddings, one row
    time_ids: torch.Tensor | None  # SDXL: (1, 6), the images' own size, uncropped


def _settings(cfg: DistillConfig, resolution: int) -> dict:
    return {
        "model": cfg.student,
        "prompt": cfg.class_prompt,
        "count": cfg.num_class_images,
        "seed": cfg.seed,
        "steps": cfg.class_steps,
        "resolution": resolution,
    }


def ensure_class_images(pipe, cfg: DistillConfig, resolution: int, autocast) -> Path:
    """OUTPUT/class_images, sampled by PIPE with its U-Net's adapters off unless already there."""
    from tqdm.auto import tqdm

    from slimsd.atomic import atomic_dir

    folder = Path(cfg.output_dir) / CLASS_DIR
    settings = _settings(cfg, resolution)
    try:
        if json.loads((folder / "class.json").read_text()) == settings:
            return folder
    except (OSError, ValueError):
        pass
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    was_training = unet.training
    unet.eval()
    unet.disable_adapters()  # the frozen model's images, also if a resume finds them missing
    starts = range(0, cfg.num_class_images, cfg.batch_size)
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            for start in tqdm(starts, desc="class images", disable=None if cfg.progress else True):
                count = min(cfg.batch_size, cfg.num_class_images - start)
                gens = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(count)]
                with torch.no_grad(), autocast():
                    images = pipe(
                        [cfg.class_prompt] * count,
                        num_inference_steps=cfg.class_steps,
                        height=resolution,
                        width=resolution,
                        generator=gens,
                    ).images
                for i, image in enumerate(images):
                    image.save(tmp / f"class-{start + i:05d}.png")
            (tmp / "class.json").write_text(json.dumps(settings, indent=1) + "\n")
    finally:
        unet.enable_adapters()
        unet.train(was_training)
    return folder


@torch.no_grad()
def read_class_rows(pipe, folder: Path, cfg: DistillConfig, resolution: int, sdxl: bool) -> ClassRows:
    """The class images' latents (VAE mean and std) and the class prompt's embeddings, on PIPE's device."""
    from PIL import Image

    from slimsd.train.data import preprocess
    from slimsd.train.encoders import encode_images, encode_text, time_ids

    paths = sorted(folder.glob("class-*.png"))[: cfg.num_class_images]
    means, stds = [], []
    for start in range(0, len(paths), cfg.batch_size):
        pixels = torch.stack(
            [
                preprocess(Image.open(p).convert("RGB"), resolution)["pixels"]
                for p in paths[start : start + cfg.batch_size]
            ]
        )
        mean, std = encode_images(pipe.vae, pixels)
        means.append(mean.float())
        stds.append(std.float())
    size = torch.tensor([[resolution, resolution]])
    return ClassRows(
        torch.cat(means),
        torch.cat(stds),
        encode_text(pipe, [cfg.class_prompt]),
        time_ids(size, torch.zeros_like(size), resolution) if sdxl else None,
    )


def add_class_rows(
    prior: ClassRows, gen, global_batch: int, rows, timesteps_high: int, scaling: float, batch
):
    """BATCH = (latents, noise, timesteps, cond, extra) with one class row after each instance row. The draws
    come from GEN after the instance rows' draws, so the instance rows are those of a run without the prior."""
    latents, noise, timesteps, cond, extra = batch
    device, k = latents.device, len(rows)
    shape = (global_batch, *prior.mean.shape[1:])
    pick = torch.randint(0, prior.mean.shape[0], (global_batch,), generator=gen)[rows].to(device)
    t = torch.randint(0, timesteps_high, (global_batch,), generator=gen)[rows].to(device)
    c_noise = torch.randn(shape, generator=gen)[rows].to(device)
    c_eps = torch.randn(shape, generator=gen)[rows].to(device)
    c_latents = (prior.mean[pick] + prior.std[pick] * c_eps) * scaling
    cond = {key: torch.cat([v, prior.cond[key].to(v).expand(k, *v.shape[1:])]) for key, v in cond.items()}
    if extra:
        ids = extra["added_cond_kwargs"]["time_ids"]
        extra = {
            "added_cond_kwargs": {
                "text_embeds": cond["pooled_prompt_embeds"],
                "time_ids": torch.cat([ids, prior.time_ids.to(ids).expand(k, -1)]),
            }
        }
    return (
        torch.cat([latents, c_latents]),
        torch.cat([noise, c_noise]),
        torch.cat([timesteps, t]),
        cond,
        extra,
    )
