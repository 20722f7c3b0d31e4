import click

# --to FORMAT -> "module:function(src, out) -> dict"; each writer checks its input and writes atomically.
FORMATS = {
    "a1111-lora": "slimsd.models.lora:export_a1111_lora",
}


@click.command()
@click.argument("source")
@click.option("--to", "fmt", type=click.Choice(list(FORMATS)), required=True, help="The format to write.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The file to write.")
def export(source, fmt, out):
    """Write SOURCE in another tool's format. a1111-lora: a LoRA file, or a `slimsd finetune` output folder,
    as a kohya/A1111 LoRA (lora_unet_..., lora_down/lora_up/alpha) for AUTOMATIC1111, ComfyUI, kohya_ss."""
    import importlib

    module, function = FORMATS[fmt].split(":")
    result = getattr(importlib.import_module(module), function)(source, out)
    click.echo(f"wrote {result['out']} ({result['layers']} layers)")
