"""A tiny decoder (diffusers' ``AutoencoderTiny``) as one ``.safetensors`` file in TAESD's original layout: the
key names of madebyollin/taesd's ``taesd_decoder.safetensors`` (ComfyUI's ``models/vae_approx``; the same state
dict as the ``taesd_decoder.pth`` A1111, Forge and SD.Next load).

TAESD's ``Decoder`` is one ``nn.Sequential``: ``Clamp`` (tanh(x/3)*3), a 3x3 conv from the latents, ReLU, then per
stage its ``Block``\\ s (``conv``: conv/ReLU/conv/ReLU/conv, ``skip``, ``fuse``) and, between stages,
``Upsample`` and a bias-free 3x3 conv; a last 3x3 conv to RGB. diffusers' ``DecoderTiny.layers`` is the same
sequence without the clamp (its ``forward`` applies it), so the mapping is read off the two sequences
(:func:`index_map`), for any number of stages and blocks, a stage of none included (``lite-decoder``). The
networks are the same; the output ranges differ (TAESD's [0, 1], diffusers' [-1, 1]: ``x * 2 - 1``).

A file slimsd writes carries in its header (``slimsd.*``) the AutoencoderTiny config and the folder's
slimsd.json record, so reading it back gives the folder's decoder; a file without them (a published TAESD
decoder) is read from its tensor names and shapes. The file holds the decoder only (TAESD keeps its encoder in
its own file): the encoder is rebuilt with seeded random weights, as a ``vae-decoder`` run leaves it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimsd.errors import SlimsdError

CLAMP, CONV, RELU, BLOCK, UPSAMPLE = "clamp", "conv", "relu", "block", "upsample"
KIND = "tiny-decoder"  # slimsd.kind in the header
EXPECTED = (
    "expected a tiny decoder in TAESD's layout (taesd_decoder.safetensors: 1.weight, 3.conv.0.weight, ...) or a "
    "`vae-decoder` run's final/ folder"
)
# diffusers module class -> the kind of layer in TAESD's sequence
_KINDS = {"Conv2d": CONV, "ReLU": RELU, "AutoencoderTinyBlock": BLOCK, "Upsample": UPSAMPLE}
# what the layout fixes of an AutoencoderTiny decoder (TAESD: ReLU, nearest-neighbour 2x upsampling)
_FIXED = {"act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2}


def original_layers(num_blocks: list[int]) -> list[str]:
    """The kinds of TAESD's ``Decoder`` sequence, in order, for stages of NUM_BLOCKS blocks each."""
    kinds = [CLAMP, CONV, RELU]
    for i, n in enumerate(num_blocks):
        kinds += [BLOCK] * n
        if i < len(num_blocks) - 1:
            kinds += [UPSAMPLE, CONV]
    return [*kinds, CONV]


def index_map(decoder) -> dict[int, int]:
    """diffusers' ``decoder.layers`` index -> TAESD's sequence index, for the AutoencoderTiny DECODER: its layers
    aligned with :func:`original_layers` of its config, the parameterless layers TAESD has first (the clamp) as
    the shift. Refuses a decoder the layout cannot hold (another activation, upsampling or sequence)."""
    c = decoder.config
    odd = {k: c.get(k) for k, v in _FIXED.items() if c.get(k) != v}
    theirs = [_KINDS.get(type(m).__name__, type(m).__name__) for m in decoder.decoder.layers]
    ours = original_layers(list(c.num_decoder_blocks))
    shift = len(ours) - len(theirs)
    if odd or shift < 0 or ours[shift:] != theirs or set(ours[:shift]) - {CLAMP}:
        raise SlimsdError(
            f"this tiny decoder does not fit TAESD's layout ({odd or 'its layers are ' + ', '.join(theirs)}); "
            f"the layout holds ReLU, nearest 2x upsampling and {', '.join(ours[1:])}"
        )
    return {j: j + shift for j in range(len(theirs))}


def to_original(decoder) -> dict[str, torch.Tensor]:
    """The decoder's tensors of the AutoencoderTiny DECODER under TAESD's names (its encoder left out)."""
    where = index_map(decoder)
    out = {}
    for key, value in decoder.decoder.layers.state_dict().items():
        j, _, rest = key.partition(".")
        out[f"{where[int(j)]}.{rest}"] = value
    return out


def from_original(state: dict, decoder) -> dict[str, torch.Tensor]:
    """STATE (TAESD's names) as the state dict of DECODER's ``decoder.layers`` (an AutoencoderTiny built from
    :func:`decoder_fields`)."""
    back = {t: d for d, t in index_map(decoder).items()}
    out = {}
    for key, value in state.items():
        t, _, rest = key.partition(".")
        if not t.isdigit() or int(t) not in back:
            raise SlimsdError(f"tensor {key!r} has no place in the decoder")
        out[f"{back[int(t)]}.{rest}"] = value
    return out


def decoder_fields(shapes: dict[str, tuple]) -> dict:
    """The AutoencoderTiny decoder config a TAESD-layout decoder's tensor SHAPES (name -> shape) imply:
    stages and blocks from which sequence index holds what, channels from the convolutions' shapes."""
    groups: dict[int, set[str]] = {}
    for key in shapes:
        head, _, rest = key.partition(".")
        if not head.isdigit() or not rest:
            raise SlimsdError(f"tensor {key!r} is not in TAESD's layout (index.name)")
        groups.setdefault(int(head), set()).add(rest)
    if not groups:
        raise SlimsdError("it holds no tensors")
    top = max(groups)
    found = [_group_kind(groups.get(i, set())) for i in range(top + 1)]
    num_blocks, n = [], 0
    for kind in found[3:-1]:  # after clamp, conv, ReLU; before the conv to RGB
        if kind == BLOCK:
            n += 1
        elif kind == CONV:
            num_blocks, n = [*num_blocks, n], 0
    num_blocks.append(n)
    want = [k if k in (CONV, BLOCK) else None for k in original_layers(num_blocks)]
    if found != want:
        raise SlimsdError(
            "its tensors are not TAESD's decoder sequence (at each index: "
            + ", ".join(k or "-" for k in found)
            + ")"
        )
    # each stage's last conv (the one after its upsampling, or the one to RGB) takes the stage's channels
    closing = [i for i, k in enumerate(original_layers(num_blocks)) if k == CONV][1:]
    return {
        "latent_channels": shapes["1.weight"][1],
        "out_channels": shapes[f"{top}.weight"][0],
        "num_decoder_blocks": num_blocks,
        "decoder_block_out_channels": [shapes[f"{i}.weight"][1] for i in closing],
    }


def _group_kind(names: set[str]) -> str | None:
    """What one sequence index holds: nothing (clamp, ReLU, upsampling), a conv, a Block, or something else."""
    if not names:
        return None
    if names <= {"weight", "bias"} and "weight" in names:
        return CONV
    if "conv.0.weight" in names and all(n.startswith(("conv.", "skip.")) for n in names):
        return BLOCK
    return "?"


# --- the file ---------------------------------------------------------------------------------------------------


def file_bytes(decoder, info: dict, dtype: torch.dtype) -> bytes:
    """The AutoencoderTiny DECODER as a TAESD-layout .safetensors file (tensors in DTYPE), with its config and
    INFO (its folder's slimsd.json) in the header."""
    from safetensors.torch import save

    from slimsd.version import __version__

    config = {k: v for k, v in dict(decoder.config).items() if not k.startswith("_")}
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in to_original(decoder).items()}
    meta = {
        "slimsd.version": __version__,
        "slimsd.kind": KIND,
        "slimsd.decoder_config": json.dumps(config),
        "slimsd.info": json.dumps(info),
    }
    return save(tensors, metadata=meta)


def read_header(path: str | Path) -> tuple[dict[str, tuple], dict]:
    """(tensor name -> shape, header metadata) of a TAESD-layout file, without reading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # safe_open is not a dict: no iteration over f
            return {k: tuple(f.get_slice(k).get_shape()) for k in names}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SlimsdError(
            f"decoder file {str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0]}); {EXPECTED}"
        ) from None


def header_json(meta: dict, name: str, path: str | Path) -> dict | None:
    """The JSON object slimsd stored under ``slimsd.NAME`` in a header (None: not there), or one line."""
    raw = meta.get(f"slimsd.{name}")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise SlimsdError(f"decoder file {str(path)!r}: its header's slimsd.{name} is not a JSON object")
    return value
