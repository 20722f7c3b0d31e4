"""The objective interface: an objective that is one class and one registration runs through the unchanged loop,
here one with no U-Net at all (the shape of issue 24's VAE decoder: a frozen VAE decoder teaches a tiny one)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from slimsd.train import objectives
from slimsd.train.config import make_config
from slimsd.train.distill import train
from slimsd.train.objectives.base import Models, Objective

from helpers import FAST_DISTILL


def tiny_decoder() -> torch.nn.Module:
    """4 latent channels at 1/8 size -> 3 pixel channels: nearest x8, then one convolution."""
    return torch.nn.Sequential(torch.nn.Upsample(scale_factor=8), torch.nn.Conv2d(4, 3, 3, padding=1))


class Decoder(Objective):
    """The student decoder learns the teacher's decoded pixels from the teacher's latents (their mode)."""

    name = "decoder-test"

    def load(self, device, weight_dtype):
        from slimsd.models.loading import load

        student = tiny_decoder()  # first: its initial weights follow from the seed alone
        pipe = load(self.cfg.teacher, device=device, dtype=weight_dtype, optimize=False)
        pipe.vae.requires_grad_(False).eval()
        return Models(pipe, student.requires_grad_(True), [pipe.vae])

    def loss(self, run, batch, step):
        vae = run.models.pipe.vae
        with torch.no_grad():
            latents = vae.encode(batch["pixels"].to(run.device)).latent_dist.mode()
            target = vae.decode(latents).sample
        out = F.mse_loss(run.student(latents.float()), target.float())
        return {"loss": out, "out": out}

    def save_final(self, run, weights, state):
        out = Path(self.cfg.output_dir) / "final"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "decoder.safetensors"))
        return out


def test_a_registered_objective_without_a_unet_trains_through_the_loop(tmp_path, monkeypatch):
    """Registered in one line, it trains (with an EMA, checkpoints, a resume-ready state) and its first loss is
    the decoder MSE computed here by hand on the same 4 images (a mean: the row order does not matter)."""
    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, open_source

    monkeypatch.setitem(objectives.OBJECTIVES, Decoder.name, Decoder)
    keys = {**FAST_DISTILL, "data": "shapes:4", "batch_size": 4, "max_steps": 3, "checkpoint_every": 2}
    keys |= {
        "objective": Decoder.name,
        "ema": True,
        "ema_decay": 0.5,
        "seed": 3,
        "output_dir": str(tmp_path / "run"),
    }
    result = train(make_config(keys))

    torch.manual_seed(3)  # the loop seeds before the objective builds its student, first thing in load
    student = tiny_decoder()
    vae = build_micro("micro-sd").vae.eval()
    examples = Examples(open_source("shapes:4", 3), 64, True, False, 3)
    pixels = torch.stack([examples[(i, 0)]["pixels"] for i in range(4)])  # (row, epoch)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode()
        first = F.mse_loss(student(latents), vae.decode(latents).sample).item()
    assert abs(result["losses"][0]["out"] - first) <= 1e-5 * first
    assert [r["step"] for r in result["losses"]] == [1, 2, 3]
    saved = load_file(str(tmp_path / "run" / "final" / "decoder.safetensors"))
    ema = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000003" / "ema.safetensors"))
    assert (
        saved.keys() == ema.keys() == student.state_dict().keys()
    )  # final/ holds the EMA, as the base keeps it
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert not torch.equal(saved["1.weight"], student.state_dict()["1.weight"])  # it trained
