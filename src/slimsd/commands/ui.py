import click

from slimsd.commands.options import lora_option, runtime_options, split_models


@click.command()
@click.option(
    "--models",
    "models",
    multiple=True,
    help="Models offered: `--models A B C`, repeated, or comma-separated; presets, micro-sd, micro-sdxl, "
    "toy-sd, folders, hub ids. Default: the micro models, toy-sd and every preset.",
)
@click.argument("more_models", nargs=-1)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--share", is_flag=True, help="Also open a public gradio.live link (off by default).")
@click.option(
    "--out",
    default="outputs/ui",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where generated PNGs are written.",
)
@runtime_options
@lora_option
@click.option(
    "--allow-custom-models",
    is_flag=True,
    help="Let visitors type any model name, folder or hub id (off: only --models are served). "
    "--allow-pickle never applies to a visitor's model.",
)
@click.option(
    "--vae",
    "vaes",
    multiple=True,
    metavar="[NAME=]PATH",
    help="A tiny decoder (a `vae-decoder` run's final/ folder, or a TAESD-layout .safetensors file) offered as a decoder choice beside 'full' (the "
    "model's VAE); named 'tiny' unless NAME is given; repeat with names for several.",
)
@click.option(
    "--max-loaded",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Models kept in memory at once.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Generations running at once.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1, 10_000),
    default=16,
    show_default=True,
    help="Requests waiting beyond this are refused.",
)
def ui(
    models,
    more_models,
    host,
    port,
    share,
    out,
    device,
    dtype,
    optimize,
    allow_pickle,
    prediction_type,
    loras,
    allow_custom_models,
    vaes,
    max_loaded,
    concurrency,
    max_queue,
):
    """The web UI: generate with the listed models, and compare them side by side (endpoint /generate)."""
    from pathlib import Path

    from slimsd.devices import resolve_device, resolve_dtype
    from slimsd.run.ui import UIConfig, default_models, launch, parse_decoders

    resolve_dtype(dtype, resolve_device(device))  # bad --device/--dtype: one line now, not per request
    from slimsd.cli import require
    from slimsd.models.loading import describe_model
    from slimsd.models.lora import parse_lora_spec

    require("gradio")

    names = split_models((*models, *more_models)) or default_models()
    for name in names:  # the operator's list: a typo is one line now, not a visitor's error later
        describe_model(name)
    loras = [parse_lora_spec(spec, allow_pickle) for spec in loras]  # a bad file: one line now
    decoders = parse_decoders(vaes)  # a bad folder: one line now
    config = UIConfig(
        models=names,
        out_dir=Path(out),
        device=device,
        dtype=dtype,
        optimize=optimize,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
        allow_custom_models=allow_custom_models,
        max_loaded=max_loaded,
        concurrency=concurrency,
        max_queue=max_queue,
        loras=loras,
        vaes=decoders,
    )
    with_loras = f"; LoRAs: {', '.join(f'{p}:{s:g}' for p, s in loras)}" if loras else ""
    with_loras += f"; decoders: full, {', '.join(decoders)}" if decoders else ""
    click.echo(
        f"slimsd ui on http://{host}:{port} (models: {', '.join(names)}{with_loras}; images to {out})",
        err=True,
    )
    launch(config, host=host, port=port, share=share)
