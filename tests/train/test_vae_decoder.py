"""The vae-decoder objective on the micro models: step 1's terms are their formulas (plain diffusers modules),
the loss goes down, resume is bit-exact on micro-sd and micro-sdxl, the latent cache is transparent, final/ is a
plain AutoencoderTiny folder, --dry-run estimates it, bad configs are one line; latent_noise adds its draw to the
latents both decoders decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimsd.train.distill import train

from helpers import FAST_DISTILL, cfg, launch_distill, max_diff, run_cli, whole_and_resumed

DECODER = {
    "objective": "vae-decoder",
    "student": "micro-tiny-decoder",
    "lambda_task": 0.0,
    "lambda_out": 1.0,
    "lambda_feat": 0.5,
    "learning_rate": 3e-3,
}


def decoder_weights(folder) -> dict:
    return load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_first_step_terms_equal_their_formulas(tmp_path, noise):
    """Step 1 by hand: the same examples and posterior draw; with latent_noise, NOISE times the generator's next
    draw added to the U-Net latents, which both decoders decode; the teacher's decode clipped to [-1, 1]; the
    teacher encoder's down-block outputs (forward hooks on the whole encoder) for the feature term."""
    from diffusers import AutoencoderTiny

    from slimsd.models.decoders import tiny_decoder_config
    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, collate, epoch_order, open_source

    got = train(cfg(tmp_path, max_steps=1, seed=5, latent_noise=noise, **DECODER))["losses"][0]
    vae = build_micro("micro-sd").vae
    torch.manual_seed(5)  # the preset's seeded initial weights
    student = AutoencoderTiny(**tiny_decoder_config("micro-tiny-decoder", dict(vae.config)))
    examples = Examples(open_source("shapes:16", seed=5), 64, seed=5)
    batch = collate([examples[(i, 0)] for i in epoch_order(16, 5, 0)[:4]])
    gen = torch.Generator().manual_seed(5)
    feats: dict[str, list] = {"now": []}
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: feats["now"].append(o)) for b in vae.encoder.down_blocks
    ]
    with torch.no_grad():
        dist = vae.encode(batch["pixels"]).latent_dist
        z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * 0.18215
        z = z + noise * torch.randn(z.shape, generator=gen)
        target = vae.decode(z / 0.18215).sample.clamp(-1, 1)
        image = student.decode(z).sample
        feats["now"] = []
        vae.encoder(target)
        t_feats, feats["now"] = feats["now"], []
        vae.encoder(image)
        s_feats = feats["now"]
    for h in hooks:
        h.remove()
    pixel = ((image - target) ** 2).mean().item()
    feat = (
        sum(
            ((s - t) ** 2).mean().item() / (t**2).mean().item() for s, t in zip(s_feats, t_feats, strict=True)
        )
        / 4
    )
    assert got["pixel"] == pytest.approx(pixel, rel=1e-4)
    assert got["feat"] == pytest.approx(feat, rel=1e-4)
    assert got["loss"] == pytest.approx(pixel + 0.5 * feat, rel=1e-4)


def test_trains_with_validation_and_final_is_a_plain_autoencoder_tiny(tmp_path):
    from diffusers import AutoencoderTiny
    from PIL import Image

    kw = {"validation_prompts": ["a red circle"], "validation_every": 12, "validation_steps": 2}
    result = train(cfg(tmp_path, max_steps=12, **(DECODER | {"learning_rate": 1e-2}), **kw))
    losses = [r["pixel"] for r in result["losses"]]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    # the teacher's decode beside the tiny decoder's, one pair per prompt
    assert Image.open(tmp_path / "run" / "validation" / "step-00000012.png").size == (128, 64)
    decoder = AutoencoderTiny.from_pretrained(result["final_dir"])
    assert decoder.config.scaling_factor == 1.0 and decoder.config.latent_channels == 4
    info = json.loads((Path(result["final_dir"]) / "slimsd.json").read_text())
    assert (info["teacher"], info["family"], info["latent_scaling"]) == ("micro-sd", "sd", "unet-latents")
    assert info["teacher_scaling_factor"] == 0.18215 and info["step"] == 12


@pytest.mark.parametrize("teacher", ["micro-sd", "micro-sdxl"])
def test_resume_latest_ends_with_the_same_weights(tmp_path, teacher):
    whole, resumed, raw = whole_and_resumed(tmp_path, **DECODER, teacher=teacher, latent_noise=0.2)
    assert [r["loss"] for r in resumed["losses"]] == [r["loss"] for r in whole["losses"]]
    assert max_diff(decoder_weights(whole["final_dir"]), decoder_weights(resumed["final_dir"])) == 0  # EMA
    assert max_diff(*raw) == 0
    info = json.loads((Path(whole["final_dir"]) / "slimsd.json").read_text())
    assert info["family"] == ("sdxl" if teacher == "micro-sdxl" else "sd")


@pytest.mark.slow(seconds=30)
@pytest.mark.xdist_group("processes")  # one multi-process test at a time (tests/conftest.py)
@pytest.mark.parametrize("teacher", ["micro-sd", "micro-sdxl"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, teacher):
    """DDP on CPU (gloo), `accelerate launch --multi_gpu --num_processes 2` with batch 2 each against one
    process with batch 4: the same examples, the same posterior and noise draws, the same decoder weights, and a
    validation grid written once. adam_epsilon=1e-3 as in the U-Net objectives' test (Adam's m/sqrt(v) ~ +-1
    would amplify the rounding of near-zero gradients)."""
    kw = {**DECODER, "teacher": teacher, "max_steps": 2, "data": "shapes:8", "adam_epsilon": 1e-3}
    kw |= {"latent_noise": 0.2}  # its draws too are the global micro-batch's
    kw |= {"validation_prompts": ["a red circle"], "validation_every": 2, "validation_steps": 1}
    one = train(cfg(tmp_path, "one", **kw))
    two = launch_distill({**FAST_DISTILL, **kw, "batch_size": 2, "output_dir": tmp_path / "two"}, tmp_path)
    assert two["num_processes"] == 2
    for k in ("loss", "pixel", "feat"):
        assert two["last"][k] == pytest.approx(one["losses"][-1][k], rel=1e-5)
    from slimsd.models.decoders import build_tiny_decoder
    from slimsd.models.presets import MICRO_VAE
    from slimsd.train.config import DistillConfig

    start = build_tiny_decoder("micro-tiny-decoder", MICRO_VAE, seed=DistillConfig.seed).state_dict()
    assert max_diff(start, decoder_weights(one["final_dir"])) > 1e-3  # it did train
    assert max_diff(decoder_weights(one["final_dir"]), decoder_weights(tmp_path / "two" / "final")) <= 1e-5
    assert (tmp_path / "two" / "validation" / "step-00000002.png").is_file()


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sharded_engines_are_refused_with_one_line(tmp_path, engine):
    from types import SimpleNamespace

    from slimsd.errors import SlimsdError
    from slimsd.train.objectives.vae_decoder import VAEDecoder

    with pytest.raises(
        SlimsdError, match=f"trains on one process or under DDP .*, not {engine}: a tiny decoder"
    ):
        VAEDecoder(cfg(tmp_path, **DECODER)).prepare(SimpleNamespace(engine=engine))


def test_latent_cache_is_transparent(tmp_path):
    from test_data import make_imagefolder

    from slimsd.train.cache import write_cache

    clean = tmp_path / "clean"
    clean.mkdir()
    make_imagefolder(clean)
    lines = (clean / "metadata.jsonl").read_text().splitlines()[:3]  # the three good rows
    (clean / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    write_cache("micro-sd", str(clean), tmp_path / "cache", resolution=64)
    kw = {**DECODER, "batch_size": 3, "max_steps": 1}
    raw = train(cfg(tmp_path, "raw", data=str(clean), **kw))
    cached = train(cfg(tmp_path, "cached", data=str(tmp_path / "cache"), **kw))
    for k in ("loss", "pixel", "feat"):
        assert cached["losses"][0][k] == pytest.approx(raw["losses"][0][k], rel=1e-4)


def conv_macs(h: int, c_in: int, c_out: int) -> int:
    return h * h * c_in * c_out * 9


def test_dry_run_estimates_the_decoder(capsys):
    """The student's parameters are those of the AutoencoderTiny diffusers builds; its forward MACs are the sum
    of its 3x3 convolutions, written out: micro-tiny-decoder at 64 px (8x8 latents, 16 channels, 2-2-2-1 blocks
    of three convolutions, an upsampling and a convolution between stages, RGB out)."""
    from diffusers import AutoencoderTiny

    from slimsd.models.decoders import tiny_decoder_config
    from slimsd.models.presets import MICRO_VAE

    args = ["distill", "--config", "configs/micro-sd-tiny-decoder.yaml", "--dry-run", "--json"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    est = json.loads(out)["estimate"]
    params = sum(
        p.numel()
        for p in AutoencoderTiny(**tiny_decoder_config("micro-tiny-decoder", MICRO_VAE)).parameters()
    )
    assert est["student_params"] == params
    macs = conv_macs(8, 4, 16)
    for side, blocks, last in ((8, 2, False), (16, 2, False), (32, 2, False), (64, 1, True)):
        macs += blocks * 3 * conv_macs(side, 16, 16) + conv_macs(
            side * (1 if last else 2), 16, 3 if last else 16
        )
    assert est["macs_per_sample"]["student_forward"] == macs
    assert est["memory_per_process"]["ddp"]["total"] > 0
    code, out, _ = run_cli(args[:-1], capsys)
    assert code == 0 and "# estimate: 1 processes, batch 16 per process at 64 px" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student=bk-small", "config key 'student': 'bk-small' is not a tiny decoder"),
        ("lambda_task=1", "config key 'lambda_task': 1 is not allowed for objective vae-decoder"),
        ("lambda_feat=0", "config keys lambda_out and lambda_feat are both 0"),
        ("latent_noise=-0.1", "config key 'latent_noise': -0.1 is out of range; allowed: >= 0"),
        ("latent_noise=inf", "config key 'latent_noise': inf is not a finite number"),
        ("kd:latent_noise=0.1", "config key 'latent_noise': 0.1 is for objective vae-decoder, not 'kd'"),
    ],
)
def test_bad_configs_are_one_line(capsys, override, message):
    extra = ["lambda_out=0"] if "lambda_feat" in override else []
    config = "configs/micro-sd-tiny-decoder.yaml"
    if override.startswith("kd:"):  # a key of this objective in another objective's config
        config, override = "configs/micro-sd.yaml", override[3:]
    code, _, err = run_cli(["distill", "--config", config, override, *extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
