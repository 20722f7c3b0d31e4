"""LoRA adapters on a U-Net for training (peft): which layers they sit on, putting them on, writing them out in
diffusers' LoRA format. Objectives lcm-lora and finetune train them; models/lora.py reads such files."""

from __future__ import annotations

from pathlib import Path

from slimsd.errors import SlimsdError

# LCM-LoRA's adapted layers (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, convolutions.
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # finetune's LoRA layers: the attention projections


def add_lora(unet, rank: int, alpha: float | None, targets: list[str] | None = None):
    """LoRA adapters on the U-Net's TARGETS (default: LCM-LoRA's; peft; B = 0, so the model starts unchanged);
    only they train."""
    from peft import LoraConfig

    targets = targets or LORA_TARGETS
    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets))
    except ValueError:  # peft: none of the names is a module of this U-Net
        raise SlimsdError(
            f"LoRA target modules {targets} name no layer of this U-Net; allowed: module names such as "
            "to_q, to_k, to_v, to_out.0"
        ) from None
    return unet


def write_adapters(folder: Path, pipe_cls, unet, unet_state: dict) -> None:
    """The adapters of UNET (values from UNET_STATE) as FOLDER/pytorch_lora_weights.safetensors in diffusers'
    LoRA format: peft's key names (``unet....to_q.lora_A.weight``), which ``load_lora_weights`` reads as they are,
    and peft's config (rank, alpha, layers) in the header, from which diffusers and slimsd take alpha/rank."""
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(unet, unet_state)
    metadata = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set, whose order changes with Python's string hash seed: sorted, the file
    # is the same on every run
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipe_cls.save_lora_weights(
        folder,
        unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in lora.items()},
        unet_lora_adapter_metadata=metadata,
    )
