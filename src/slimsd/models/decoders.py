"""Tiny VAE decoders (issue 24): sizes as data, built as diffusers' ``AutoencoderTiny``, and what a trained one
needs to be used in place of a model's VAE.

A tiny decoder is TAESD's design (madebyollin/taesd; diffusers' ``AutoencoderTiny``): Conv/ReLU residual blocks
and nearest-neighbour upsampling, no attention, no normalisation. It decodes the *U-Net's* latents directly (the
teacher VAE's latents times its ``scaling_factor``), so its own config says ``scaling_factor: 1.0``: a diffusers
pipeline divides its latents by ``pipe.vae.config.scaling_factor`` before decoding, and 1.0 hands them over
unchanged. Keeping SD's 0.18215 there (or dividing by it before a tiny decoder) is the classic mistake of
diffusers#4676: latents 5.5x too large, clamped by the decoder's tanh, grey or dark images. The convention is
recorded in the folder's slimsd.json (``latent_scaling``) and checked when a decoder is put into a pipeline.

Only the decoder is trained (objective ``vae-decoder``); ``AutoencoderTiny`` always holds an encoder too, which
is left as diffusers builds it (the preset's sizes, seeded random weights): encode with the model's own VAE.

A decoder is a folder (a plain diffusers AutoencoderTiny, slimsd.json beside it) or one .safetensors file in
TAESD's layout (taesd_layout.py: ``slimsd export DIR --to single-file``, or a published ``taesd_decoder``);
:func:`load_decoder` makes the same AutoencoderTiny of either, and everything that takes ``--vae`` goes through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimsd.errors import SlimsdError, unknown
from slimsd.models import taesd_layout
from slimsd.models.taesd_layout import EXPECTED

# name -> AutoencoderTiny config keys (those that differ from diffusers' defaults). The number of decoder stages
# is the teacher VAE's (one 2x upsampling between stages, 8x for SD 1.x/2.x/SDXL's four); the latent channels are
# the teacher's too (tiny_decoder_config).
TINY_DECODERS: dict[str, dict] = {
    # TAESD's sizes (diffusers' defaults): 1.22 M decoder parameters against the SD VAE decoder's 49.5 M.
    "tiny-decoder": {
        "decoder_block_out_channels": [64, 64, 64, 64],
        "num_decoder_blocks": [3, 3, 3, 1],
        "encoder_block_out_channels": [64, 64, 64, 64],
        "num_encoder_blocks": [1, 3, 3, 3],
    },
    # TAESD's without its full-resolution residual block (the last stage keeps only the convolution to RGB, after
    # one 3x3 convolution on the upsampled features): 1.11 M decoder parameters, 29.7x fewer MACs than the SD VAE
    # decoder at 512 px (TAESD's: 17.5x). That block is three 64-channel convolutions over the full image: 41% of
    # TAESD's MACs and more of its time, bound by memory on a CPU (benchmarks/results/decoder_speed.json).
    "lite-decoder": {
        "decoder_block_out_channels": [64, 64, 64, 64],
        "num_decoder_blocks": [3, 3, 3, 0],
        "encoder_block_out_channels": [64, 64, 64, 64],
        "num_encoder_blocks": [1, 3, 3, 3],
    },
    # The toy world's size: the micro VAE's decoder (32-64 channels, one block per stage) shrunk the way TAESD
    # shrinks SD's: a third of its channels and no attention or normalisation.
    "micro-tiny-decoder": {
        "decoder_block_out_channels": [16, 16, 16, 16],
        "num_decoder_blocks": [2, 2, 2, 1],
        "encoder_block_out_channels": [16, 16, 16, 16],
        "num_encoder_blocks": [1, 1, 1, 1],
    },
}
INFO_FILE = "slimsd.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LATENT_SCALING = "unet-latents"  # the decoder takes the U-Net's latents: VAE latents x the teacher's scaling


def tiny_decoder_config(name: str, vae_config: dict) -> dict:
    """The AutoencoderTiny config of preset NAME for the latent space of a VAE with config VAE_CONFIG."""
    if name not in TINY_DECODERS:
        raise unknown("tiny decoder", name, TINY_DECODERS)
    stages = len(vae_config["block_out_channels"])
    config = dict(TINY_DECODERS[name])
    for key in ("decoder_block_out_channels", "num_decoder_blocks", "encoder_block_out_channels"):
        config[key] = _stretch(config[key], stages)
    config["num_encoder_blocks"] = _stretch(config["num_encoder_blocks"], stages)
    return config | {
        "latent_channels": vae_config["latent_channels"],
        "in_channels": vae_config.get("in_channels", 3),
        "out_channels": vae_config.get("out_channels", 3),
        "scaling_factor": 1.0,  # the U-Net's latents are decoded as they are (module docstring)
        "shift_factor": 0.0,
    }


def _stretch(values: list[int], stages: int) -> list[int]:
    """A per-stage list for STAGES stages: the preset's, with its last stages kept when it is shorter."""
    if len(values) >= stages:
        return list(values[len(values) - stages :])
    return [values[0]] * (stages - len(values)) + list(values)


def _seeded(build, seed: int):
    """BUILD() with torch's global generator seeded by SEED, and that generator left as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def build_tiny_decoder(name: str, vae_config: dict, seed: int = 0):
    """A fresh AutoencoderTiny of preset NAME for VAE_CONFIG's latent space (fp32, weights seeded by SEED)."""
    from diffusers import AutoencoderTiny

    config = tiny_decoder_config(name, vae_config)
    return _seeded(lambda: AutoencoderTiny(**config), seed)


def is_decoder_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "AutoencoderTiny"
    except (OSError, ValueError):
        return False


def check_decoder(path: str | Path) -> Path:
    """PATH as a tiny decoder, or one line: a folder (a plain diffusers AutoencoderTiny, safetensors; a
    `vae-decoder` run's final/) or a .safetensors file in TAESD's layout (taesd_layout; slimsd's own or a
    published one)."""
    path = Path(path)
    if path.is_file():
        _file_config(path)
        return path
    if not path.is_dir():
        raise SlimsdError(f"decoder {str(path)!r} does not exist; {EXPECTED}")
    if not is_decoder_folder(path):
        raise SlimsdError(
            f"decoder folder {str(path)!r} holds no AutoencoderTiny (config.json with _class_name "
            "AutoencoderTiny); allowed: the final/ folder of a `vae-decoder` run, a diffusers AutoencoderTiny or a "
            "TAESD-layout .safetensors file"
        )
    if not (path / WEIGHTS).is_file():
        raise SlimsdError(f"decoder folder {str(path)!r} has no {WEIGHTS}")
    return path


def _file_config(path: Path) -> tuple[dict, dict]:
    """(AutoencoderTiny config, slimsd.json record) of a TAESD-layout decoder file: the config slimsd wrote in its
    header, checked against its tensors; else, for a published TAESD decoder, the decoder's sizes read from its
    tensors and TAESD's published encoder sizes, taking the U-Net's latents (LATENT_SCALING)."""
    if path.suffix.lower() != ".safetensors":
        raise SlimsdError(f"decoder file {str(path)!r} is not a .safetensors file; {EXPECTED}")
    shapes, meta = taesd_layout.read_header(path)
    try:
        fields = taesd_layout.decoder_fields(shapes)
    except SlimsdError as e:
        raise SlimsdError(f"decoder file {str(path)!r}: {e}; {EXPECTED}") from None
    config = taesd_layout.header_json(meta, "decoder_config", path)
    if config is None:
        stages = len(fields["num_decoder_blocks"])
        vae = {"block_out_channels": [0] * stages, "latent_channels": fields["latent_channels"]}
        config = tiny_decoder_config("tiny-decoder", vae | {"out_channels": fields["out_channels"]}) | fields
    else:
        said = {k: json.loads(json.dumps(config.get(k))) for k in fields}
        if said != fields:
            raise SlimsdError(
                f"decoder file {str(path)!r}: its header's config says {said}, its tensors {fields}; {EXPECTED}"
            )
    # block_out_channels: what AutoencoderTiny registers of its own accord, not an argument (diffusers warns)
    config = {k: v for k, v in config.items() if k != "block_out_channels" and not k.startswith("_")}
    return config, taesd_layout.header_json(meta, "info", path) or {}


def decoder_config(path: str | Path) -> dict:
    """The AutoencoderTiny config of the tiny decoder at PATH (check_decoder), as ``from_config`` takes it."""
    path = check_decoder(path)
    if path.is_file():
        return _file_config(path)[0]
    from diffusers import AutoencoderTiny

    return dict(AutoencoderTiny.load_config(str(path)))


def read_decoder_info(path: str | Path) -> dict:
    """What slimsd recorded of the tiny decoder at PATH: its folder's slimsd.json, or the record a file's header
    carries of it ({}: none)."""
    path = Path(path)
    if path.is_file():
        return _file_config(path)[1]
    try:
        return json.loads((path / INFO_FILE).read_text()) if (path / INFO_FILE).is_file() else {}
    except (OSError, ValueError):
        return {}


def load_decoder(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """The tiny decoder at PATH (check_decoder: a folder or a TAESD-layout file), in DTYPE on DEVICE, for
    inference. A file becomes the AutoencoderTiny its folder would: its config, its decoder's weights, the
    encoder seeded as ``build_tiny_decoder`` seeds it (the file has none)."""
    from diffusers import AutoencoderTiny

    from slimsd.models.sources import quiet_libraries, quiet_loading

    path = check_decoder(path)
    if path.is_dir():
        # quiet: diffusers' note on the block_out_channels every saved AutoencoderTiny config holds
        with quiet_loading(), quiet_libraries():
            decoder = AutoencoderTiny.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
    else:
        from safetensors.torch import load_file

        config = _file_config(path)[0]
        decoder = _seeded(lambda: AutoencoderTiny.from_config(config), 0)
        layers = decoder.decoder.layers
        try:
            state = taesd_layout.from_original(load_file(str(path)), decoder)
        except SlimsdError as e:
            raise SlimsdError(f"decoder file {str(path)!r}: {e}; {EXPECTED}") from None
        want = {k: tuple(v.shape) for k, v in layers.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != want:
            first = next(k for k in sorted(want.keys() | got.keys()) if want.get(k) != got.get(k))
            raise SlimsdError(
                f"decoder file {str(path)!r}: decoder.layers.{first} is {got.get(first, 'missing')}, its "
                f"config makes it {want.get(first, 'absent')}; {EXPECTED}"
            )
        layers.load_state_dict(state, strict=True)
        with quiet_libraries():  # diffusers' note on casting a model with to(): nothing here stays fp32
            decoder = decoder.to(dtype)
    return decoder.to(device).eval().requires_grad_(False)


def weights_file(path: str | Path) -> Path:
    """The file holding the weights of the tiny decoder at PATH: a folder's WEIGHTS, or the file itself."""
    path = check_decoder(path)
    return path / WEIGHTS if path.is_dir() else path


def decoder_record(path: str | Path) -> dict:
    """What a PNG records of the decoder at PATH: its resolved path and its weights' sha256."""
    from slimsd.files import file_sha256

    return {"path": str(Path(path).resolve()), "sha256": file_sha256(weights_file(path))}


def check_fits(decoder, vae_config: dict, where: str) -> None:
    """Refuse a decoder for another latent space than the VAE's (channels, upsampling), or one whose config would
    make a pipeline divide the latents by a scaling factor before it (diffusers#4676)."""
    c = decoder.config
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    own = 2 ** (len(c.block_out_channels) - 1)
    if c.latent_channels != vae_config["latent_channels"] or own != factor:
        raise SlimsdError(
            f"decoder {where!r} decodes {c.latent_channels}-channel latents {own}x up; the model's VAE "
            f"{vae_config['latent_channels']}-channel latents {factor}x up"
        )
    if c.scaling_factor != 1.0:
        raise SlimsdError(
            f"decoder {where!r} has scaling_factor {c.scaling_factor:g}; a tiny decoder takes the U-Net's "
            "latents unscaled (scaling_factor 1.0; diffusers#4676)"
        )


def swap_decoder(pipe, path: str | Path) -> dict:
    """Put the tiny decoder at PATH (a folder or a TAESD-layout file) into PIPE as its VAE (in the pipeline's
    device and dtype). Returns what a PNG records of it: {"path", "sha256"}."""
    vae = pipe.vae
    decoder = load_decoder(path, dtype=vae.dtype, device=vae.device)
    check_fits(decoder, dict(vae.config), str(path))
    pipe.vae = decoder
    return decoder_record(path)


# --- counting (counting.decoder_counts) ----------------------------------------------------------------------


def meta_decoders(vae_config: dict, tiny: str = "tiny-decoder") -> tuple:
    """(the full AutoencoderKL, the tiny decoder) of a VAE config, on the meta device."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    with torch.device("meta"):
        return AutoencoderKL.from_config(vae_config), AutoencoderTiny(**tiny_decoder_config(tiny, vae_config))
