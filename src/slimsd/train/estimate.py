"""Plan before you launch: memory per process and compute per step of a distillation run, from the
architectures alone (meta device: no weights, no download).

Memory per process, in bytes, for an engine over N processes:

- student weights (fp32, 4 B/param); frozen teacher U-Net, text encoder(s) and VAE in the compute dtype (whole
  on every process); averaged copies (EMA weights, LCM / progressive target network): fp32 and whole on every
  process (under FSDP/ZeRO-3 the whole online weights are gathered for them once a step, counted too);
- AdamW states (two fp32 moments, 8 B/param; 8-bit Adam: 2 B), held across steps;
- the training step's peak on top of those: the student's forward and backward are run on the meta device (no
  memory, shapes only) at this batch size and resolution, with or without gradient checkpointing, under a
  meter of live tensor bytes (``LiveBytes``: each storage an operator creates counts from its creation until it
  is freed). That counts what one step really holds at its worst moment, in the order autograd frees it: the
  tensors saved for the backward, the gradients flowing back through the activations, the largest temporaries
  (attention, GroupNorm/SiLU intermediates), and the parameter gradients filled so far. With gradient
  checkpointing the worst moment is inside the backward: the saved block inputs, one block recomputed with its
  saved tensors and the gradients flowing through it, and the parameter gradients already filled. The
  parameter gradients are told apart (they are what ``.grad`` holds after the backward), so that the engines
  that shard them (ZeRO-2/3, FSDP) keep 1/N of each. After the backward AdamW holds all gradients plus two
  temporaries the size of the largest parameter (sqrt of its second moment, then that over the bias
  correction: PyTorch's per-tensor AdamW, the CPU path); the step's peak is the larger of the two moments.
  Attention is counted as PyTorch's fused kernels (flash attention on CPU, flash / memory-efficient on GPU)
  store it: the output and a log-sum-exp per query, not the score matrices (on the meta device PyTorch would
  take the math path, which stores them; ``fused_attention``).
- Sharding: ZeRO-2 / FSDP SHARD_GRAD_OP divide gradients and optimizer states by N, ZeRO-3 / FSDP FULL_SHARD
  the weights too; DDP divides nothing.

Not counted: allocator slack and fragmentation, library workspaces (cuDNN, oneDNN), the CUDA context, the
teacher's forward (no_grad: its activations are freed layer by layer), DDP's gradient buckets; activations are
counted in fp32 (under bf16/fp16 autocast most are half that: an upper bound). Checked against the same meter
on real CPU training steps of the micro models (tests/train/test_estimate.py, benchmarks/training_memory.py).

Compute per optimizer step: MACs (convolutions and linear layers, counting.py) of the teacher and student
forwards, and the student's backward at ~2x its forward (~3x with gradient checkpointing, which runs the forward
again inside the backward), times the global batch.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


class LiveBytes(TorchDispatchMode):
    """A meter of live tensor bytes: each storage an operator creates while the mode is on counts from then
    until it is freed (once, however many tensors view it). Storages that existed before (weights, inputs)
    and what in-place operators and views return (an input's storage) are not counted. Works on real and meta
    tensors alike. ``peak``: the most bytes alive at once; ``events``: (storage number, +bytes / -bytes) in
    order; ``number(tensor)``: the number of a live tensor's storage."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.events: list[tuple[int, int]] = []
        # id of a live storage (one Python object while it lives) -> its number
        self._numbers: dict[int, int] = {}

    def number(self, tensor: torch.Tensor) -> int | None:
        return self._numbers.get(id(tensor.untyped_storage()))

    def _freed(self, key: int, number: int, nbytes: int) -> None:
        del self._numbers[key]
        self.live -= nbytes
        self.events.append((number, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in given or key in self._numbers:
                continue
            number, nbytes = len(self.events), storage.nbytes()
            self._numbers[key] = number
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self.events.append((number, nbytes))
            weakref.finalize(storage, self._freed, key, number, nbytes)
        return out


@contextmanager
def fused_attention():
    """F.scaled_dot_product_attention as a fused kernel on the meta device too (which would take the math
    path and store the score matrices): the CPU flash kernel, which keeps the output and a log-sum-exp per
    query, as the CPU and the GPU kernels (flash, memory-efficient) do. Swapped in for the whole forward and
    backward (gradient checkpointing recomputes the forward inside the backward), then restored."""
    sdpa = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return kernel(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def backward_timeline(
    unet_config: dict, resolution: int, batch: int, checkpointing: bool, vae_factor: int = 8
) -> list[tuple[int, bool]]:
    """One training forward and backward of the U-Net on the meta device (fp32): the live-byte changes in
    order, each marked True when it is a parameter gradient's."""
    from slimsd.models.counting import build_unet_meta, unet_dummy_inputs

    unet = build_unet_meta(unet_config).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    inputs = unet_dummy_inputs(unet, resolution, batch=batch, vae_factor=vae_factor)
    with fused_attention(), LiveBytes() as meter:
        unet(**inputs).sample.square().mean().backward()
    grads = {meter.number(p.grad) for p in unet.parameters() if p.grad is not None}
    return [(delta, number in grads) for number, delta in meter.events]


def backward_peak(timeline: list[tuple[int, bool]], grad_share: int = 1) -> tuple[int, int]:
    """(the most bytes alive at once, the most non-gradient bytes alive at once) of a timeline, with each
    parameter gradient divided by ``grad_share`` (the engines that shard gradients keep 1/N of each)."""
    live = rest = peak = rest_peak = 0
    for delta, is_grad in timeline:
        live += delta // grad_share if is_grad else delta
        rest += 0 if is_grad else delta
        peak, rest_peak = max(peak, live), max(rest_peak, rest)
    return peak, rest_peak


def engine_memory(
    cfg: DistillConfig,
    n: int,
    params: int,
    trainable: int,
    frozen: int,
    averages: int,
    timeline,
    largest: int,
) -> dict:
    """Memory per process of each engine (module docstring), from the student's parameters (all, trainable),
    the frozen parts' bytes, the number of averaged copies, the training step's timeline and the largest
    trainable parameter's bytes."""
    engines = {}
    for name, (shard_states, shard_weights) in SHARDS.items():
        states_div = n if shard_states else 1
        weights_div = n if shard_weights else 1
        backward, activations = backward_peak(timeline, states_div)
        gradients = 4 * trainable // states_div
        optimizer = (2 if cfg.use_8bit_adam else 8) * trainable // states_div
        parts = {
            "student_weights": 4 * params // weights_div,
            "frozen": frozen,
            "averages": 4 * params * averages,
            "gathered_weights": 4 * params if averages and shard_weights else 0,
            "optimizer": optimizer,
            "gradients": gradients,
            "activations": activations,
            # the step's worst moment: in the backward, or in AdamW (all gradients + two temporaries)
            "step_peak": optimizer + max(backward, gradients + 2 * largest // states_div),
        }
        fixed = ("student_weights", "frozen", "averages", "gathered_weights", "step_peak")
        engines[name] = parts | {"total": sum(parts[k] for k in fixed)}
    return engines


def decoder_estimate(cfg: DistillConfig, num_processes: int) -> dict:
    """The estimate of a vae-decoder run (objectives/vae_decoder.py): the tiny decoder is the student (only its
    decoder trained), the teacher's U-Net, text encoder(s) and VAE are frozen. Compute per sample: the student's
    decode and its backward, the teacher VAE's encode of the image and decode of the latents, and with the
    feature term the teacher encoder on both images plus its backward to the student's image (~2x)."""
    from diffusers import AutoencoderTiny

    from slimsd.devices import DTYPES, MIXED_PRECISION
    from slimsd.models.counting import count_macs, count_params, decoder_counts, model_architecture, summarize
    from slimsd.models.decoders import TINY_DECODERS, meta_decoders, tiny_decoder_config

    t = summarize(cfg.teacher, cfg.resolution)
    res, vae_config = t["resolution"], model_architecture(cfg.teacher)[2]
    full, _ = meta_decoders(vae_config)
    config = (
        tiny_decoder_config(cfg.student, vae_config)
        if cfg.student in TINY_DECODERS
        else dict(AutoencoderTiny.load_config(cfg.student))
    )
    with torch.device("meta"):
        student = AutoencoderTiny.from_config(config).train()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    params, trainable = count_params(student), count_params(student.decoder)
    side = res // t["vae_factor"]
    z = torch.zeros(cfg.batch_size, config["latent_channels"], side, side, device="meta")
    with LiveBytes() as meter:
        student.decode(z).sample.square().mean().backward()
    grads = {meter.number(p.grad) for p in student.decoder.parameters() if p.grad is not None}
    timeline = [(delta, number in grads) for number, delta in meter.events]
    frozen_bytes = torch.finfo(DTYPES[MIXED_PRECISION[cfg.mixed_precision]]).bits // 8
    frozen = (t["unet_params"] + t["text_encoder_params"] + t["vae_params"]) * frozen_bytes
    largest = max(p.numel() for p in student.decoder.parameters()) * 4
    engines = engine_memory(cfg, num_processes, params, trainable, frozen, int(cfg.ema), timeline, largest)
    student_macs = decoder_counts(student, res)[1]
    teacher_decode = decoder_counts(full, res)[1]
    image = torch.zeros(1, vae_config.get("in_channels", 3), res, res, device="meta")
    encode = count_macs(full.encoder, {"sample": image})
    backward = (3 if cfg.gradient_checkpointing else 2) * student_macs
    teacher = teacher_decode + encode + (4 * encode if cfg.lambda_feat else 0)
    return summary(cfg, num_processes, res, params, engines, student_macs, backward, teacher)


def estimate(cfg: DistillConfig, num_processes: int) -> dict:
    """Memory per process (bytes, per engine) and compute per step (MACs) of the run ``cfg`` describes."""
    if cfg.objective == "vae-decoder":
        return decoder_estimate(cfg, num_processes)
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
    timeline = backward_timeline(
        arch.student, res, cfg.batch_size, cfg.gradient_checkpointing, arch.vae_factor
    )
    if not trainable:  # LoRA: the U-Net's own weights get no gradients
        timeline = [(delta, False) for delta, is_grad in timeline if not is_grad]
    largest = max(p.numel() for p in student.parameters()) * 4 if trainable else 0
    engines = engine_memory(cfg, num_processes, params, trainable, frozen, averages, timeline, largest)
    student_macs = count_macs(student, unet_dummy_inputs(student, res, vae_factor=arch.vae_factor))
    teacher_passes = 2 if cfg.objective in ("lcm", "progressive") else 1  # guided: with and without caption
    uses_teacher = cfg.objective != "kd" or cfg.lambda_out > 0 or cfg.lambda_feat > 0
    backward = (3 if cfg.gradient_checkpointing else 2) * student_macs  # checkpointing recomputes the forward
    teacher = teacher_passes * t["unet_macs"] if uses_teacher else 0
    return summary(cfg, num_processes, res, params, engines, student_macs, backward, teacher)


def summary(
    cfg, n: int, res: int, params: int, engines: dict, student: int, backward: int, teacher: int
) -> dict:
    """The estimate's fields: memory per engine and MACs of the student's forward and backward and the teacher's
    forwards per sample, times the global batch per optimizer step."""
    return {
        "num_processes": n,
        "resolution": res,
        "batch_size": cfg.batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "student_params": params,
        "memory_per_process": engines,
        "macs_per_sample": {
            "student_forward": student,
            "student_backward": backward,
            "teacher_forward": teacher,
        },
        "macs_per_step": (student + backward + teacher)
        * cfg.batch_size
        * n
        * cfg.gradient_accumulation_steps,
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
        f"# memory per process ({unit}): engine, peak: student weights, frozen parts, averages, gathered "
        "weights, optimizer states, gradients, activations, step peak (the peak holds the weights, frozen "
        "parts, averages, gathered weights and the step peak: optimizer states + the step's worst moment, "
        "activations with the gradients filled so far or all gradients in AdamW)"
    )
    for name, p in est["memory_per_process"].items():
        parts = ", ".join(f"{p[k] / size:.1f}" for k in p if k != "total")
        lines.append(f"#   {name:<19} {p['total'] / size:8.1f}: {parts}")
    return "\n".join(lines) + "\n"
