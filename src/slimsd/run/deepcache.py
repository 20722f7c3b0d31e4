"""Training-free caching of a U-Net's deep features between denoising steps (DeepCache).

Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for Free" (CVPR 2024, arXiv:2312.00858): the
high-level features of a U-Net change slowly from one denoising step to the next, so they can be computed
once and reused for the following steps. With interval N, call k of the U-Net is *full* when k % N == 0: the
whole U-Net runs, and the hidden states entering its last (shallowest) up block, i.e. the output of
``up_blocks[-2]``, are kept. The N-1 calls after it are *cached*: only the shallow branch runs (time and added
embeddings, ``conv_in``, the resnets and attentions of ``down_blocks[0]``, then ``up_blocks[-1]`` on the kept
features and the fresh skip connections, then the output norm and conv). The paper reports 2.3x on SD 1.5 for
a 0.05 drop in CLIP score; the image is an approximation of the full one, not the same.

How: a cached call is diffusers' own ``UNet2DConditionModel.forward`` run on the U-Net with, for the duration of
that call, only its shallow blocks (``down_blocks = [down_blocks[0]]`` without its downsampler, no mid block,
``up_blocks = [up_blocks[-1]]``) and a forward pre-hook that hands ``up_blocks[-1]`` the kept features. So the
embeddings (SDXL's added conditions included), the skip bookkeeping and the output layers are diffusers' code,
not a copy of it, and a cached call on the inputs of the full call returns exactly the full call's output
(``tests/run/test_deepcache.py``). The deep blocks' modules (and their hooks) are not called at all.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from slimsd.errors import SlimsdError

INTERVAL_RANGE = (1, 50)  # 1: off (every call full)
# ControlNet / T2I-Adapter residuals add to skip connections and deep features this cache does not recompute.
_RESIDUAL_KWARGS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def check_interval(interval) -> None:
    """Refuse an interval outside 1..50 (or not a whole number) with one line."""
    lo, hi = INTERVAL_RANGE
    if isinstance(interval, bool) or not isinstance(interval, int) or not lo <= interval <= hi:
        raise SlimsdError(
            f"deep-cache {interval!r} is out of range; allowed: {lo} to {hi} (a full U-Net pass every N steps; "
            "1: off)"
        )


def check_unet(unet) -> None:
    """Refuse, with one line, a U-Net the shallow branch cannot serve."""
    if hasattr(unet, "_orig_mod"):
        raise SlimsdError("deep-cache does not work with a torch.compile'd U-Net; use one or the other")
    if not all(hasattr(unet, name) for name in ("conv_in", "down_blocks", "up_blocks", "mid_block")):
        raise SlimsdError(f"deep-cache needs a diffusers UNet2DConditionModel, not a {type(unet).__name__}")
    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        raise SlimsdError("deep-cache needs a U-Net with at least 2 stages: this one has no deep features")
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    skips = 1 + len(first.resnets)  # conv_in's output, then one per resnet of the first down block
    if len(last.resnets) != skips:
        raise SlimsdError(
            f"deep-cache needs the last up block to take exactly the skips of conv_in and the first down block "
            f"({skips}); this U-Net's takes {len(last.resnets)}"
        )


@dataclass
class DeepCacheStats:
    """What a :func:`deep_cache` context did: U-Net calls that ran whole, and calls that ran the shallow
    branch only."""

    interval: int
    full: int = 0
    cached: int = 0


@contextlib.contextmanager
def deep_cache(unet, interval: int) -> Iterator[DeepCacheStats | None]:
    """Within the context, call k of ``unet`` (counted from 0 at entry: enter once per generation) runs the
    whole U-Net when k % interval == 0, and only its shallow branch on the deep features of the last full call
    otherwise. ``interval`` 1 changes nothing (and yields None). Yields the call counts."""
    check_interval(interval)
    if interval == 1:
        yield None
        return
    check_unet(unet)
    if getattr(unet, "_slimsd_deep_cache", False):
        raise SlimsdError("deep-cache is already active on this U-Net")
    stats = DeepCacheStats(interval)
    kept = {}  # "features": the hidden states that entered up_blocks[-1] in the last full call
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    shallow = {
        "down_blocks": nn.ModuleList([first]),
        "mid_block": None,
        "up_blocks": nn.ModuleList([last]),
    }

    def feed_last_up_block(_module, args, kwargs):
        if "hidden_states" not in kwargs:  # diffusers passes it by name; anything else is not served
            raise SlimsdError("deep-cache: the U-Net called its last up block in an unexpected way")
        if kept.get("serving"):
            return args, {**kwargs, "hidden_states": kept["features"]}
        kept["features"] = kwargs["hidden_states"]
        return None

    had_own_forward = "forward" in unet.__dict__  # e.g. accelerate's hooks wrap forward per instance
    forward = unet.forward

    @functools.wraps(forward)
    def cached_forward(*args, **kwargs):
        if any(kwargs.get(name) is not None for name in _RESIDUAL_KWARGS):
            raise SlimsdError("deep-cache does not work with ControlNet or adapter residuals")
        k = stats.full + stats.cached
        if k % interval == 0:
            stats.full += 1
            return forward(*args, **kwargs)
        sample = args[0] if args else kwargs["sample"]
        features = kept.get("features")
        if features is None or features.shape[0] != sample.shape[0] or features.shape[2:] != sample.shape[2:]:
            raise SlimsdError(
                "deep-cache: the kept features do not fit this call's latents (enter deep_cache() once per "
                "generation)"
            )
        stats.cached += 1
        saved = {name: getattr(unet, name) for name in shallow}
        downsamplers = first.downsamplers
        kept["serving"] = True
        try:
            for name, module in shallow.items():
                setattr(unet, name, module)
            first.downsamplers = None  # its output feeds only the deep path
            return forward(*args, **kwargs)
        finally:
            kept["serving"] = False
            first.downsamplers = downsamplers
            for name, module in saved.items():
                setattr(unet, name, module)

    handle = last.register_forward_pre_hook(feed_last_up_block, with_kwargs=True)
    unet.forward = cached_forward
    unet._slimsd_deep_cache = True
    try:
        yield stats
    finally:
        handle.remove()
        del unet._slimsd_deep_cache
        if had_own_forward:
            unet.forward = forward
        else:
            del unet.forward
