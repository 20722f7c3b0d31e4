"""Parameters and MACs, counted on the meta device: no weights, no download, milliseconds per model.

MACs follow the convention of BK-SDM's published table: multiply-accumulates of convolutions and linear
layers for one U-Net forward at batch 1; the attention score products (QK^T and AV) are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimsd.models.presets import Preset
from slimsd.models.single_file import TEXT_FIELDS
from slimsd.models.sources import ModelRef, resolve_model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet_meta(config: dict):
    """A ``UNet2DConditionModel`` on the meta device (architecture only)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def unet_dummy_inputs(
    unet, resolution: int, batch: int = 1, device="meta", dtype=torch.float32, vae_factor: int = 8
):
    """Inputs of one U-Net forward at ``resolution`` pixels (latents at resolution / vae_factor)."""
    cfg = unet.config
    side = resolution // vae_factor
    sample = torch.zeros(batch, cfg.in_channels, side, side, device=device, dtype=dtype)
    cross = cfg.cross_attention_dim
    cross = cross[0] if isinstance(cross, list | tuple) else cross
    kwargs = {
        "sample": sample,
        "timestep": torch.full((batch,), 999, device=device, dtype=torch.long),
        "encoder_hidden_states": torch.zeros(batch, 77, cross, device=device, dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
        }
    return kwargs


def count_macs(module: nn.Module, inputs: dict) -> int:
    """MACs of one forward of ``module`` on ``inputs`` (convolutions and linear layers only)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            module(**inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def unet_macs(unet, resolution: int) -> int:
    device = next(unet.parameters()).device
    return count_macs(unet, unet_dummy_inputs(unet, resolution, device=device))


class _Decode(nn.Module):
    """One decode of latents, as a module (count_macs calls modules)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def decoder_counts(vae, resolution: int) -> tuple[int, int]:
    """(parameters, MACs of one decode at RESOLUTION px, batch 1) of a VAE's decoding path: AutoencoderKL's
    post_quant_conv and decoder, or AutoencoderTiny's decoder; on any device (meta included)."""
    from slimsd.errors import SlimsdError

    c = vae.config
    factor = 2 ** (len(c.block_out_channels) - 1)
    if resolution % factor:
        raise SlimsdError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    p = next(vae.parameters())
    side = resolution // factor
    z = torch.zeros(1, c.latent_channels, side, side, device=p.device, dtype=p.dtype)
    parts = [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]
    return sum(count_params(m) for m in parts), count_macs(_Decode(vae), {"z": z})


def text_encoder_params(config: dict) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(config)
    cls = CLIPTextModelWithProjection if config.pop("with_projection", False) else CLIPTextModel
    cfg = CLIPTextConfig(**config)
    with torch.device("meta"):
        return count_params(cls(cfg))


def vae_params(config: dict) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return count_params(AutoencoderKL.from_config(config))


def block_params(unet) -> dict[str, int]:
    """Parameters of the down blocks, mid block and up blocks (how Segmind reports Vega)."""
    return {
        "down": sum(count_params(b) for b in unet.down_blocks),
        "mid": count_params(unet.mid_block) if unet.mid_block is not None else 0,
        "up": sum(count_params(b) for b in unet.up_blocks),
    }


def preset_architecture(preset: str | Preset) -> tuple[dict, list[dict], dict, int]:
    """(unet config, text encoder configs, vae config, default resolution) of a preset or offline model (its
    name, or its entry as a ModelRef carries it)."""
    from slimsd.models.presets import get_preset, student_teacher_unet

    p = get_preset(preset) if isinstance(preset, str) else preset
    if p.kind == "micro":
        from slimsd.models.micro import load_tokenizer, micro_text_config

        text = micro_text_config(load_tokenizer())
        encoders = [text] if p.family == "sd" else [text, {**text, "with_projection": True}]
        return p.unet, encoders, p.vae, p.resolution
    unet = student_teacher_unet(p)
    if p.kind == "student":
        from slimsd.models.architecture import load_recipe, student_config

        unet = student_config(unet, load_recipe(p.recipe))
    teacher = get_preset(p.teacher) if p.kind == "student" else p
    return unet, list(teacher.text_encoders), teacher.vae, p.resolution


def _arch_from_configs(source: str) -> tuple[dict, list[dict], dict, int]:
    """Architecture from a local pipeline folder or a hub repo: configs only, no weights."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig

    index = DiffusionPipeline.load_config(source)  # model_index.json: which components the pipeline has
    unet = dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
    vae = dict(AutoencoderKL.load_config(source, subfolder="vae"))
    encoders = []
    for sub in ("text_encoder", "text_encoder_2"):
        if not isinstance(index.get(sub), list | tuple) or index[sub][0] is None:
            continue
        cfg = CLIPTextConfig.from_pretrained(source, subfolder=sub)
        d = {k: getattr(cfg, k) for k in TEXT_FIELDS}
        d["with_projection"] = "CLIPTextModelWithProjection" in (cfg.architectures or [])
        encoders.append(d)
    from slimsd.models.sources import native_resolution_of

    return unet, encoders, vae, native_resolution_of(unet, vae)


def model_architecture(model: str | ModelRef) -> tuple[dict, list[dict], dict, int]:
    """(unet config, text encoder configs, vae config, default resolution) of any model: configs only."""
    from slimsd.errors import SlimsdError

    ref = resolve_model(model)
    model, kind = ref.name, ref.kind
    if kind in ("micro", "preset"):
        return preset_architecture(ref.preset)
    if kind == "single-file":
        from slimsd.models.single_file import file_architecture

        return file_architecture(model)
    try:
        return _arch_from_configs(model)
    except (OSError, ValueError) as e:
        from slimsd.models.sources import _first_line, check_local_folder, hub_error_reason

        if kind == "local":  # a folder that is there but unreadable is broken, not missing from a cache
            check_local_folder(Path(model), allow_pickle=True)
            raise SlimsdError(f"model folder {model!r} is broken: {_first_line(e)}") from None
        raise SlimsdError(f"could not read the configs of {model!r}: {hub_error_reason(e)}") from None


def unet_counts(unet_cfg: dict, vae_cfg: dict, resolution: int):
    """(the U-Net on the meta device, its parameters, its MACs at ``resolution``)."""
    from slimsd.errors import SlimsdError

    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    if resolution % vae_factor:
        raise SlimsdError(f"resolution {resolution} is not a multiple of the VAE factor {vae_factor}")
    unet = build_unet_meta(unet_cfg)
    return (
        unet,
        count_params(unet),
        count_macs(unet, unet_dummy_inputs(unet, resolution, vae_factor=vae_factor)),
    )


def summarize(model: str, resolution: int | None = None) -> dict:
    """What ``slimsd inspect`` reports: parameters of each component and U-Net MACs at ``resolution``."""
    from slimsd.models.presets import PRESETS

    ref = resolve_model(model)
    model, kind = ref.name, ref.kind
    unet_cfg, encoders, vae_cfg, default_res = model_architecture(ref)
    resolution = resolution or default_res
    unet, up, macs = unet_counts(unet_cfg, vae_cfg, resolution)
    te = [text_encoder_params(c) for c in encoders]
    vae = vae_params(vae_cfg)
    out = {
        "model": model,
        "kind": PRESETS[model].kind if model in PRESETS else kind,
        "resolution": resolution,
        "vae_factor": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "unet_params": up,
        "unet_macs": macs,
        "unet_blocks": block_params(unet),
        "text_encoder_params": sum(te),
        "text_encoder_params_each": te,
        "vae_params": vae,
        "total_params": up + sum(te) + vae,
        "unet_config": {k: v for k, v in unet_cfg.items() if not k.startswith("_")},
    }
    if model in PRESETS and PRESETS[model].published:
        out["published"] = PRESETS[model].published
        out["hub_id"] = PRESETS[model].hub_id
    return out


def decoder_summary(model: str, resolution: int | None = None, vae: str | None = None) -> dict:
    """The decoders ``slimsd inspect`` compares at ``resolution``: the model's VAE decoder and a tiny decoder for
    its latent space (the folder VAE, else the ``tiny-decoder`` preset; ``micro-tiny-decoder`` for the micro
    models), parameters and MACs of one decode."""
    from diffusers import AutoencoderTiny

    from slimsd.models.decoders import decoder_config, meta_decoders
    from slimsd.models.presets import PRESETS

    _, _, vae_cfg, default_res = model_architecture(model)
    resolution = resolution or default_res
    preset = "micro-tiny-decoder" if model in PRESETS and PRESETS[model].kind == "micro" else "tiny-decoder"
    full, tiny = meta_decoders(vae_cfg, preset)
    if vae is not None:
        with torch.device("meta"):
            tiny = AutoencoderTiny.from_config(decoder_config(vae))
    full_params, full_macs = decoder_counts(full, resolution)
    tiny_params, tiny_macs = decoder_counts(tiny, resolution)
    return {
        "resolution": resolution,
        "vae_decoder": {"params": full_params, "macs": full_macs},
        "tiny_decoder": {"source": vae or preset, "params": tiny_params, "macs": tiny_macs},
        "macs_ratio": full_macs / tiny_macs,
    }
