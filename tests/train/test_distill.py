"""The KD trainer on the micro models: the loss goes down, each term is its formula, resume is exact, two
processes equal one, the latent cache is transparent, SDXL students train and load in plain diffusers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from slimsd.errors import SlimsdError
from slimsd.train.config import finetune_config, load_config, read_values
from slimsd.train.distill import train

from helpers import FAST_DISTILL as FAST
from helpers import cfg, launch_distill, max_diff, run_cli, unet_weights, whole_and_resumed


def test_loss_goes_down_and_the_student_loads_in_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    result = train(cfg(tmp_path, max_steps=8, checkpoint_every=3, keep_last=2))
    losses = [r["loss"] for r in result["losses"]]
    assert len(losses) == 8 and all(k in result["losses"][0] for k in ("loss", "task", "out", "feat"))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-00000006", "step-00000008"]  # every 3 steps and at the end, the last 2 kept
    pipe = DiffusionPipeline.from_pretrained(result["final_dir"])
    assert pipe.unet.config.mid_block_type is None and len(pipe.unet.down_blocks) == 4  # bk-small
    assert sum(p.numel() for p in pipe.unet.parameters()) == result["student_unet_params"]
    info = json.loads((Path(result["final_dir"]) / "slimsd.json").read_text())
    assert info["recipe"]["name"] == "bk-small" and info["step"] == 8
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_bf16_with_checkpointing_ema_and_validation(tmp_path):
    """Mixed precision: the fp32 student trains beside a bf16 teacher; validation grids are written; the final
    pipeline is fp32 throughout (the frozen parts were only cast for compute)."""
    from diffusers import DiffusionPipeline

    from slimsd.models.micro import build_micro

    result = train(
        cfg(
            tmp_path,
            max_steps=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            ema=True,
            validation_prompts=["a red circle", "a blue square"],
            validation_every=2,
            validation_steps=2,
            tensorboard=True,
        )
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result["losses"])
    grid = tmp_path / "run" / "validation" / "step-00000002.png"
    from PIL import Image

    assert Image.open(grid).size == (128, 64)  # two prompts side by side
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    pipe = DiffusionPipeline.from_pretrained(result["final_dir"])
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    ref = build_micro("micro-sd").vae.state_dict()
    assert max_diff(pipe.vae.state_dict(), ref) == 0  # the VAE saved is the teacher's, not a bf16 round-trip


def test_first_step_terms_equal_their_formulas(tmp_path):
    """Recompute step 1 by hand: the same examples, noise and timesteps, the BK-SDM formulas."""
    from slimsd.models.compress import compress_pipeline
    from slimsd.models.micro import build_micro
    from slimsd.train.data import Examples, collate, epoch_order, open_source

    lam = {"lambda_task": 0.5, "lambda_out": 2.0, "lambda_feat": 3.0}
    got = train(cfg(tmp_path, max_steps=1, seed=5, **lam))["losses"][0]

    teacher = build_micro("micro-sd")
    student = compress_pipeline(teacher, "bk-small").pipeline.unet
    examples = Examples(open_source("shapes:16", seed=5), 64, seed=5)
    batch = collate([examples[(i, 0)] for i in epoch_order(16, 5, 0)[:4]])
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (4,), generator=gen)
    with torch.no_grad():
        dist = teacher.vae.encode(batch["pixels"]).latent_dist
        noise = torch.randn(dist.mean.shape, generator=gen)
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * 0.18215
        ac = teacher.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
        ids = teacher.tokenizer(
            batch["caption"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        text = teacher.text_encoder(ids)[0]
        feats = {"s": {}, "t": {}}
        names = [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)]
        handles = []
        for key, net in (("s", student), ("t", teacher.unet)):
            for name in names:

                def hook(_m, _i, out, key=key, name=name):
                    feats[key][name] = out[0] if isinstance(out, tuple) else out

                handles.append(net.get_submodule(name).register_forward_hook(hook))
        t_out = teacher.unet(noisy, t, text).sample
        s_out = student(noisy, t, text).sample
        for h in handles:
            h.remove()
    task = ((s_out - noise) ** 2).mean().item()
    out = ((s_out - t_out) ** 2).mean().item()
    feat = sum(((feats["s"][n] - feats["t"][n]) ** 2).mean().item() for n in names)
    assert got["task"] == pytest.approx(task, rel=1e-4)
    assert got["out"] == pytest.approx(out, rel=1e-4)
    assert got["feat"] == pytest.approx(feat, rel=1e-4)
    assert got["loss"] == pytest.approx(0.5 * task + 2 * out + 3 * feat, rel=1e-4)


def test_resume_latest_ends_with_the_same_weights(tmp_path):
    whole, resumed, raw = whole_and_resumed(tmp_path)
    assert [r["loss"] for r in resumed["losses"]] == pytest.approx(
        [r["loss"] for r in whole["losses"]], abs=1e-6
    )
    assert (
        max_diff(unet_weights(whole["final_dir"]), unet_weights(resumed["final_dir"])) <= 1e-6
    )  # EMA weights
    assert max_diff(*raw) <= 1e-6
    with pytest.raises(SlimsdError, match="not a checkpoint folder"):
        train(cfg(tmp_path, "split", max_steps=4, resume=str(tmp_path)))


def test_latent_cache_is_transparent_and_bad_rows_are_counted(tmp_path):
    from test_data import make_imagefolder

    from slimsd.train.cache import write_cache

    dirty = tmp_path / "dirty"
    dirty.mkdir()
    make_imagefolder(dirty)
    info = write_cache("micro-sd", str(dirty), tmp_path / "dirty-cache", resolution=64)
    assert info["count"] == 3 and info["skipped"] == {"missing_caption": 1, "unreadable_image": 1}
    run = train(
        cfg(tmp_path, "dirty-run", batch_size=4, max_steps=1, data=str(dirty), max_skipped_fraction=0.5)
    )
    assert run["skipped"] == {"missing_caption": 1, "unreadable_image": 1}  # counted, not a crash

    clean = tmp_path / "clean"
    clean.mkdir()
    make_imagefolder(clean)
    lines = (clean / "metadata.jsonl").read_text().splitlines()[:3]  # the three good rows
    (clean / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    write_cache("micro-sd", str(clean), tmp_path / "cache", resolution=64)
    kw = {"batch_size": 3, "max_steps": 1}
    raw = train(cfg(tmp_path, "raw", data=str(clean), **kw))
    cached = train(cfg(tmp_path, "cached", data=str(tmp_path / "cache"), **kw))
    for k in ("loss", "task", "out", "feat"):
        assert cached["losses"][0][k] == pytest.approx(raw["losses"][0][k], rel=1e-4)
    with pytest.raises(SlimsdError, match="was made at 64 px"):
        train(cfg(tmp_path, "bad", data=str(tmp_path / "cache"), resolution=32, **kw))


@pytest.mark.slow
def test_sdxl_student_distils_and_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = train(cfg(tmp_path, teacher="micro-sdxl", student="ssd-1b", max_steps=6))
    losses = [r["loss"] for r in result["losses"]]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert len(result["taps"]) == 12 and result["losses"][0]["feat"] > 0  # ssd-1b's per-layer taps
    pipe = StableDiffusionXLPipeline.from_pretrained(result["final_dir"])
    assert pipe.unet.config.mid_block_type == "UNetMidBlock2D"
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.slow(seconds=30)
@pytest.mark.xdist_group("processes")  # one multi-process test at a time (tests/conftest.py)
@pytest.mark.parametrize("objective", ["kd", "lcm", "progressive"])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, objective):
    """DDP on CPU (gloo), started the way users start it: `accelerate launch --multi_gpu --num_processes 2`.
    adam_epsilon=1e-3 keeps Adam from amplifying float-rounding differences of near-zero gradients
    (m/sqrt(v) ~ ±1 whatever their size)."""
    kw = {"max_steps": 2, "data": "shapes:8", "adam_epsilon": 1e-3, "objective": objective}
    if objective == "progressive":  # one step of each stage
        kw["progressive_steps"] = [8, 4]
    one = train(cfg(tmp_path, "one", **kw))
    two = launch_distill({**FAST, **kw, "batch_size": 2, "output_dir": tmp_path / "two"}, tmp_path)
    assert two["num_processes"] == 2
    for k in ("loss", "task", "out", "feat") if objective == "kd" else ("loss", objective):
        assert two["last"][k] == pytest.approx(one["losses"][-1][k], rel=1e-5)
    assert max_diff(unet_weights(one["final_dir"]), unet_weights(tmp_path / "two" / "final")) <= 1e-5


def test_config_file_overrides_and_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: micro-sd\nmax_steps: 5\nlearning_rate: 1.0e-4\nvalidation_prompts: [a, b]\n")
    c = load_config(path, ["max_steps=7", "mixed_precision=bf16", "resume=latest", "feature_taps=[[a, b]]"])
    assert (c.max_steps, c.learning_rate, c.mixed_precision, c.resume) == (7, 1e-4, "bf16", "latest")
    assert c.validation_prompts == ["a", "b"] and c.feature_taps == [["a", "b"]]
    code, out, _ = run_cli(["distill", "--config", str(path), "seed=3", "--dry-run"], capsys)
    assert code == 0 and "seed: 3" in out and "max_steps: 5" in out
    for args, needle in [
        (["nope=1"], "unknown config key 'nope'; allowed: teacher"),
        (["batch_size=0"], "'batch_size': 0 is out of range; allowed: >= 1"),
        (["learning_rate=0"], "allowed: > 0"),
        (["mixed_precision=fp8"], "allowed: no, fp16, bf16"),
        (["max_steps=ten"], "expected int"),
        (["resolution=60"], "multiple of 8"),
        (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        (["student=no-such-recipe", "max_steps=1"], "unknown recipe"),
    ]:
        code, _, err = run_cli(["distill", *args], capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_example_configs_resolve():
    root = Path(__file__).parents[2] / "configs"
    names = {p.name for p in root.glob("*.yaml")}
    assert {
        "micro-sd.yaml",
        "micro-sdxl.yaml",
        "bk-small.yaml",
        "bk-tiny.yaml",
        "ssd-1b.yaml",
        "micro-sd-lcm.yaml",
        "finetune-micro-sd.yaml",
    } <= names
    for p in root.glob("*.yaml"):
        if p.name.startswith("finetune-"):  # `slimsd finetune`'s key names
            finetune_config(read_values(p))
        else:
            load_config(p)
    assert load_config(root / "micro-sd.yaml").mixed_precision == "no"  # written `mixed_precision: no`


def test_cache_command(tmp_path, capsys):
    code, out, _ = run_cli(
        [
            "cache",
            "--model",
            "micro-sd",
            "--data",
            "shapes:4",
            "--out",
            str(tmp_path / "c"),
            "--resolution",
            "64",
            "--flip",
            "--json",
        ],
        capsys,
    )
    info = json.loads(out)
    assert code == 0 and info["count"] == 4 and info["flip"] and info["family"] == "sd"
    from slimsd.train.data import open_source

    source = open_source(str(tmp_path / "c"))
    row = source.read(source.rows[0])
    assert row["latent_mean"].shape == (4, 8, 8) and row["prompt_embeds"].shape == (77, 32)
    assert not torch.equal(row["latent_mean"], row["latent_mean_flip"])
    code, _, err = run_cli(
        [
            "cache",
            "--model",
            "micro-sd",
            "--data",
            "shapes:4",
            "--out",
            str(tmp_path / "c"),
            "--resolution",
            "64",
        ],
        capsys,
    )
    assert code == 2 and "holds an earlier `slimsd cache` output; pass --overwrite" in err
    assert len(err.strip().splitlines()) == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    cmd = ["cache", "--model", "micro-sd", "--data", "shapes:4", "--out", str(mine), "--resolution", "64"]
    code, _, err = run_cli([*cmd, "--overwrite"], capsys)
    assert code == 2 and "is not a `slimsd cache` output" in err  # never replaced, even with --overwrite
    assert (mine / "notes.txt").read_text() == "user data"
    code, _, err = run_cli(
        [
            "cache",
            "--model",
            "micro-sd",
            "--data",
            "shapes:4",
            "--out",
            str(tmp_path / "d"),
            "--resolution",
            "60",
        ],
        capsys,
    )
    assert code == 2 and "multiple of 8" in err


def test_a_missing_tensorboard_is_a_one_line_warning_and_training_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: `import tensorboard` fails
    result = train(cfg(tmp_path, max_steps=1, tensorboard=True))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimsd: warning:")]
    assert len(warnings) == 1, warnings
    assert "the tensorboard package is not installed" in warnings[0] and "tensorboard=false" in warnings[0]
    assert (Path(result["final_dir"]) / "slimsd.json").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow(seconds=40)
@pytest.mark.xdist_group("processes")  # one multi-process test at a time (tests/conftest.py)
def test_two_processes_equal_one_with_a_corrupt_image_in_the_data(tmp_path):
    """An image folder with a corrupt image: 2 processes (`accelerate launch`, DDP, gloo) train the weights and
    losses that 1 process with the same global batch trains, and report the same skipped rows (the sum over
    processes). 2 epochs: the corrupt image is read twice, by whichever process its slot falls to, and the
    caption-less row is dropped once, at indexing. adam_epsilon as in the test above."""
    from test_data import make_imagefolder

    dirty = tmp_path / "dirty"
    dirty.mkdir()
    make_imagefolder(dirty)  # 4 rows indexed (3 good, 1 corrupt image) and 1 dropped (no caption)
    kw = {
        "max_steps": 2,
        "data": str(dirty),
        "max_skipped_fraction": 0.5,
        "adam_epsilon": 1e-3,
    }  # 1 of 4: 0.25
    one = train(cfg(tmp_path, "one", batch_size=4, **kw))
    assert one["skipped"] == {"missing_caption": 1, "unreadable_image": 2}
    two = launch_distill({**FAST, **kw, "batch_size": 2, "output_dir": tmp_path / "two"}, tmp_path)
    assert two["num_processes"] == 2 and two["skipped"] == one["skipped"]
    info = json.loads((tmp_path / "two" / "final" / "slimsd.json").read_text())
    assert info["skipped"] == one["skipped"]
    for k in ("loss", "task", "out", "feat"):
        assert two["last"][k] == pytest.approx(one["losses"][-1][k], rel=1e-5)
    assert max_diff(unet_weights(one["final_dir"]), unet_weights(tmp_path / "two" / "final")) <= 1e-5


def test_mostly_unreadable_data_ends_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    """3 of the 4 indexed rows are corrupt images: more than max_skipped_fraction (default 0.05) of the data, so
    the run ends with one line naming the count and the key after the first step whose reads find one (not at the
    end): the rows that failed in step 1's reads, which filled both slots of its micro-batch with row 0."""
    from test_data import CORRUPT, png, recorded_reads

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.png").write_bytes(png("red") if i == 0 else CORRUPT)
        (data / f"{i}.txt").write_text("a red square")
    args = [
        "distill",
        *(f"{k}={v}" for k, v in FAST.items()),
        f"data={data}",
        f"output_dir={tmp_path / 'run'}",
    ]
    reads = recorded_reads(monkeypatch)
    code, _, err = run_cli([*args, "batch_size=2", "max_steps=20"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert [row for row, ok in reads if ok] == [0, 0]  # step 1 only: its 2 slots, each filled by row 0
    bad = {row for row, ok in reads if not ok}
    assert bad and (
        f"{len(bad)} of its 4 rows could not be read by step 1" in err and "max_skipped_fraction 0.05" in err
    )
