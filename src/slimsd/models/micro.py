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

MICRO_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}


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
    """A ready diffusers pipeline of an offline preset's architecture (``micro-sd``, ``micro-sdxl``) with random
    weights, deterministic. (``toy-sd`` has micro-sd's architecture; its trained weights come from
    slimsd.toy.teacher.)"""
    import diffusers
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimsd.errors import unknown
    from slimsd.models.presets import get_preset, names

    preset = get_preset(name)
    if preset.kind != "micro":
        raise unknown("micro model", name, names("micro"))
    tokenizer = load_tokenizer()
    text_config = CLIPTextConfig(**micro_text_config(tokenizer))
    vae = _seeded(1, lambda: AutoencoderKL(**preset.vae))
    unet = _seeded(0, lambda: UNet2DConditionModel(**preset.unet))
    text_encoder = _seeded(2, lambda: CLIPTextModel(text_config))
    sched = dict(preset.scheduler)
    scheduler = getattr(diffusers, sched.pop("_class_name")).from_config(sched)
    if preset.family == "sd":
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
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=_seeded(3, lambda: CLIPTextModelWithProjection(text_config)),
        tokenizer=tokenizer,
        tokenizer_2=load_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
