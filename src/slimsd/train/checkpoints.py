"""Checkpoints of a distillation run: everything an exact resume needs, each written whole or not at all.

``OUTPUT/checkpoints/step-NNNNNNNN/`` holds the whole student (safetensors), its averaged copies (the EMA
weights, ``ema.safetensors``; LCM's target network, ``target.safetensors``), the whole optimizer state (keyed by
parameter name), the LR schedule, the generator and torch RNG states (``trainer.pt``, read with
``weights_only=True``: no code runs on load) and ``state.json`` (step, data position, skipped rows, losses, the
config that wrote it, its history of config changes, a description of the student's architecture, and the
engine). The same layout under every engine (sharding.py gathers and scatters the shards); a DeepSpeed run adds
``engine/``, DeepSpeed's own checkpoint of its fp32 master weights and optimizer partitions.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.train import sharding as S
from slimsd.train.settings import DistillConfig


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_state(path: Path) -> dict:
    """A checkpoint's ``state.json`` (cheap: no tensors are read)."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise SlimsdError(f"checkpoint {str(path)!r}: state.json cannot be read ({e})") from None


def resolve_resume(cfg: DistillConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        found = list_checkpoints(Path(cfg.output_dir))
        return found[-1] if found else None  # "latest" with nothing saved yet starts from scratch
    path = Path(cfg.resume)
    if not (path / "state.json").is_file():
        raise SlimsdError(
            f"resume {cfg.resume!r}: not a checkpoint folder (no state.json); use 'latest' or a "
            f"folder under {cfg.output_dir}/checkpoints"
        )
    return path


def save_checkpoint(
    accelerator,
    engine: str,
    output_dir: Path,
    step: int,
    student,
    optimizer,
    lr_scheduler,
    averages: dict[str, dict | None],
    gen,
    state: dict,
    keep_last: int,
) -> Path:
    """Everything an exact resume needs, in one folder renamed into place (never half-written). Called on every
    process: the whole weights and optimizer state are gathered from the engine (sharding.py), the main process
    writes them. DeepSpeed's engine checkpoint is written by all processes into a staging folder that the main
    process moves inside before the rename."""
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    from slimsd.atomic import atomic_dir, remove_dir

    weights = S.full_weights(accelerator, engine, student)
    optimizer_state = S.full_optimizer(engine, student, optimizer)
    path = output_dir / "checkpoints" / f"step-{step:08d}"
    staging = None
    if engine == "deepspeed":  # a leftover-pattern name: a killed run's staging folder is cleaned on restart
        name = [None]
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            name = [tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)]
        broadcast_object_list(name)
        staging = Path(name[0])
        S.save_engine(student, staging)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_dir(path, overwrite=True) as tmp:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in weights.items()},
                str(tmp / "student.safetensors"),
            )
            for name, average in averages.items():
                if average is not None:
                    save_file(
                        {k: v.contiguous().cpu() for k, v in average.items()},
                        str(tmp / f"{name}.safetensors"),
                    )
            torch.save(
                {
                    "optimizer": optimizer_state,
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                },
                tmp / "trainer.pt",
            )
            if staging is not None:
                os.replace(staging, tmp / "engine")
            (tmp / "state.json").write_text(json.dumps(state | {"engine": engine}) + "\n")
        # only now, with the new checkpoint on the disk (atomic_dir fsynced its files, folders and the rename),
        # may older ones go: after a crash the newest is whole or the older ones are still there
        for old in list_checkpoints(output_dir)[:-keep_last]:
            remove_dir(old)  # renamed aside first: a kill never leaves a half-deleted step-N behind
    accelerator.wait_for_everyone()
    return path


def architecture(unet, label: str) -> str:
    """A short description of a U-Net's architecture, to name it when a checkpoint does not fit."""
    c = unet.config
    params = sum(p.numel() for p in unet.parameters())
    return (
        f"{label} (block_out_channels {list(c.block_out_channels)}, layers_per_block {c.layers_per_block}, "
        f"mid block {c.mid_block_type or 'none'}, {params:,} parameters)"
    )


def _check_architecture(path: Path, wanted: dict[str, tuple], state: dict, expected: str) -> None:
    """Refuse a checkpoint whose tensors do not fit the student, naming both architectures."""
    from safetensors import safe_open

    with safe_open(str(path / "student.safetensors"), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    if saved != wanted:
        found = state.get("architecture") or (
            f"{len(saved)} tensors, {sum(torch.Size(s).numel() for s in saved.values()):,} parameters"
        )
        raise SlimsdError(
            f"checkpoint {str(path)!r} is of another architecture: it holds {found}; this run's student is "
            f"{expected}"
        )


def load_checkpoint(
    engine: str,
    path: Path,
    student,
    optimizer,
    lr_scheduler,
    averages: dict[str, dict | None],
    gen,
    expected: str,
    shapes: dict[str, tuple],
) -> tuple[dict, torch.Tensor]:
    """Restore everything an exact resume needs into the prepared ``student`` and ``optimizer``, on every
    process; ``expected`` describes the student (see ``architecture``), ``shapes`` are its tensors' shapes (taken
    before ``prepare``: ZeRO-3 leaves empty partitions in the module).
    Returns the state and the torch RNG state, which the caller sets once its data iterator has drawn its seed
    (as the uninterrupted run's did, before the checkpoint)."""
    from safetensors.torch import load_file

    state = read_state(path)
    _check_architecture(path, shapes, state, expected)
    weights = load_file(str(path / "student.safetensors"))
    S.load_weights(engine, student, weights)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)  # no code runs on load
    try:
        if engine == "deepspeed":
            S.load_engine(student, path / "engine")
        elif trainer["optimizer"] is None:
            raise ValueError("it was written by a DeepSpeed run, whose optimizer state only DeepSpeed reads")
        else:
            S.load_optimizer(engine, student, optimizer, trainer["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:  # e.g. use_8bit_adam changed under allow_config_change
        raise SlimsdError(
            f"checkpoint {str(path)!r}: its optimizer state does not fit this run ({e})"
        ) from None
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    gen.set_state(trainer["generator"])
    for name, average in averages.items():
        if average is None:
            continue
        # No file: the average starts here (ema switched on by a resume with allow_config_change).
        file = path / f"{name}.safetensors"
        saved = load_file(str(file)) if file.is_file() else weights
        for k in average:
            average[k].copy_(saved[k])
    return state, trainer["torch_rng"]


def apply_optimizer_settings(optimizer, lr_scheduler, cfg: DistillConfig) -> None:
    """After a resume with allowed config changes: the config's optimizer settings replace the checkpoint's
    (``load_state_dict`` restores the old ones), from this step on."""
    for i, group in enumerate(optimizer.param_groups):
        group.update(
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay,
            eps=cfg.adam_epsilon,
            initial_lr=cfg.learning_rate,
        )
        lr_scheduler.base_lrs[i] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * lr_scheduler.lr_lambdas[i](lr_scheduler.last_epoch)
