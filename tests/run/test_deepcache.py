"""slimsd.run.deepcache (DeepCache, arXiv:2312.00858): the cached path is the real U-Net's shallow branch, the deep
blocks run once every N calls, generate() and the PNG carry the setting, and what cannot be served is refused."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.models.counting import unet_dummy_inputs
from slimsd.models.loading import load
from slimsd.run import generate as g
from slimsd.run.deepcache import check_unet, deep_cache


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.float64)


def unet_inputs(unet, height: int, width: int, batch: int = 2, seed: int = 0) -> dict:
    """Random latents and text states (batch 2: a classifier-free-guidance batch), SDXL's added conditions."""
    inputs = unet_dummy_inputs(unet, 64, batch=batch, device="cpu", dtype=unet.dtype)
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, unet.config.in_channels, height // 8, width // 8)
    inputs["sample"] = torch.randn(shape, generator=gen).to(unet.dtype)
    inputs["encoder_hidden_states"] = torch.randn(inputs["encoder_hidden_states"].shape, generator=gen).to(
        unet.dtype
    )
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"]["text_embeds"] = torch.randn(
            inputs["added_cond_kwargs"]["text_embeds"].shape, generator=gen
        ).to(unet.dtype)
    return inputs


@contextlib.contextmanager
def count_calls(modules: dict) -> Iterator[dict]:
    """{name: number of forward calls}, counted by forward hooks on ``modules`` (name -> module) within."""
    counts = dict.fromkeys(modules, 0)
    handles = [
        module.register_forward_hook(lambda *_a, _n=name: counts.__setitem__(_n, counts[_n] + 1))
        for name, module in modules.items()
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def deep_and_shallow(unet) -> dict:
    deep = {"down_blocks.1": unet.down_blocks[1], "up_blocks.0": unet.up_blocks[0]}
    if unet.mid_block is not None:
        deep["mid_block"] = unet.mid_block
    shallow = {
        "conv_in": unet.conv_in,
        "down_blocks.0": unet.down_blocks[0],
        "up_blocks.-1": unet.up_blocks[-1],
    }
    return {**deep, **shallow}, list(deep), list(shallow)


def _unet(name: str, micro_sd, micro_sdxl):
    if name == "micro-sd teacher":
        return micro_sd.unet
    if name.startswith("micro-sd teacher, slimsd runtime"):  # fused QKV, channels_last, in each CPU dtype
        return load("micro-sd", dtype=name.rsplit(" ", 1)[1]).unet
    if name == "bk-tiny student (no mid block)":
        from slimsd.models.compress import compress_pipeline

        unet = compress_pipeline(micro_sd, "bk-tiny").pipeline.unet
        assert unet.mid_block is None and len(unet.up_blocks) == 3
        return unet
    return micro_sdxl.unet  # SDXL: added_cond_kwargs, attention-free outer stages


@pytest.mark.parametrize(
    "name",
    [
        "micro-sd teacher",
        "micro-sd teacher, slimsd runtime fp32",
        "micro-sd teacher, slimsd runtime bf16",
        "bk-tiny student (no mid block)",
        "micro-sdxl",
    ],
)
@pytest.mark.parametrize(("height", "width"), [(64, 64), (72, 80)])  # 9x10 latents: upsample sizes forwarded
def test_the_cached_call_is_the_full_unet_on_the_same_inputs(name, height, width, micro_sd, micro_sdxl):
    """The decisive test: with the deep features of a full call on the same inputs, the shallow branch must
    return exactly what plain diffusers' whole forward returns, without running the deep blocks."""
    unet = _unet(name, micro_sd, micro_sdxl)
    inputs = unet_inputs(unet, height, width)
    blocks = [id(b) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)]
    modules, deep, shallow = deep_and_shallow(unet)
    with torch.no_grad(), count_calls(modules) as counts:
        expected = unet(**inputs).sample  # plain diffusers, before any caching
        counts.update(dict.fromkeys(counts, 0))
        with deep_cache(unet, 3) as stats:
            full = unet(**inputs).sample
            cached = unet(**inputs, return_dict=False)[0]
            cached_again = unet(
                inputs["sample"],
                inputs["timestep"],
                **{k: v for k, v in inputs.items() if k not in ("sample", "timestep")},
            ).sample  # positional sample, as the pipelines call it
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_again, expected, rtol=0, atol=1e-6)
    assert (stats.full, stats.cached) == (1, 2)
    assert {n: counts[n] for n in deep} == dict.fromkeys(deep, 1)  # the deep blocks: the full call only
    assert {n: counts[n] for n in shallow} == dict.fromkeys(shallow, 3)
    # Afterwards the U-Net is itself again: its own forward, every block back.
    assert "forward" not in unet.__dict__ and not hasattr(unet, "_slimsd_deep_cache")
    assert [id(b) for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks)] == blocks
    assert unet.down_blocks[0].downsamplers is not None
    with torch.no_grad():
        torch.testing.assert_close(unet(**inputs).sample, expected, rtol=0, atol=1e-6)


def test_the_cached_call_uses_the_kept_features_not_fresh_ones(micro_sd):
    """On other latents, a cached call differs from the full U-Net (it reuses the deep features of the full
    call) but equals the full U-Net whose last up block is handed those features."""
    unet = micro_sd.unet
    first, second = unet_inputs(unet, 64, 64, seed=0), unet_inputs(unet, 64, 64, seed=1)
    kept = {}

    def keep(_m, args, kwargs):
        kept["h"] = kwargs["hidden_states"]

    handle = unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        unet(**first)  # plain diffusers: the features entering the last up block
        handle.remove()
        fresh = unet(**second).sample

        def hand_over(_m, args, kwargs):
            return args, {**kwargs, "hidden_states": kept["h"]}

        handle = unet.up_blocks[-1].register_forward_pre_hook(hand_over, with_kwargs=True)
        reference = unet(**second).sample  # the whole U-Net, its last up block fed the first call's features
        handle.remove()
        with deep_cache(unet, 2):
            unet(**first)
            cached = unet(**second).sample
    torch.testing.assert_close(cached, reference, rtol=0, atol=1e-6)
    assert (cached - fresh).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["micro-sd", "micro-sdxl"])
def test_deep_blocks_run_once_every_n_steps_per_batch(model):
    pipe = load(model)
    modules, deep, shallow = deep_and_shallow(pipe.unet)
    # euler: one U-Net call per step; guidance > 1: each call is a CFG batch of 2 per image
    kwargs = {"steps": 7, "guidance": 7.5, "seed": 3, "scheduler": "euler", "num_images": 4}
    with count_calls(modules) as counts:
        g.generate(pipe, "a red circle", batch_size=2, deep_cache=3, **kwargs)  # two batches of 2 images
    batches = 2
    assert {n: counts[n] for n in deep} == dict.fromkeys(deep, batches * math.ceil(7 / 3))
    assert {n: counts[n] for n in shallow} == dict.fromkeys(shallow, batches * 7)


@pytest.fixture(scope="module")
def toy_sd():
    return load("toy-sd")


def test_interval_one_is_the_same_image_as_without_the_option(micro_sd):
    plain = g.generate(micro_sd, "a red circle", steps=4, seed=5)[0]
    one = g.generate(micro_sd, "a red circle", steps=4, seed=5, deep_cache=1)[0]
    assert np.array_equal(pixels(plain), pixels(one))
    assert one.settings.deep_cache == 1 and "Deep cache" not in one.settings.a1111_parameters()


def test_a_cached_image_is_close_to_the_full_one_on_toy_sd(toy_sd):
    """The trained toy model at its own scheduler (PNDM), 25 steps, guidance 2: N=3 changes the image by a
    small fraction of what another seed changes. Measured on this machine (mean absolute difference in 0-255
    pixel values, seeds 0-3): N=2 0.24-0.39, N=3 0.33-0.53, N=5 0.71-1.19; another seed: 9.55 on average."""
    settings = {"steps": 25, "guidance": 2.0}
    full = [pixels(g.generate(toy_sd, "a red circle", seed=seed, **settings)[0]) for seed in (0, 1)]
    other_seed = np.abs(full[1] - full[0]).mean()
    for seed in (0, 1):
        cached = g.generate(toy_sd, "a red circle", seed=seed, deep_cache=3, **settings)[0]
        diff = np.abs(pixels(cached) - full[seed]).mean()
        assert 0 < diff < 1.5  # an approximation: not the same image, but close
        assert diff < other_seed / 5
        assert cached.settings.deep_cache == 3


def test_what_cannot_be_served_is_refused_in_one_line(micro_sd):
    from diffusers import UNet2DConditionModel

    one_stage = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8,),
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
        layers_per_block=1,
        cross_attention_dim=8,
        norm_num_groups=4,
    )
    for unet, match in [
        (one_stage, "at least 2 stages"),
        (torch.compile(micro_sd.unet), "torch.compile"),
        (torch.nn.Linear(2, 2), "UNet2DConditionModel"),
    ]:
        with pytest.raises(SlimsdError, match=match) as e, deep_cache(unet, 2):
            pass
        assert "\n" not in str(e.value)
    unet = micro_sd.unet
    inputs = unet_inputs(unet, 64, 64)
    with torch.no_grad(), deep_cache(unet, 2):
        with pytest.raises(SlimsdError, match="already active"), deep_cache(unet, 2):
            pass
        residuals = {"mid_block_additional_residual": torch.zeros(1), "down_block_additional_residuals": ()}
        with pytest.raises(SlimsdError, match="ControlNet"):
            unet(**inputs, **residuals)
        unet(**inputs)
        with pytest.raises(SlimsdError, match="do not fit"):  # a cached call on another batch size
            unet(**unet_inputs(unet, 64, 64, batch=4))
    assert "forward" not in unet.__dict__ and len(unet.down_blocks) == 4 and unet.mid_block is not None


@pytest.mark.parametrize("bad", [0, 51, -1, 2.5, True, "3"])
def test_bad_intervals_are_refused(bad, micro_sd):
    with pytest.raises(SlimsdError, match=f"deep-cache {bad!r} is out of range; allowed: 1 to 50"):
        g.generate(micro_sd, "a red circle", steps=1, deep_cache=bad)


def test_check_unet_accepts_every_kind_slimsd_loads(micro_sd, micro_sdxl):
    from slimsd.models.compress import compress_pipeline

    for recipe in ("bk-base", "bk-small", "bk-tiny"):
        check_unet(compress_pipeline(micro_sd, recipe).pipeline.unet)
    for recipe in ("ssd-1b", "vega"):
        check_unet(compress_pipeline(micro_sdxl, recipe).pipeline.unet)
