import json

import click

from slimsd.commands.options import prediction_type_option


@click.command()
@click.option(
    "--teacher",
    required=True,
    help="Preset name, micro model, local diffusers folder, single .safetensors file or hub id.",
)
@click.option(
    "--recipe", required=True, help="bk-base | bk-small | bk-tiny | ssd-1b | vega | identity | FILE.yaml"
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output pipeline folder.")
@click.option("--random-weights", is_flag=True, help="Build a preset teacher with random weights (offline).")
@click.option(
    "--init",
    default="teacher",
    show_default=True,
    type=click.Choice(["teacher", "random"]),
    help="teacher: copy the teacher's weights by the recipe's map (BK-SDM); random: fresh weights (ablation).",
)
@click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Seed of --init random."
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--allow-pickle", is_flag=True, help="Allow loading pickle (.bin/.ckpt) weights: they can run code."
)
@prediction_type_option
@click.option("--show-map", is_flag=True, help="Print the student <- teacher tensor map.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def compress(
    teacher,
    recipe,
    out,
    random_weights,
    init,
    seed,
    overwrite,
    allow_pickle,
    prediction_type,
    show_map,
    as_json,
):
    """Build a student U-Net from TEACHER by RECIPE and write a full diffusers pipeline folder."""
    from slimsd.models.compress import compress as run

    result = run(
        teacher,
        recipe,
        out,
        random_weights=random_weights,
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        init=init,
        seed=seed,
        prediction_type=prediction_type,
    )
    if show_map:
        for s, t in result.weight_map.items():
            click.echo(f"{s} <- {t}")
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(
            f"wrote {summary['out']}: U-Net {summary['student_unet_params']:,} params "
            f"({summary['reduction']:.1%} fewer than the teacher's {summary['teacher_unet_params']:,}); "
            f"{summary['tensors_inherited']} tensors inherited by recipe {summary['recipe']}"
        )
