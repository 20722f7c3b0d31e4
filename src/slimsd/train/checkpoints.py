"""Checkpoints of a distillation run: everything an exact resume needs, each written whole or not at all.

``OUTPUT/checkpoints/step-NNNNNNNN/`` holds the student (safetensors), the EMA weights, the optimizer, the LR
schedule, the generator and torch RNG states (``trainer.pt``, read with ``weights_only=True``: no code runs on
load) and ``state.json`` (step, data position, skipped rows, losses).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.train.config import DistillConfig


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []


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
    output_dir: Path, step: int, student, optimizer, lr_scheduler, ema, gen, state: dict, keep_last: int
) -> Path:
    """Everything an exact resume needs, in one folder renamed into place (never half-written)."""
    from safetensors.torch import save_file

    from slimsd.atomic import atomic_dir

    path = output_dir / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()},
            str(tmp / "student.safetensors"),
        )
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, student, optimizer, lr_scheduler, ema, gen) -> dict:
    from safetensors.torch import load_file

    student.load_state_dict(load_file(str(path / "student.safetensors")))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)  # no code runs on load
    optimizer.load_state_dict(trainer["optimizer"])
    lr_scheduler.load_state_dict(trainer["lr_scheduler"])
    gen.set_state(trainer["generator"])
    torch.set_rng_state(trainer["torch_rng"])
    if ema is not None:
        ema_path = path / "ema.safetensors"
        saved = load_file(str(ema_path)) if ema_path.is_file() else dict(student.state_dict())
        for k in ema:
            ema[k].copy_(saved[k])
    return json.loads((path / "state.json").read_text())
