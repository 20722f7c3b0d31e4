"""The frozen encoders' side of training: text embeddings and VAE latents, as the pipelines compute them.

Shared by the trainer (encoding on the fly) and the latent cache (``slimsd cache``), so that training on a cache
computes what training on the images does.
"""

from __future__ import annotations

import torch

from slimsd.models.loading import is_sdxl


@torch.no_grad()
def encode_text(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` (and SDXL's ``pooled_prompt_embeds``) as the pipelines compute them: SD uses the text
    encoder's last hidden state; SDXL concatenates both encoders' penultimate hidden states and takes the
    pooled projection of the second."""

    def ids(tokenizer, encoder):
        tok = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tok.input_ids.to(encoder.device)

    if not is_sdxl(pipe):
        return {"prompt_embeds": pipe.text_encoder(ids(pipe.tokenizer, pipe.text_encoder))[0]}
    out1 = pipe.text_encoder(ids(pipe.tokenizer, pipe.text_encoder), output_hidden_states=True)
    out2 = pipe.text_encoder_2(ids(pipe.tokenizer_2, pipe.text_encoder_2), output_hidden_states=True)
    return {
        "prompt_embeds": torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1),
        "pooled_prompt_embeds": out2[0],
    }


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std (unscaled); the trainer samples from it and applies the scaling."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL's added time ids: (original h, w, crop top, left, target h, w), one row per example."""
    target = torch.tensor([resolution, resolution]).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()
