"""Run as a script: the peak resident memory one training step of a student U-Net adds (gradients, AdamW
states, activations), on CPU. Prints {"added": bytes}. Used by test_estimate.py in a fresh process."""

from __future__ import annotations

import json
import sys

import torch


def vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(teacher: str, student: str, resolution: int, batch: int, checkpointing: bool) -> None:
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

    def inputs(n):
        kw = unet_dummy_inputs(unet, resolution, batch=n, device="cpu")
        kw["sample"] = torch.randn_like(kw["sample"])
        return kw

    # warm-up at batch 1 (library workspaces, thread pools), no optimizer step: its states come in the step
    unet(**inputs(1)).sample.square().mean().backward()
    unet.zero_grad(set_to_none=True)
    step_inputs = inputs(batch)
    before = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size, to the current one
    unet(**step_inputs).sample.square().mean().backward()
    optimizer.step()
    print(json.dumps({"added": vm("VmHWM") - before}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1")
