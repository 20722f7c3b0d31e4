"""`slimsd export SOURCE --to single-file`: any model slimsd loads, as one .safetensors file in the original
layout (single_file.py's key maps, run backwards), with slimsd's provenance in its header; a tiny decoder (a
folder, or a TAESD-layout file) as one file in TAESD's layout (taesd_layout.py), by itself or beside a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models import decoders
from slimsd.models.loading import load
from slimsd.models.single_file import EXPORT_DTYPES, V_PRED, export_metadata, original_state
from slimsd.models.sources import resolve_model
from slimsd.models.taesd_layout import file_bytes

COMPANION = ".taesd_decoder.safetensors"  # model.safetensors -> model.taesd_decoder.safetensors


def companion_path(out: str | Path) -> Path:
    """Where ``export --vae`` writes the tiny decoder beside the model file OUT."""
    out = Path(out)
    return out.with_name(out.stem + COMPANION)


def _check_out(out: str | Path, overwrite: bool, dtype: str) -> Path:
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise SlimsdError(f"--out {str(out)!r}: a single-file export is a .safetensors file")
    if out.exists() and not overwrite:
        raise SlimsdError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if dtype not in EXPORT_DTYPES:
        raise SlimsdError(f"--dtype {dtype!r}: allowed {', '.join(EXPORT_DTYPES)}")
    return out


def export_decoder_file(source: str | Path, out: str | Path, *, dtype: str = "fp16", overwrite: bool = False):
    """The tiny decoder SOURCE (a folder or a TAESD-layout file) as one TAESD-layout .safetensors file OUT, its
    config and slimsd.json record in the header (taesd_layout.file_bytes)."""
    from slimsd.atomic import atomic_write_bytes

    out = _check_out(out, overwrite, dtype)
    return atomic_write_bytes(out, decoder_file_bytes(source, EXPORT_DTYPES[dtype]))


def decoder_file_bytes(source: str | Path, dtype: torch.dtype, vae_config: dict | None = None) -> bytes:
    """The tiny decoder SOURCE as TAESD-layout file bytes in DTYPE, its config and slimsd.json record in the
    header; checked against the latent space of VAE_CONFIG when given (a companion of a model's file)."""
    decoder = decoders.load_decoder(source)
    if vae_config is not None:
        decoders.check_fits(decoder, vae_config, str(source))
    return file_bytes(decoder, decoders.read_decoder_info(source), dtype)


def export_single_file(
    model: str,
    out: str | Path,
    *,
    dtype: str = "fp16",
    allow_pickle: bool = False,
    overwrite: bool = False,
    prediction_type: str | None = None,
    vae: str | None = None,
) -> Path:
    """MODEL (anything :func:`slimsd.models.loading.load` takes) as one .safetensors file in the original layout.
    VAE: a tiny decoder written beside it (:func:`companion_path`, TAESD's layout); the model file keeps its own
    VAE and records the companion's name and sha256 in its header (``slimsd.tiny_decoder``)."""
    from safetensors.torch import save

    from slimsd.atomic import atomic_write_bytes

    out = _check_out(out, overwrite, dtype)
    if vae is not None:
        decoders.check_decoder(vae)  # a bad decoder is one line before minutes of loading
        if companion_path(out).exists() and not overwrite:
            raise SlimsdError(f"{str(companion_path(out))!r} exists; pass --overwrite to replace it")
    torch_dtype = EXPORT_DTYPES[dtype]
    ref = resolve_model(model)
    pipe = load(  # in fp32 (the CPU has no fp16 kernels; only the written copy is cast)
        ref,
        device="cpu",
        dtype="fp32",
        optimize=False,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
    )
    state, family = original_state(pipe)
    info = ref.info
    meta = export_metadata(pipe, family, info)
    tensors = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
    if meta["slimsd.prediction_type"] == "v_prediction":
        tensors[V_PRED] = torch.zeros(0)
    if vae is not None:
        data = decoder_file_bytes(vae, torch_dtype, dict(pipe.vae.config))
        companion = atomic_write_bytes(companion_path(out), data)
        record = {"file": companion.name, "sha256": hashlib.sha256(data).hexdigest()}
        meta["slimsd.tiny_decoder"] = json.dumps(record)
    return atomic_write_bytes(out, save(tensors, metadata=meta))
