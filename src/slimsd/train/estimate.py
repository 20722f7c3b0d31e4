"""Plan before you launch: memory per process and compute per step of a distillation run, from the
architectures alone (meta device: no weights, no download).

Memory per process, in bytes, for an engine over N processes:

- student weights (fp32, 4 B/param), gradients (4 B), AdamW states (two fp32 moments, 8 B; 8-bit Adam: 2 B);
  ZeRO-2 / FSDP SHARD_GRAD_OP divide gradients and optimizer states by N, ZeRO-3 / FSDP FULL_SHARD the weights
  too; DDP divides nothing;
- frozen teacher U-Net, text encoder(s) and VAE in the compute dtype (whole on every process);
- averaged copies (EMA weights, LCM / progressive target network): fp32 and whole on every process (the trainer
  keeps them so; under FSDP/ZeRO-3 the whole online weights are gathered for them once a step, counted too);
- activations: the bytes autograd saves for the backward in one student forward, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on the meta device at this batch size and resolution (with
  gradient checkpointing: what is saved outside the checkpointed blocks plus the largest block, which the
  backward recomputes). The teacher's forward runs under no_grad and saves nothing. The backward frees the
  activations as it fills the gradients, so the total counts the larger of the two, not both.

Compute per optimizer step: MACs (convolutions and linear layers, counting.py) of the teacher and student
forwards, and the student's backward at ~2x its forward (~3x with gradient checkpointing, which runs the forward
again inside the backward), times the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimsd.train.config import DistillConfig

ENGINES = ("ddp", "fsdp-shard-grad-op", "fsdp", "zero2", "zero3")
# what each engine shards over the processes: (gradients and optimizer states, weights)
SHARDS = {
    "ddp": (False, False),
    "fsdp-shard-grad-op": (True, False),
    "fsdp": (True, True),
    "zero2": (True, False),
    "zero3": (True, True),
}
GIB = 2**30


@dataclass
class Architecture:
    student: dict  # U-Net config
    teacher: dict  # summarize() of the teacher: params of each component, U-Net MACs
    resolution: int
    vae_factor: int


def architecture(cfg: DistillConfig) -> Architecture:
    from diffusers import UNet2DConditionModel

    from slimsd.models.architecture import load_recipe, student_config
    from slimsd.models.counting import summarize

    teacher = summarize(cfg.teacher, cfg.resolution)
    try:
        student = dict(UNet2DConditionModel.load_config(cfg.student, subfolder="unet"))
    except (OSError, ValueError):  # not a folder: a recipe, compressed from the teacher
        student = student_config(teacher["unet_config"], load_recipe(cfg.student))
    if cfg.objective in ("lcm", "progressive") and student.get("time_cond_proj_dim") is None:
        student["time_cond_proj_dim"] = cfg.cond_proj_dim  # the guidance input the trainer adds
    return Architecture(student, teacher, teacher["resolution"], teacher["vae_factor"])


def saved_bytes(
    unet_config: dict, resolution: int, batch: int, checkpointing: bool, vae_factor: int = 8
) -> int:
    """Bytes autograd saves for the backward in one training forward of the U-Net (meta device, fp32)."""
    from slimsd.models.counting import build_unet_meta, unet_dummy_inputs

    unet = build_unet_meta(unet_config).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    inputs = unet_dummy_inputs(unet, resolution, batch=batch, vae_factor=vae_factor)
    seen: dict[int, int] = {}  # one tensor saved by several ops is counted once

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):  # the weights are counted apart
            base = t if t._base is None else t._base  # a view saves no memory of its own
            seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(**inputs).sample  # noqa: F841 (kept alive: the ids of what it saved stay unique)
    total = sum(seen.values())
    if checkpointing:  # the backward recomputes one block at a time: its activations exist once more
        total += max(saved_bytes_by_block(unet_config, resolution, batch, vae_factor).values(), default=0)
    return total


def saved_bytes_by_block(
    unet_config: dict, resolution: int, batch: int, vae_factor: int = 8
) -> dict[str, int]:
    """Bytes saved for the backward inside each down / mid / up block of one training forward (no
    checkpointing): what the backward of a checkpointed block recomputes."""
    from slimsd.models.counting import build_unet_meta, unet_dummy_inputs

    unet = build_unet_meta(unet_config).train()
    inputs = unet_dummy_inputs(unet, resolution, batch=batch, vae_factor=vae_factor)
    out: dict[str, int] = {}
    current = ["outside"]
    seen: set[int] = set()

    def pack(t):
        if id(t) not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(id(t))
            out[current[0]] = out.get(current[0], 0) + t.numel() * t.element_size()
        return t

    def enter(name):
        def hook(*_):
            current[0] = name

        return hook

    def leave(*_):
        current[0] = "outside"

    handles = []
    for i, block in enumerate([*unet.down_blocks, unet.mid_block, *unet.up_blocks]):
        if block is not None:
            handles += [
                block.register_forward_pre_hook(enter(f"block{i}")),
                block.register_forward_hook(leave),
            ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kept = unet(**inputs).sample  # noqa: F841 (alive: the ids of what it saved stay unique)
    finally:
        for h in handles:
            h.remove()
    out.pop("outside", None)
    return out


def estimate(cfg: DistillConfig, num_processes: int) -> dict:
    """Memory per process (bytes, per engine) and compute per step (MACs) of the run ``cfg`` describes."""
    from slimsd.devices import DTYPES, MIXED_PRECISION
    from slimsd.models.counting import build_unet_meta, count_macs, count_params, unet_dummy_inputs

    arch = architecture(cfg)
    res = arch.resolution
    student = build_unet_meta(arch.student)
    params = count_params(student)
    trainable = params if cfg.objective != "lcm-lora" else 0  # LoRA: adapters only (not estimated: small)
    frozen_bytes = torch.finfo(DTYPES[MIXED_PRECISION[cfg.mixed_precision]]).bits // 8
    t = arch.teacher
    frozen = (t["unet_params"] + t["text_encoder_params"] + t["vae_params"]) * frozen_bytes
    averages = (1 if cfg.ema else 0) + (1 if cfg.objective in ("lcm", "progressive") else 0)
    activations = saved_bytes(arch.student, res, cfg.batch_size, cfg.gradient_checkpointing, arch.vae_factor)
    n = num_processes
    engines = {}
    for name, (shard_states, shard_weights) in SHARDS.items():
        states_div = n if shard_states else 1
        weights_div = n if shard_weights else 1
        parts = {
            "student_weights": 4 * params // weights_div,
            "gradients": 4 * trainable // states_div,
            "optimizer": (2 if cfg.use_8bit_adam else 8) * trainable // states_div,
            "frozen": frozen,
            "averages": 4 * params * averages,
            "gathered_weights": 4 * params if averages and shard_weights else 0,
            "activations": activations,
        }
        # the backward frees the activations as it fills the gradients: the peak holds the larger of the two
        peak = sum(parts.values()) - min(parts["activations"], parts["gradients"])
        engines[name] = parts | {"total": peak}
    student_macs = count_macs(student, unet_dummy_inputs(student, res, vae_factor=arch.vae_factor))
    teacher_passes = 2 if cfg.objective in ("lcm", "progressive") else 1  # guided: with and without caption
    uses_teacher = cfg.objective != "kd" or cfg.lambda_out > 0 or cfg.lambda_feat > 0
    backward = (3 if cfg.gradient_checkpointing else 2) * student_macs  # checkpointing recomputes the forward
    per_sample = student_macs + backward + (teacher_passes * t["unet_macs"] if uses_teacher else 0)
    global_batch = cfg.batch_size * n * cfg.gradient_accumulation_steps
    return {
        "num_processes": n,
        "resolution": res,
        "batch_size": cfg.batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "student_params": params,
        "memory_per_process": engines,
        "macs_per_sample": {
            "student_forward": student_macs,
            "student_backward": backward,
            "teacher_forward": teacher_passes * t["unet_macs"] if uses_teacher else 0,
        },
        "macs_per_step": per_sample * global_batch,
    }


def macs_text(macs: int) -> str:
    """MACs in the largest unit that keeps a digit before the point (TMACs for full size, GMACs for micro)."""
    for unit, size in (("TMACs", 1e12), ("GMACs", 1e9), ("MMACs", 1e6)):
        if macs >= size:
            return f"{macs / size:.2f} {unit}"
    return f"{macs:,} MACs"


def describe(est: dict) -> str:
    """The estimate as a few lines for --dry-run."""
    lines = [
        f"# estimate: {est['num_processes']} processes, batch {est['batch_size']} per process at "
        f"{est['resolution']} px, gradient checkpointing {'on' if est['gradient_checkpointing'] else 'off'}",
        f"# compute per optimizer step: {macs_text(est['macs_per_step'])} "
        "(teacher + student forward, student backward ~2x, ~3x with gradient checkpointing)",
    ]
    big = max(p["total"] for p in est["memory_per_process"].values()) >= GIB
    unit, size = ("GiB", GIB) if big else ("MiB", 2**20)
    lines.append(
        f"# memory per process ({unit}): engine, peak: student weights, gradients, optimizer, frozen parts, "
        "averages, gathered weights, activations (the peak holds the larger of gradients and activations)"
    )
    for name, p in est["memory_per_process"].items():
        parts = ", ".join(f"{p[k] / size:.1f}" for k in p if k != "total")
        lines.append(f"#   {name:<19} {p['total'] / size:8.1f}: {parts}")
    return "\n".join(lines) + "\n"
