"""Options that several commands share, written once: the model list, device, dtype, runtime, pickle policy.

No torch import here: ``slimsd CMD --help`` stays fast. ``DTYPE_CHOICES`` is checked against
``slimsd.devices.DTYPE_CHOICES`` by the tests.
"""

from __future__ import annotations

import click

DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


def split_models(values) -> list[str]:
    """``--models A B``, ``--models A --models B`` and ``--models A,B`` alike -> [A, B]."""
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


def device_option(f):
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto | cpu | cuda | cuda:N | mps (auto: cuda when available, else cpu).",
    )(f)


def dtype_option(f):
    return click.option(
        "--dtype",
        type=click.Choice(DTYPE_CHOICES),
        default="auto",
        show_default=True,
        help="auto: fp16 on a GPU, bf16 on a CPU with native bf16 (AVX512-BF16/AMX), else fp32.",
    )(f)


def optimize_option(f):
    return click.option(
        "--optimize/--no-optimize",
        default=True,
        show_default=True,
        help="The fast runtime (channels_last, fused QKV, SDPA); --no-optimize runs plain diffusers.",
    )(f)


def allow_pickle_option(f):
    return click.option(
        "--allow-pickle", is_flag=True, help="Allow loading pickle (.bin/.ckpt) weights: they can run code."
    )(f)


PREDICTION_TYPES = ("epsilon", "v_prediction")  # checked against slimsd.models.single_file by the tests


def prediction_type_option(f):
    return click.option(
        "--prediction-type",
        type=click.Choice(PREDICTION_TYPES),
        default=None,
        help="What the model predicts, overriding what it says (default: its own; a single .safetensors file "
        "without slimsd's metadata: epsilon for SD 1.x/SDXL, required for SD 2.x).",
    )(f)


def random_weights_option(f):
    return click.option(
        "--random-weights",
        is_flag=True,
        help="Presets with random weights (offline; benchmarks, smoke runs).",
    )(f)


def deep_cache_option(f):
    return click.option(
        "--deep-cache",
        type=int,
        default=None,
        metavar="N",
        help="DeepCache: run the whole U-Net every N steps, reuse its deep features in between "
        "(1-50; default 1: off). Faster, approximate.",
    )(f)


def lora_option(f):
    return click.option(
        "--lora",
        "loras",
        multiple=True,
        metavar="FILE[:SCALE]",
        help="Merge a LoRA into the model at load (diffusers or kohya/A1111 .safetensors; SCALE default 1; "
        "repeatable). A teacher's LoRA on a slimsd student reaches the layers copied from the teacher's.",
    )(f)


def runtime_options(f):
    """--device, --dtype, --optimize/--no-optimize, --allow-pickle and --prediction-type: every command that
    runs a model."""
    for option in (prediction_type_option, allow_pickle_option, optimize_option, dtype_option, device_option):
        f = option(f)
    return f


def filter_option(
    help_text: str = "Keep rows by metadata, e.g. 'aesthetic >= 7.5' (repeatable; after the config's "
    "data_filter).",
):
    """--filter RULE (repeatable) as ``rules``: rows kept by their metadata (slimsd.train.filters)."""

    def decorate(f):
        return click.option("--filter", "rules", multiple=True, metavar="RULE", help=help_text)(f)

    return decorate
