import json

import click

from slimsd.commands.options import filter_option, prediction_type_option


@click.command()
@click.option("--model", required=True, help="The teacher whose VAE and text encoder(s) encode the data.")
@click.option("--data", required=True, help="Image folder, .tar shard(s), parquet, or shapes:N.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output cache folder.")
@click.option(
    "--resolution", type=click.IntRange(8, 4096), required=True, help="Training resolution in pixels."
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--flip", is_flag=True, help="Also store the flipped images' latents (for random_flip=true).")
@click.option("--random-crop", is_flag=True, help="Crop at random instead of at the centre.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle weights: they can run code.")
@prediction_type_option
@filter_option(
    "Cache only the rows these rules keep, e.g. 'aesthetic >= 7.5' (repeatable; see `slimsd data`)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the cache summary as JSON.")
def cache(
    model,
    data,
    out,
    resolution,
    batch_size,
    flip,
    random_crop,
    seed,
    overwrite,
    allow_pickle,
    prediction_type,
    rules,
    as_json,
):
    """Precompute VAE latents and text embeddings, so that `slimsd distill data=OUT` skips both encoders."""
    from slimsd.errors import SlimsdError
    from slimsd.train.cache import write_cache

    if resolution % 8:
        raise SlimsdError(f"--resolution {resolution} is not a multiple of 8")
    info = write_cache(
        model,
        data,
        out,
        resolution,
        batch_size=batch_size,
        flip=flip,
        center_crop=not random_crop,
        seed=seed,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
        data_filter=list(rules) or None,
    )
    if as_json:
        click.echo(json.dumps({k: v for k, v in info.items() if k != "shards"} | {"out": str(out)}, indent=1))
    else:
        click.echo(
            f"wrote {out}: {info['count']} examples in {len(info['shards'])} shard(s)"
            + (f"; skipped {info['skipped']}" if info["skipped"] else "")
        )
