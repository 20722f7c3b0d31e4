"""``slimsd export SOURCE --to TARGET --out FILE``: a model or a LoRA in a form other tools load."""

import click

from slimsd.commands.options import allow_pickle_option, prediction_type_option

TARGETS = ("single-file", "a1111-lora")


@click.command()
@click.argument("source")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(TARGETS),
    help="single-file: the whole pipeline as one .safetensors in the original layout (A1111, ComfyUI, "
    "Fooocus, SD.Next, diffusers' from_single_file). a1111-lora: a LoRA file or a `slimsd finetune` output "
    "as a kohya/A1111 LoRA (lora_unet_..., lora_down/lora_up/alpha).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file (.safetensors).")
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default="fp16",
    show_default=True,
    help="single-file: precision of the written weights.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@allow_pickle_option
@prediction_type_option
def export(source, target, out, dtype, overwrite, allow_pickle, prediction_type):
    """Write SOURCE (single-file: a preset, micro model, folder, single file or hub id; a1111-lora: a LoRA file
    or a folder holding pytorch_lora_weights.safetensors) for use in other tools."""
    if target == "single-file":
        from slimsd.models.single_file_export import export_single_file

        path = export_single_file(
            source,
            out,
            dtype=dtype,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            prediction_type=prediction_type,
        )
        click.echo(f"wrote {path} ({dtype}, single-file original layout)")
    else:
        from slimsd.models.lora import export_a1111_lora

        result = export_a1111_lora(source, out, overwrite=overwrite)
        click.echo(f"wrote {result['out']} ({result['layers']} layers, kohya/A1111 LoRA layout)")
