"""The offline micro models: ``micro-sd`` and ``micro-sdxl``.

Tiny random-weight pipelines with the block structure of SD 1.x and SDXL (stages, residual/attention pairs,
transformer depths, mid block, SDXL's two text encoders and added conditions), so that every recipe applies
to them exactly as it does to the real models. Built deterministically from code in well under a second;
the tokenizer is a small CLIP-style BPE committed under ``fixtures/tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer"

MICRO_SD_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64, 64],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
}

MICRO_SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32
    + 6 * 8,  # pooled text (text_encoder_2 projection) + 6 time ids
    "norm_num_groups": 16,
}

MICRO_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

MICRO_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [32, 64, 64, 64],  # 4 blocks: 8x down-sampling, as in SD (64 px <-> 8x8 latents)
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

MICRO_NAMES = ("micro-sd", "micro-sdxl")


def load_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def micro_text_config(tokenizer) -> dict:
    """The micro text encoder config, sized to the fixture tokenizer."""
    return {
        **MICRO_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_micro(name: str):
    """A ready diffusers pipeline for ``micro-sd`` or ``micro-sdxl`` (random weights, deterministic)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimsd.errors import unknown
    from slimsd.models.presets import SD_SCHEDULER, SDXL_SCHEDULER

    if name not in MICRO_NAMES:
        raise unknown("micro model", name, MICRO_NAMES)
    tokenizer = load_tokenizer()
    text_config = CLIPTextConfig(**micro_text_config(tokenizer))
    vae = _seeded(1, lambda: AutoencoderKL(**MICRO_VAE))
    if name == "micro-sd":
        unet = _seeded(0, lambda: UNet2DConditionModel(**MICRO_SD_UNET))
        text_encoder = _seeded(2, lambda: CLIPTextModel(text_config))
        scheduler = PNDMScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"})
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    unet = _seeded(0, lambda: UNet2DConditionModel(**MICRO_SDXL_UNET))
    text_encoder = _seeded(2, lambda: CLIPTextModel(text_config))
    text_encoder_2 = _seeded(3, lambda: CLIPTextModelWithProjection(text_config))
    scheduler = EulerDiscreteScheduler.from_config(
        {k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"}
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=load_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def micro_unet_config(name: str) -> dict:
    return {"micro-sd": MICRO_SD_UNET, "micro-sdxl": MICRO_SDXL_UNET}[name]
