import json
import shlex
import sys
from pathlib import Path

import click

from slimsd.commands.options import (
    allow_pickle_option,
    deep_cache_option,
    device_option,
    dtype_option,
    optimize_option,
    prediction_type_option,
    random_weights_option,
)


@click.command()
@click.option(
    "--models",
    "models",
    multiple=True,
    required=True,
    help="Models to compare (preset, micro, local folder or hub id); repeat the option or list them "
    "after it: --models sd-v1.4 bk-sdm-small. The first is the reference of the ratios.",
)
@click.argument("more_models", nargs=-1)
@click.option(
    "--resolution",
    type=click.IntRange(64, 4096),
    default=None,
    help="Image size in pixels (default: each model's own: 512 SD, 1024 SDXL, 64 micro).",
)
@click.option(
    "--steps",
    type=click.IntRange(1, 1000),
    default=None,
    help="Denoising steps of the end-to-end run (default: a step-distilled model's own, else 25 on a GPU, 4 "
    "on CPU).",
)
@device_option
@dtype_option
@random_weights_option
@click.option(
    "--baseline",
    type=click.Choice(["diffusers"]),
    default=None,
    help="Also run plain diffusers (same weights), interleaved with slimsd: in slimsd's dtype (like for like) "
    "and in diffusers' default dtype, fp32 (what a user gets without slimsd); one row each.",
)
@click.option(
    "--batch-sizes",
    default=None,
    help="Comma-separated batch sizes for images/s (default: 1 on CPU, 1,4 on a GPU).",
)
@click.option(
    "--warmup",
    type=click.IntRange(0, 100),
    default=1,
    show_default=True,
    help="Untimed U-Net forwards per model before timing.",
)
@click.option(
    "--repeats",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="Timed U-Net forwards per model (the median is reported).",
)
@click.option(
    "--e2e/--no-e2e",
    default=True,
    show_default=True,
    help="Also run the whole pipeline (text encoding, denoising, VAE decoding).",
)
@click.option(
    "--e2e-repeats",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Timed end-to-end runs per variant and batch size (alternating between variants; the median is kept).",
)
@deep_cache_option
@optimize_option
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the U-Net (warm-up reported apart).")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--fuse-qkv/--no-fuse-qkv", default=True, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="torch intra-op threads.")
@click.option("--prompt", default=None, help="Prompt of the end-to-end runs.")
@allow_pickle_option
@prediction_type_option
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder (a `vae-decoder` run's final/ folder, or a TAESD-layout .safetensors file) every row decodes with instead of the model's "
    "VAE (the diffusers rows too: pipe.vae = AutoencoderTiny); the rows record it.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the rows (one per model) as JSON to this file.",
)
@click.option(
    "--markdown",
    "md_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the Markdown table to this file.",
)
@click.option(
    "--chart",
    "chart_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bar chart (PNG) here (default: beside --json, same name, .png).",
)
def bench(
    models,
    more_models,
    resolution,
    steps,
    device,
    dtype,
    random_weights,
    baseline,
    batch_sizes,
    warmup,
    repeats,
    e2e,
    e2e_repeats,
    deep_cache,
    optimize,
    compile_,
    channels_last,
    fuse_qkv,
    threads,
    prompt,
    allow_pickle,
    prediction_type,
    vae,
    json_path,
    md_path,
    chart_path,
):
    """Latency, memory, parameters and MACs of MODELS, side by side (Markdown table, JSON, chart)."""
    from slimsd.atomic import atomic_write_bytes, atomic_write_text
    from slimsd.cli import require
    from slimsd.errors import SlimsdError

    if json_path or chart_path:
        require("matplotlib")  # the chart: before minutes of benchmarking, not after
    from slimsd.measure import bench as b

    sizes = None
    if batch_sizes:
        try:
            sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
        except ValueError:
            raise SlimsdError(
                f"--batch-sizes {batch_sizes!r} is not a comma-separated list of integers"
            ) from None
    cfg = b.BenchConfig(
        models=[*models, *more_models],
        resolution=resolution,
        steps=steps,
        device=device,
        dtype=dtype,
        random_weights=random_weights,
        baseline=baseline,
        batch_sizes=sizes,
        warmup=warmup,
        repeats=repeats,
        e2e=e2e,
        e2e_repeats=e2e_repeats,
        deep_cache=1 if deep_cache is None else deep_cache,
        optimize=optimize,
        compile=compile_,
        channels_last=channels_last,
        fuse_qkv=fuse_qkv,
        threads=threads,
        prompt=prompt or b.DEFAULT_PROMPT,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
        vae=vae,
    )
    rows = b.run(cfg, log=lambda msg: click.echo(msg, err=True))
    table = b.markdown_table(rows)
    click.echo(table)
    if md_path:  # a results file says how it was made
        command = "slimsd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        atomic_write_text(md_path, f"Command: `{command}`\n\n{table}")
    if json_path:
        atomic_write_text(json_path, json.dumps(rows, indent=1) + "\n")
        chart_path = chart_path or str(Path(json_path).with_suffix(".png"))
    if chart_path:
        atomic_write_bytes(chart_path, b.chart_png(rows))
        click.echo(f"chart: {chart_path}", err=True)
