"""What training a student U-Net adds to the memory on CPU, over two steps (forward, backward, AdamW; the
second holds the optimizer states the first made): the peak of the live tensor bytes (slimsd.train.estimate's
LiveBytes meter, deterministic) and of the resident size (VmHWM, allocator- and environment-dependent).

    python benchmarks/measure_step.py TEACHER STUDENT RESOLUTION BATCH CHECKPOINTING(0/1)

prints {"live_peak": bytes, "rss_added": bytes}; benchmarks/training_memory.py runs it in a fresh process each.
"""

from __future__ import annotations

import json
import sys

import torch
from torch.utils._pytree import tree_map

from slimsd.train.estimate import LiveBytes


def training_step(unet, optimizer, inputs: dict) -> None:
    """The student's share of a distillation step: forward, a loss, backward, AdamW, gradients set to None."""
    unet(**inputs).sample.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def student_step(teacher: str, student: str, resolution: int, batch: int, checkpointing: bool):
    """A CPU student U-Net (random weights), its AdamW and its step inputs at this batch size."""
    from diffusers import UNet2DConditionModel

    from slimsd.models.counting import unet_dummy_inputs
    from slimsd.train.config import DistillConfig
    from slimsd.train.estimate import architecture

    torch.manual_seed(0)
    cfg = DistillConfig(teacher=teacher, student=student, resolution=resolution)
    unet = UNet2DConditionModel.from_config(architecture(cfg).student).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    inputs = unet_dummy_inputs(unet, resolution, batch=batch, device="cpu")
    inputs["sample"] = torch.randn_like(inputs["sample"])
    return unet, optimizer, inputs


def live_peak(unet, optimizer, inputs: dict) -> int:
    """Peak live bytes over two training steps (the second holds the optimizer states the first made: the
    steady state of a run), over the weights and inputs."""
    with LiveBytes() as meter:
        training_step(unet, optimizer, inputs)
        training_step(unet, optimizer, inputs)
    return meter.peak


def vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(teacher: str, student: str, resolution: int, batch: int, checkpointing: bool) -> None:
    unet, optimizer, inputs = student_step(teacher, student, resolution, batch, checkpointing)
    # The resident size first (memory freed stays resident): a warm-up at batch 1 (library workspaces, thread
    # pools), then the peak of two steps over the resident size before them.
    small = tree_map(lambda v: v[:1] if isinstance(v, torch.Tensor) else v, inputs)
    unet(**small).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    before = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size, to the current one
    training_step(unet, optimizer, inputs)
    training_step(unet, optimizer, inputs)
    rss_added = vm("VmHWM") - before
    fresh = torch.optim.AdamW(unet.parameters(), lr=1e-4)  # a new optimizer: no states yet
    live = live_peak(unet, fresh, inputs)
    print(json.dumps({"live_peak": live, "rss_added": rss_added}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
