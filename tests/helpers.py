"""Test helpers: run the CLI in-process and capture its exit code and output; start `slimsd distill` under
`accelerate launch`; compare trained weights; read the tables of an HTML report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

# `slimsd demo` in seconds: every phase and row runs, on a few images and steps (the tests of its output)
SMALL_DEMO = [
    "--steps",
    "2",
    "--data-images",
    "8",
    "--batch-size",
    "4",
    "--eval-seeds",
    "1",
    "--eval-prompts",
    "2",
    "--inference-steps",
    "2",
    "--lcm-steps",
    "2",
    "--lcm-inference-steps",
    "2",
    "--decoder-steps",
    "2",
    "--threads",
    "1",
]


def benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine_cpu_dtype() -> str:
    """What slimsd's CPU ``auto`` dtype should be on this machine, read here from /proc/cpuinfo, not through
    slimsd: SLIMSD_CPU_DTYPE where set, else bf16 where the CPU lists avx512_bf16 or amx_bf16 (and oneDNN is
    there), else fp32."""
    import torch

    forced = os.environ.get("SLIMSD_CPU_DTYPE", "").strip()
    if forced:
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return "bf16" if native and torch.backends.mkldnn.is_available() else "fp32"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``slimsd ARGS``, run in this process."""
    from slimsd.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


# A distillation config that trains in seconds on micro-sd (tests of the trainer and its objectives).
FAST_DISTILL = {
    "teacher": "micro-sd",
    "student": "bk-small",
    "data": "shapes:16",
    "batch_size": 4,
    "learning_rate": 1e-3,
    "checkpoint_every": 0,
    "progress": False,
    "tensorboard": False,
    "resolution": 64,
}


def cfg(tmp_path, name="run", **kw):
    """A FAST_DISTILL config writing to tmp_path / name, with ``kw`` on top."""
    from slimsd.train.config import DistillConfig

    return DistillConfig(**{**FAST_DISTILL, "output_dir": str(tmp_path / name), **kw})


def whole_and_resumed(tmp_path, **keys) -> tuple[dict, dict, list[dict]]:
    """Four optimizer steps (accumulation, EMA, a warm-up schedule, checkpoints every 2) in one run ("whole")
    and in two ("split": stopped after step 2 as if killed, then ``resume=latest``): (the whole run's result,
    the resumed run's result, the step-4 checkpoint weights of each). KEYS: the config under test."""
    from safetensors.torch import load_file

    from slimsd.train.distill import train

    common = {
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "ema": True,
        "ema_decay": 0.9,
        "lr_scheduler": "linear",
        "lr_warmup_steps": 2,
        "checkpoint_every": 2,
        **keys,
    }
    whole = train(cfg(tmp_path, "whole", max_steps=4, **common))
    first = train(cfg(tmp_path, "split", max_steps=4, stop_at_step=2, **common))  # as if killed after step 2
    assert first["steps"] == 2 and first["final_dir"] is None
    resumed = train(cfg(tmp_path, "split", max_steps=4, resume="latest", **common))
    assert resumed["resumed_from"].endswith("step-00000002")
    raw = [
        load_file(str(tmp_path / d / "checkpoints" / "step-00000004" / "student.safetensors"))
        for d in ("whole", "split")
    ]
    return whole, resumed, raw


def unet_weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def tiny_decoder_folder(tmp_path, model: str, **config):
    """A micro tiny decoder for MODEL's latent space (seeded weights, untrained) saved as a plain diffusers
    AutoencoderTiny folder, with CONFIG registered on top (e.g. a wrong scaling_factor)."""
    from slimsd.models.decoders import build_tiny_decoder
    from slimsd.models.micro import build_micro

    vae_config = dict(build_micro(model).vae.config)
    decoder = build_tiny_decoder("micro-tiny-decoder", vae_config, seed=1)
    if config:
        decoder.register_to_config(**config)
    folder = tmp_path / f"decoder-{model}"
    decoder.save_pretrained(folder, safe_serialization=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_distill(
    overrides: dict, cwd: Path, num_processes: int = 2, config_file: Path | None = None
) -> dict:
    """`accelerate launch [--config_file F] --num_processes N -m slimsd.cli distill KEY=VALUE ... --json` on
    CPUs (gloo), the way users start it; the summary the main process prints. Without a config file: plain
    DDP (`--multi_gpu`: `--cpu --num_processes 2` starts ONE process in accelerate 1.x unless mpirun is set
    up; train() passes cpu=True to the Accelerator itself when launched without CUDA)."""
    values = [f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}" for k, v in overrides.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.pop("ACCELERATE_USE_CPU", None)
    if config_file is None:
        launch = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        launch = ["--config_file", str(config_file)]
    launch += ["--num_processes", str(num_processes), "--mixed_precision", "no"]
    launch += ["--main_process_port", str(free_port())]
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(accelerate), "launch", *launch, "-m", "slimsd.cli", "distill", *values, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{") :])  # printed once, by the main process


def sd_ddim(steps: int, prediction_type: str = "epsilon", set_alpha_to_one: bool = True):
    """diffusers' DDIMScheduler on SD's noise schedule with trailing spacing and no clipping, set to ``steps``
    (the reference the step-distillation objectives are checked against)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=set_alpha_to_one,
        clip_sample=False,
    )
    sched.set_timesteps(steps)
    return sched


def assert_generate_uses_own_sampling(pipe, final_dir, want: tuple, out_dir, capsys) -> None:
    """`slimsd generate FINAL PROMPT` with no steps or guidance samples with ``want`` = (steps, guidance,
    scheduler name) under either CPU default (SLIMSD_CPU_DTYPE), and in fp32 pixel for pixel what plain
    diffusers' fp32 ``pipe`` gives with those settings."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red circle",
        num_inference_steps=want[0],
        guidance_scale=want[1],
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]
    args = ["generate", str(final_dir), "a red circle", "--seed", "7", "--no-optimize", "--json"]
    before, images = os.environ.get("SLIMSD_CPU_DTYPE"), {}
    try:
        for default in ("fp32", "bf16"):
            os.environ["SLIMSD_CPU_DTYPE"] = default
            code, out, err = run_cli([*args, "--out", str(Path(out_dir) / default)], capsys)
            assert code == 0, err
            info = json.loads(out)
            settings = info["settings"]
            got = (settings["steps"], settings["guidance"], settings["scheduler"], settings["dtype"])
            assert got == (*want, default)
            images[default] = info["images"][0]["path"]
    finally:
        os.environ.pop("SLIMSD_CPU_DTYPE") if before is None else os.environ.update(SLIMSD_CPU_DTYPE=before)
    ours = np.asarray(Image.open(images["fp32"])).astype(int)
    assert np.abs(ours - np.round(ref * 255).astype(int)).max() <= 1


def guided_step_draws(teacher, batch, gen, high: int, guidance: tuple[float, float] = (2.0, 4.0)):
    """What the trainer draws for one micro-batch of a guided step-distilling objective, in its order, and the
    latents it makes: (schedule indices in [0, high), noise, latents, CFG scales), caption dropout 0."""
    import torch

    n = len(batch["caption"])
    index = torch.randint(0, high, (n,), generator=gen)
    dist = teacher.vae.encode(batch["pixels"]).latent_dist
    noise = torch.randn(dist.mean.shape, generator=gen)
    latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)) * 0.18215
    torch.rand(n, generator=gen)  # the caption-dropout draw
    scale = guidance[0] + (guidance[1] - guidance[0]) * torch.rand(
        n, generator=gen
    )  # guidance_min + span · U
    return index, noise, latents, scale


def encode_prompts(pipe, texts: list[str]):
    """CLIP text embeddings as SD's pipeline computes them."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


# The browser tests' Chromium (`make test` installs it) and its headless flags.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class HtmlTables(HTMLParser):
    """The tables of a report page, by table id: ``tables[id]`` is a list of rows, each {data-metric: text} (cells
    without the attribute are left out); ``images`` lists the ``src`` of every <img>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images = {}, []
        self._table = self._row = self._metric = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._metric = a.get("data-metric")
            if self._metric is not None:
                self._row[self._metric] = ""
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "td":
            self._metric = None

    def handle_data(self, data):
        if self._metric is not None and self._row is not None:
            self._row[self._metric] += data


def html_tables(text: str) -> HtmlTables:
    parsed = HtmlTables()
    parsed.feed(text)
    return parsed
