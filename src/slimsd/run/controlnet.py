"""ControlNet for any U-Net, students without a mid block included, and loading one to generate with.

diffusers' ``ControlNetModel.from_unet`` copies the U-Net's config and weights into a ControlNet: the stem
(conv_in, time and added embeddings), the down blocks and the mid block. A BK-SDM student has no mid block
(``mid_block_type: None``): the ControlNet's constructor knows only ``UNetMidBlock2DCrossAttn`` and
``UNetMidBlock2D`` and raises "unknown mid_block_type : None", and ``from_unet`` would then copy
``unet.mid_block``, which is None.

:func:`controlnet_for` builds such a student's ControlNet with a *fresh* ``UNetMidBlock2D`` (one ResNet block, no
attention: the smallest mid block diffusers' ControlNetModel has) and copies everything else from the student as
``from_unet`` does. Its mid residual goes through the ControlNet's zero-initialised 1x1 conv, so it starts at
exactly zero, which is what the student, with nothing between its down and up blocks, sees without a ControlNet;
training can then learn to use it. A zero residual by construction (no mid block at all) would need a class of
our own that ``ControlNetModel.from_pretrained`` and other tools could not load; the fresh block costs a few
parameters and keeps the folder a plain diffusers ControlNet. The student's U-Net already adds a mid residual
where its mid block would be (diffusers' ``UNet2DConditionModel.forward`` adds it after an absent mid block).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from slimsd.errors import SlimsdError

FRESH_MID_BLOCK = "UNetMidBlock2D"


def controlnet_for(unet, conditioning_channels: int = 3):
    """A diffusers ``ControlNetModel`` for UNET (SD or SDXL class, teacher or student): its stem and down blocks
    copied from UNET, every output conv zero-initialised (so at first it changes nothing). A U-Net without a mid
    block gets a fresh one (see the module docstring). UNET must be as loaded, without the fast runtime's fused
    attention projections (``load(..., optimize=False)`` or ``UNet2DConditionModel.from_pretrained``)."""
    from diffusers import ControlNetModel
    from diffusers.configuration_utils import FrozenDict

    from slimsd.models.loading import quiet_libraries

    unet = getattr(unet, "_orig_mod", unet)  # a torch.compile wrapper
    if any(getattr(m, "fused_projections", False) for m in unet.modules()):
        raise SlimsdError(
            "this U-Net has fused attention projections (the fast runtime); build the ControlNet from the "
            "U-Net as loaded: load(MODEL, optimize=False)"
        )
    if unet.mid_block is not None:
        return ControlNetModel.from_unet(unet, conditioning_channels=conditioning_channels)
    config = FrozenDict({**unet.config, "mid_block_type": FRESH_MID_BLOCK})
    with torch.random.fork_rng(devices=[]):  # the fresh mid block's init must not move the caller's seed
        controlnet = ControlNetModel.from_unet(
            SimpleNamespace(config=config),
            load_weights_from_unet=False,
            conditioning_channels=conditioning_channels,
        )
    # What from_unet copies, less the mid block the U-Net does not have.
    for name in ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_embedding", "down_blocks"):
        part = getattr(controlnet, name, None)
        if part is not None:
            part.load_state_dict(getattr(unet, name).state_dict())
    with quiet_libraries():  # diffusers warns on every cast
        return controlnet.to(device=unet.device, dtype=unet.dtype)


def load_controlnet(folder: str | Path, allow_pickle: bool = False):
    """The diffusers ControlNet in FOLDER (on the CPU: generation moves it to the model's device and dtype),
    safetensors only unless ``allow_pickle``; it remembers its path for the PNG (``_slimsd_path``)."""
    from diffusers import ControlNetModel

    from slimsd.models.loading import quiet_libraries  # diffusers' loading chatter: errors only

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SlimsdError(
            f"--controlnet {str(folder)!r} is not a diffusers ControlNet folder (no config.json)"
        )
    weights = {p.name for p in folder.iterdir()}
    if not allow_pickle and "diffusion_pytorch_model.safetensors" not in weights:
        raise SlimsdError(
            f"--controlnet {str(folder)!r} has no diffusion_pytorch_model.safetensors; a pickle file can run "
            "code: pass --allow-pickle to load it anyway"
        )
    with quiet_libraries():
        try:
            controlnet = ControlNetModel.from_pretrained(folder, use_safetensors=not allow_pickle)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlimsdError(f"--controlnet {str(folder)!r} could not be loaded: {first}") from None
    controlnet.eval().requires_grad_(False)
    controlnet._slimsd_path = os.fspath(folder.resolve())
    return controlnet
