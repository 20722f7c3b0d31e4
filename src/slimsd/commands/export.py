"""``slimsd export SOURCE --to TARGET --out FILE``: a model or a LoRA in a form other tools load."""

import click

from slimsd.commands.options import allow_pickle_option, prediction_type_option
from slimsd.errors import SlimsdError

TARGETS = ("single-file", "a1111-lora", "onnx", "openvino")


@click.command()
@click.argument("source")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(TARGETS),
    help="single-file: the whole pipeline as one .safetensors in the original layout (A1111, ComfyUI, "
    "Fooocus, SD.Next, diffusers' from_single_file); a tiny decoder folder as one .safetensors in TAESD's "
    "layout (taesd_decoder.safetensors: ComfyUI's models/vae_approx). a1111-lora: a LoRA file or a `slimsd finetune` output "
    "as a kohya/A1111 LoRA (lora_unet_..., lora_down/lora_up/alpha). onnx / openvino: a folder that ONNX "
    "Runtime / OpenVINO run (optimum's layout; slimsd generate, ui, eval and bench load it).",
)
@click.option(
    "--out", required=True, type=click.Path(), help="Output file (.safetensors) or folder (onnx, openvino)."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp16", "bf16", "fp32"]),
    default=None,
    help="single-file: precision of the written weights (default fp16). openvino: fp32 (default), fp16 weights, "
    "or bf16 (fp16 weights, bf16 compute); onnx: fp32.",
)
@click.option(
    "--resolution",
    default=None,
    help="onnx / openvino: fix the image size, WxH (e.g. 512x512): static shapes, faster; other sizes are "
    "refused at generate time. Default: dynamic shapes.",
)
@click.option(
    "--batch", type=int, default=None, help="onnx / openvino: fix the images per call (static batch)."
)
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder (a `vae-decoder` run's final/ folder, or a TAESD-layout .safetensors file). onnx / "
    "openvino: exported as vae_decoder/ in place of the model's VAE decoder (such an export decodes only: no "
    "vae_encoder/, no img2img). single-file: written beside --out as NAME.taesd_decoder.safetensors (TAESD's "
    "layout); the model file keeps its own VAE and records the companion's name and sha256.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@allow_pickle_option
@prediction_type_option
def export(source, target, out, dtype, resolution, batch, vae, overwrite, allow_pickle, prediction_type):
    """Write SOURCE (single-file: a preset, micro model, folder, single file or hub id, or a tiny decoder folder;
    a1111-lora: a LoRA file or a folder holding pytorch_lora_weights.safetensors) for use in other tools."""
    if target in ("onnx", "openvino"):
        from slimsd.models.exporting import export_runtime

        record = export_runtime(
            source,
            out,
            target,
            resolution=resolution,
            batch=batch,
            dtype=dtype or "fp32",
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
            vae=vae,
            on_phase=lambda m: click.echo(m, err=True),
        )
        shapes = "x".join(map(str, record["resolution"])) if record["resolution"] else "dynamic"
        tiny = ", tiny decoder" if record.get("vae") else ""
        click.echo(
            f"wrote {out} ({target}, {record['precision']}, {record['family']}, shapes {shapes}{tiny})"
        )
        return
    if resolution is not None or batch is not None:
        raise SlimsdError(f"--resolution and --batch apply to --to onnx / openvino, not {target}")
    if vae is not None and target != "single-file":
        raise SlimsdError(f"--vae applies to --to single-file / onnx / openvino, not {target}")
    dtype = dtype or "fp16"
    if target == "single-file":
        _single_file(source, out, dtype, vae, overwrite, allow_pickle, prediction_type)
    else:
        from slimsd.models.lora import export_a1111_lora

        result = export_a1111_lora(source, out, overwrite=overwrite)
        click.echo(f"wrote {result['out']} ({result['layers']} layers, kohya/A1111 LoRA layout)")


def _single_file(source, out, dtype, vae, overwrite, allow_pickle, prediction_type) -> None:
    """A model as one file in the original layout (with a tiny decoder beside it: --vae), or a tiny decoder
    folder as one file in TAESD's layout; one line per file written."""
    from slimsd.models.decoders import is_decoder_folder
    from slimsd.models.single_file_export import companion_path, export_decoder_file, export_single_file

    if is_decoder_folder(source):
        if vae is not None:
            raise SlimsdError(
                f"{source!r} is a tiny decoder folder, exported by itself; --vae goes with a model"
            )
        path = export_decoder_file(source, out, dtype=dtype, overwrite=overwrite)
        click.echo(f"wrote {path} ({dtype}, tiny decoder, TAESD layout)")
        return
    path = export_single_file(
        source,
        out,
        dtype=dtype,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        prediction_type=prediction_type,
        vae=vae,
    )
    if vae is not None:
        click.echo(f"wrote {companion_path(path)} ({dtype}, tiny decoder, TAESD layout)")
    click.echo(f"wrote {path} ({dtype}, single-file original layout)")
