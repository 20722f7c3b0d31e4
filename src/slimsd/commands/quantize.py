"""``slimsd quantize MODEL --out DIR``: post-training int8 for the CPU runtimes (slimsd.run.quantize)."""

import json

import click

from slimsd.commands.options import allow_pickle_option


@click.command()
@click.argument("model")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Output folder (an exported model)."
)
@click.option(
    "--to",
    "to",
    default="openvino",
    show_default=True,
    help="Runtime: openvino (NNCF) or onnx (ONNX Runtime).",
)
@click.option(
    "--prompts",
    "prompts_file",
    default=None,
    help="Calibration prompts, one per line (UTF-8). Default: a built-in set of 16 captions.",
)
@click.option(
    "--calibration-prompts",
    type=int,
    default=None,
    help="How many prompts to sample (default: all, at most 32).",
)
@click.option(
    "--keep",
    multiple=True,
    help="Layers kept in float (regular expression on the U-Net's module names; repeatable). Default: conv_in, "
    "conv_out, time_embedding, time_emb_proj, add_embedding, conv_shortcut, norm. --keep '' keeps nothing.",
)
@click.option(
    "--method",
    default="int8",
    show_default=True,
    help="int8 (weights and activations) or int8-weights (weights only).",
)
@click.option(
    "--weight-only",
    multiple=True,
    help="Also give this part int8 weights (text_encoder, text_encoder_2, vae_decoder, vae_encoder; repeatable).",
)
@click.option(
    "--resolution", default=None, help="Fix the image size, WxH (static shapes); calibration runs at it."
)
@click.option("--batch", type=int, default=None, help="Fix the images per call (static batch).")
@click.option(
    "--sensitivity-layers",
    type=int,
    default=None,
    help="Sensitivity table for the N largest layers only (default: all).",
)
@click.option(
    "--report",
    is_flag=True,
    help="Print the ten most sensitive layers (the whole table is in sensitivity.json).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the calibration images (prompt i: seed + i).",
)
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder (AutoencoderTiny folder, or a TAESD-layout .safetensors file) exported as vae_decoder/ "
    "in place of the model's VAE decoder "
    "(as slimsd export --vae: decodes only, no img2img).",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@allow_pickle_option
def quantize(
    model,
    out,
    to,
    prompts_file,
    calibration_prompts,
    keep,
    method,
    weight_only,
    resolution,
    batch,
    sensitivity_layers,
    report,
    seed,
    vae,
    overwrite,
    allow_pickle,
):
    """Export MODEL to ONNX Runtime or OpenVINO with an int8 U-Net, calibrated on its own sampling trajectory."""
    from slimsd.run.quantize import quantize as run

    keep = None if not keep else tuple(k for k in keep if k)
    record = run(
        model,
        out,
        to=to,
        prompts_file=prompts_file,
        calibration_prompts=calibration_prompts,
        keep=keep,
        method=method,
        weight_only=weight_only,
        resolution=resolution,
        batch=batch,
        sensitivity_layers=sensitivity_layers,
        seed=seed,
        vae=vae,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        on_phase=lambda m: click.echo(m, err=True),
    )
    q = record["quantization"]
    ratio = q["unet_bytes_fp32"] / max(q["unet_bytes"], 1)
    click.echo(
        f"wrote {out} ({to}, {method}; calibrated on {q['calibration']['count']} prompts x "
        f"{q['calibration']['steps']} steps, {q['calibration']['unet_inputs']} U-Net inputs; "
        f"{len(q['kept_layers'])} layers kept; U-Net {ratio:.2f}x smaller on disk)"
    )
    if report:
        from pathlib import Path

        rows = json.loads((Path(out) / "sensitivity.json").read_text())["layers"][:10]
        for r in rows:
            click.echo(f"{r['rel_error']:.5f}  {'kept ' if r['kept'] else 'int8 '} {r['layer']}")
