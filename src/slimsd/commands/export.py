"""``slimsd export MODEL --to TARGET --out FILE``: a model in a form other tools load (one branch per target)."""

import click

from slimsd.commands.options import allow_pickle_option, prediction_type_option

TARGETS = ("single-file",)


@click.command()
@click.argument("model")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(TARGETS),
    help="single-file: the whole pipeline as one .safetensors in the original layout (A1111, ComfyUI, "
    "Fooocus, SD.Next, diffusers' from_single_file).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file.")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="Precision of the written weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@allow_pickle_option
@prediction_type_option
def export(model, target, out, dtype, overwrite, allow_pickle, prediction_type):
    """Write MODEL (preset, micro model, folder, single file or hub id) for use in other tools."""
    if target == "single-file":
        from slimsd.models.single_file import export_single_file

        path = export_single_file(
            model,
            out,
            dtype=dtype,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            prediction_type=prediction_type,
        )
        click.echo(f"wrote {path} ({dtype}, single-file original layout)")
