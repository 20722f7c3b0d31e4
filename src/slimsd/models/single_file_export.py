"""`slimsd export MODEL --to single-file`: any model slimsd loads, as one .safetensors file in the original
layout (single_file.py's key maps, run backwards), with slimsd's provenance in its header."""

from __future__ import annotations

from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models.loading import load
from slimsd.models.single_file import EXPORT_DTYPES, V_PRED, export_metadata, original_state
from slimsd.models.sources import resolve_model


def export_single_file(
    model: str,
    out: str | Path,
    *,
    dtype: str = "fp16",
    allow_pickle: bool = False,
    overwrite: bool = False,
    prediction_type: str | None = None,
) -> Path:
    """MODEL (anything :func:`slimsd.models.loading.load` takes) as one .safetensors file in the original layout."""
    from safetensors.torch import save

    from slimsd.atomic import atomic_write_bytes

    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise SlimsdError(f"--out {str(out)!r}: a single-file export is a .safetensors file")
    if out.exists() and not overwrite:
        raise SlimsdError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
    if dtype not in EXPORT_DTYPES:
        raise SlimsdError(f"--dtype {dtype!r}: allowed {', '.join(EXPORT_DTYPES)}")
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
    return atomic_write_bytes(out, save(tensors, metadata=meta))
