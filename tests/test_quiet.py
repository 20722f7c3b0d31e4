"""Quiet, clear output: each command prints its own lines and nothing from the libraries.

The commands run as subprocesses, as a user runs them: stderr is then not a terminal, so slimsd's own
progress bars stay off (slimsd.progress), and any bar or warning left in the output came from a library.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slimsd.cli import COMMANDS

from helpers import SMALL_DEMO, tiny_decoder_folder

ROOT = Path(__file__).resolve().parents[1]

CHATTER = (
    "Loading pipeline components",
    "it/s]",
    "s/it]",
    "WARNING",
    "Warning:",
    "warn(",
    "FutureWarning",
    "DeprecationWarning",
    "UserWarning",
)
STAND_IN = ["--fid-extractor", "stand-in", "--clip-model", "none"]  # offline scorers
PNG = r"\S+/\d{5}-\d+-a-red-circle\.png"

# (command line, the lines it may print: each output line must match one of these in full)
CASES = {
    "generate": (
        ["generate", "micro-sd", "a red circle", "--steps", "2", "--num-images", "2", "--out", "{tmp}/g"],
        [rf"{PNG}  seed \d+  \d+\.\d\d s", r"\S+/grid-\d{5}-a-red-circle\.png  \(grid\)"],
    ),
    "compress": (
        ["compress", "--teacher", "micro-sd", "--recipe", "bk-small", "--out", "{tmp}/c"],
        [
            r"wrote \S+/c: U-Net [\d,]+ params \([\d.]+% fewer than the teacher's [\d,]+\); \d+ tensors inherited "
            r"by recipe bk-small"
        ],
    ),
    "inspect": (
        ["inspect", "micro-sd"],
        [
            r"micro-sd \(micro\) at 64 px",
            r"  (U-Net|text encoder|VAE|total) +[\d,]+ params( +[\d.]+M MACs)?",
            r"    down [\d.]+M  mid [\d.]+M  up [\d.]+M",
            r"  VAE decoder +[\d,]+ params +[\d.]+[MG] MACs",
            r"  tiny decoder +[\d,]+ params +[\d.]+[MG] MACs  \(micro-tiny-decoder; the VAE decoder has [\d.]+x its MACs\)",
        ],
    ),
    "cache": (
        ["cache", "--model", "micro-sd", "--data", "shapes:4", "--out", "{tmp}/k", "--resolution", "64"],
        [r"wrote \S+/k: 4 examples in 1 shard\(s\)"],
    ),
    "data": (
        ["data", "shapes:4", "--filter", "len(caption) > 3", "--grid", "{tmp}/g.png"],
        [
            r"data 'shapes:4' \(shapes\): 4 rows found",
            r"dropped at indexing: none",
            r"filter 'len\(caption\) > 3': removed 0, 4 left",
            r"kept: 4 rows",
            r"read a sample of 4 kept rows: 4 readable, 0 unreadable",
            r"(caption|image) [a-z ]+: min .* mean [\d.]+",
            r"grid: wrote \S+/g\.png \(4 images\)",
        ],
    ),
    "distill": (
        [
            "distill",
            "data=shapes:4",
            "batch_size=2",
            "max_steps=2",
            "output_dir={tmp}/run",
            "tensorboard=false",
        ],
        [r"wrote \S+/run/final after 2 steps; last loss [\d.]+ \(task [\d.]+, out [\d.]+, feat [\d.]+\)"],
    ),
    "bench": (
        ["bench", "--models", "micro-sd", "--device", "cpu", "--no-e2e", "--repeats", "1"],
        [
            r"step latency: micro-sd x slimsd round-robin, 1 warm-up \+ 1 timed forwards",
            r"\|.*\|",
            r"",
            r"\d{4}-\d\d-\d\dT\S+ · cpu .*",
        ],
    ),
    "eval": (
        [
            "eval",
            "--models",
            "micro-sd",
            "--prompts",
            "{tmp}/p.csv",
            "--out",
            "{tmp}/e",
            "--steps",
            "1",
            *STAND_IN,
        ],
        [r"micro-sd: (generating|scoring) .*", r"micro-sd: FID .*\(2 images\)", r"wrote \S+ and \S+"],
    ),
    "export": (  # with a tiny decoder written beside the model (test_command_prints_only_its_own_lines makes it)
        [
            "export",
            "micro-sdxl",
            "--to",
            "single-file",
            "--vae",
            "{tmp}/decoder-micro-sdxl",
            "--out",
            "{tmp}/m.safetensors",
        ],
        [
            r"wrote \S+/m\.safetensors \(fp16, single-file original layout\)",
            r"wrote \S+/m\.taesd_decoder\.safetensors \(fp16, tiny decoder, TAESD layout\)",
        ],
    ),
    "export-openvino": (
        ["export", "micro-sd", "--to", "openvino", "--out", "{tmp}/ov", "--resolution", "64"],
        [
            r"loading micro-sd",
            r"exporting (unet|text_encoder|vae_decoder|vae_encoder) to openvino",
            r"wrote \S+/ov \(openvino, fp32, sd, shapes 64x64\)",
        ],
    ),
    "quantize": (
        [
            *("quantize", "micro-sd", "--out", "{tmp}/q", "--calibration-prompts", "1"),
            *("--sensitivity-layers", "2", "--weight-only", "vae_decoder"),
        ],
        [
            r"loading micro-sd",
            r"calibrating on 1 prompts along the model's own sampling trajectory",
            r"exporting (unet|text_encoder|vae_decoder|vae_encoder) to openvino",
            r"quantising the U-Net \(int8, openvino\)",
            r"int8 weights for vae_decoder",
            r"measuring per-layer sensitivity",
            r"wrote \S+/q \(openvino, int8; calibrated on 1 prompts x \d+ steps, \d+ U-Net inputs; \d+ layers "
            r"kept; U-Net [\d.]+x smaller on disk\)",
        ],
    ),
    "demo": (
        ["demo", "--out", "{tmp}/d", *SMALL_DEMO],
        [
            r"compressed toy-sd with bk-small: U-Net [\d,]+ -> [\d,]+ parameters",
            r"step-distilling the KD student with LCM \(objective=lcm\), 2 steps, to sample in 2 steps \.\.\.",
            r"  done in \d+ s",
            r"distilling the teacher's VAE decoder into micro-tiny-decoder \(objective=vae-decoder\), 2 steps of "
            r"batch 4 \.\.\.",
            r"training (KD student|task-only student) \(.*\), 2 steps of batch 4 \.\.\.",
            r"  done in \d+ s; task loss over the last 2 steps [\d.]+",
            r"quantising LCM student \(KD\+LCM\) to int8 for OpenVINO, calibrated on 16 captions along its own "
            r"sampling trajectory \.\.\.",
            r"sampling (teacher \(toy-sd\)|KD student|task-only student|LCM student \(KD\+LCM\)|LCM student \+ "
            r"tiny decoder|LCM student int8 \(OpenVINO\)): 1 seeds x 2 captions of seen and of held-out combinations",
            r"model +steps +fidelity seen +held-out +colour +shape +U-Net params +step ms +image ms",
            r"-+",
            r"(teacher \(toy-sd\)|KD student|task-only student|LCM student \(KD\+LCM\)|LCM student \+ tiny "
            r"decoder|LCM student int8 \(OpenVINO\)) +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d,]+ +[\d.]+ +[\d.]+",
            r"KD student keeps \d+% of the teacher's caption fidelity \(seen combinations\); the task-only "
            r"student \d+%\. colour, shape: accuracy on seen combinations\.",
            r"LCM student: \d+% of the teacher's fidelity in 2 steps, an image [\d.]+x faster \(image ms: end to "
            r"end, each model at its own steps and guidance\)\.",
            r"LCM student \+ tiny decoder: \d+% of the LCM student's fidelity with the full VAE, an image [\d.]+x "
            r"faster than the teacher's\.",
            r"int8 LCM student \(OpenVINO, slimsd quantize\): \d+% of the fp32 LCM student's fidelity, an image "
            r"[\d.]+x as fast at the same steps\.",
            r"results.json and the sample sheet \(sheet.png\) in \S+/d",
            r"the table, the sample sheet and what each column means: \S+/d/index.html",
        ],
    ),
}


def slimsd(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "slimsd.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,  # the small demo: ~2 min alone, > 5 min beside other jobs on the 2-core machine
    )


def assert_quiet(output: str, allowed: list[str]) -> None:
    """No library chatter, and every line one of the command's own."""
    for word in CHATTER:
        assert word not in output, f"{word!r} in the output:\n{output}"
    for line in output.splitlines():
        assert any(re.fullmatch(p, line) for p in allowed), f"not one of slimsd's lines: {line!r}\n{output}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_command_prints_only_its_own_lines(name, tmp_path):
    args, allowed = CASES[name]
    (tmp_path / "p.csv").write_text("caption\na red circle\na blue square\n")
    if "{tmp}/decoder-micro-sdxl" in args:
        tiny_decoder_folder(tmp_path, "micro-sdxl")
    r = slimsd([a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_quiet(r.stdout + r.stderr, allowed)


@pytest.mark.parametrize(
    "args",
    [
        ["presets"],
        ["--help"],
        *([c, "--help"] for c in COMMANDS if c != "presets"),
    ],
)
def test_help_and_presets_do_not_import_torch(args):
    """And they succeed: the exit code is checked (a `--help` that exits 2 is a failure, not a pass)."""
    code = (
        "import sys\nfrom slimsd.cli import main\nstatus = 0\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    status = e.code or 0\n"
        "print(status, sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "0 []", r.stdout + r.stderr


API = """
import sys
import tempfile

import slimsd
from slimsd.run.generate import generate
from slimsd.train.config import load_config
from slimsd.train.distill import train

with tempfile.TemporaryDirectory() as tmp:
    generate(slimsd.load("micro-sd"), "a red circle", steps=2, seed=1)
    generate(slimsd.load("toy-sd"), "a red circle", steps=2, seed=1)  # a committed folder: from_pretrained
    slimsd.compress("micro-sd", "bk-small", tmp + "/c")
    # the trainer's final/ (a pipeline folder; a tiny decoder), without its own progress bar
    run = ["data=shapes:4", "batch_size=2", "max_steps=1", "resolution=64", "progress=false", "tensorboard=false"]
    train(load_config(None, ["teacher=micro-sd", "student=bk-small", "output_dir=" + tmp + "/kd", *run]))
    train(load_config(sys.argv[1], ["output_dir=" + tmp + "/vae", *run]))
"""


@pytest.mark.slow(seconds=30)
def test_the_python_api_is_as_quiet_as_the_commands():
    """What a notebook user sees: every warning shown (-W always), stdout and stderr captured. diffusers'
    FutureWarning about torch_dtype, its "modules ... should be kept in float32" lines, transformers' torchvision
    fallback notes and "Writing model shards" bars used to appear (the bars from the trainer's final/ until
    late)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-W", "always", "-c", API, str(ROOT / "configs" / "micro-sd-tiny-decoder.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout + r.stderr == ""
