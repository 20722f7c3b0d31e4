import json

import click


def _g(n: float) -> str:
    return f"{n / 1e9:.1f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


@click.command()
@click.argument("model")
@click.option(
    "--resolution",
    type=click.IntRange(64, 4096),
    default=None,
    help="Image size in pixels for the MAC count (default: the model's own).",
)
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder (folder or TAESD-layout .safetensors file) to compare with the model's VAE decoder (default: the tiny-decoder preset).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model: str, resolution: int | None, vae: str | None, as_json: bool):
    """Parameters and U-Net MACs of MODEL (preset, local folder or hub id), and of its VAE decoder against a tiny
    decoder, counted on the meta device."""
    from slimsd.models.counting import decoder_summary, summarize

    s = summarize(model, resolution)
    s["decoders"] = decoder_summary(model, s["resolution"], vae)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    click.echo(f"{model} ({s['kind']}) at {s['resolution']} px")
    click.echo(f"  U-Net         {s['unet_params']:>15,} params  {_g(s['unet_macs'])} MACs")
    b = s["unet_blocks"]
    click.echo(f"    down {_g(b['down'])}  mid {_g(b['mid'])}  up {_g(b['up'])}")
    click.echo(f"  text encoder  {s['text_encoder_params']:>15,} params")
    click.echo(f"  VAE           {s['vae_params']:>15,} params")
    click.echo(f"  total         {s['total_params']:>15,} params")
    d = s["decoders"]
    full, tiny = d["vae_decoder"], d["tiny_decoder"]
    click.echo(f"  VAE decoder   {full['params']:>15,} params  {_g(full['macs'])} MACs")
    click.echo(
        f"  tiny decoder  {tiny['params']:>15,} params  {_g(tiny['macs'])} MACs  ({tiny['source']}; the VAE "
        f"decoder has {d['macs_ratio']:.1f}x its MACs)"
    )
    if s.get("published"):
        click.echo(f"  published: {s['published']}")
