"""The latent cache (``slimsd cache``): VAE posteriors and text embeddings computed once, read by the trainer
as a data source (``slimsd.train.data``), so that training skips the VAE encoder and the text encoder(s)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models.loading import is_sdxl
from slimsd.train.data import CACHE_FORMAT, Examples, collate, nothing_readable, open_source
from slimsd.train.encoders import encode_images, encode_text, time_ids


def write_cache(
    model: str,
    data: str,
    out: str | Path,
    resolution: int,
    batch_size: int = 8,
    flip: bool = False,
    center_crop: bool = True,
    seed: int = 0,
    shard_size: int = 1024,
    overwrite: bool = False,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    data_filter: list[str] | None = None,
) -> dict:
    """Precompute VAE posteriors and text embeddings of ``data`` with ``model``'s VAE and text encoder(s).

    A folder of safetensors shards plus ``cache.json``; training on it skips the VAE encoder and the text
    encoder(s). With ``flip`` the flipped image's posterior is stored too, so ``random_flip`` stays exact.
    ``data_filter``: only the rows its rules keep (a cache holds no metadata to filter later); cache.json records
    the rules and each one's count.
    """
    from safetensors.torch import save_file

    from slimsd.atomic import atomic_dir, check_output_dir
    from slimsd.models.loading import load

    check_output_dir(out, overwrite, marker="cache.json", command="cache")
    source = open_source(data, seed, data_filter)
    if source.kind == "cache":
        raise SlimsdError(f"data {data!r} is already a latent cache")
    if not len(source):  # every row was dropped at indexing: known before the model loads
        raise nothing_readable(data, source.skipped)
    # fp32 and no runtime: the latents must be what the trainer's own encoding of the same images gives.
    pipe = load(
        model,
        device="cpu",
        dtype="fp32",
        optimize=False,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
    )
    sdxl = is_sdxl(pipe)
    examples = Examples(source, resolution, center_crop=center_crop, seed=seed, replace=False)
    skipped = Counter(source.skipped)
    shards, pending = [], []
    with atomic_dir(out, overwrite) as tmp:

        def flush():
            if not pending:
                return
            name = f"shard-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
            save_file(tensors, str(tmp / name))
            shards.append([name, int(next(iter(tensors.values())).shape[0])])
            pending.clear()

        n_pending = 0
        for lo in range(0, len(examples), batch_size):
            batch = collate([examples[(i, 0)] for i in range(lo, min(lo + batch_size, len(examples)))])
            skipped.update(batch["skipped"])
            if not batch["size"]:
                continue
            mean, std = encode_images(pipe.vae, batch["pixels"])
            part = {"latent_mean": mean.float().cpu(), "latent_std": std.float().cpu()}
            if flip:
                fmean, fstd = encode_images(pipe.vae, batch["pixels"].flip(-1))
                part |= {"latent_mean_flip": fmean.float().cpu(), "latent_std_flip": fstd.float().cpu()}
            part |= {k: v.float().cpu() for k, v in encode_text(pipe, batch["caption"]).items()}
            if sdxl:
                part["time_ids"] = time_ids(batch["original_size"], batch["crop_top_left"], resolution)
            pending.append(part)
            n_pending += batch["size"]
            if n_pending >= shard_size:
                flush()
                n_pending = 0
        flush()
        if not shards:  # raised inside atomic_dir: no empty cache is left behind
            raise nothing_readable(data, skipped)
        info = {
            "format": CACHE_FORMAT,
            "model": model,
            "data": str(data),
            "resolution": resolution,
            "family": "sdxl" if sdxl else "sd",
            "flip": flip,
            "center_crop": center_crop,
            "count": sum(n for _, n in shards),
            "shards": shards,
            "skipped": dict(skipped),
            "data_filter": [f["rule"] for f in source.filtered] or None,
            "filter": source.filtered,
        }
        (tmp / "cache.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
