import json

import click

from slimsd.commands.options import (
    deep_cache_option,
    lora_option,
    random_weights_option,
    runtime_options,
    split_models,
)
from slimsd.measure.protocols import DEFAULT_CLIP, FID_EXTRACTORS, PROTOCOLS
from slimsd.models.schedulers import SCHEDULERS


def _models(ctx, param, value):
    # --models A --models B, or --models A,B (and --models A B: the extra names arrive as MORE_MODELS)
    return split_models(value)


@click.command(name="eval")
@click.option(
    "--models",
    "-m",
    multiple=True,
    required=True,
    callback=_models,
    help="Model to evaluate (preset, micro model, local folder, hub id); repeat or comma-separate.",
)
@click.option(
    "--prompts",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV with a header: caption column (caption/text/prompt) and optional id column.",
)
@click.option(
    "--reference",
    default=None,
    type=click.Path(),
    help="Reference images (folder) or their statistics (.npz with mu, sigma) for FID.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder: images/<model>-<hash>/, scores.json, report.html. An existing image is reused when "
    "its PNG info matches this run's model and settings, else made again.",
)
@click.option(
    "--protocol",
    type=click.Choice(sorted(PROTOCOLS)),
    default=None,
    help="Named protocol; fixes resolution, scoring size, scheduler, steps, guidance, seed, count.",
)
@click.option(
    "--steps", type=click.IntRange(1, 1000), default=None, help="Denoising steps [the model's own, else 25]."
)
@click.option(
    "--guidance",
    type=click.FloatRange(0, 50),
    default=None,
    help="Guidance scale [the model's own, else 7.5].",
)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Image i uses seed+i [0].")
@click.option(
    "--resolution",
    type=click.IntRange(8, 4096),
    default=None,
    help="Generation size in px [the model's own].",
)
@click.option(
    "--score-resolution",
    type=click.IntRange(8, 4096),
    default=None,
    help="Resize images (PIL bicubic) to this square size before scoring [no resize].",
)
@click.option("--scheduler", type=click.Choice(sorted(SCHEDULERS)), default=None, help="[the model's own]")
@deep_cache_option
@click.option("--num-prompts", type=click.IntRange(1), default=None, help="Use the first N prompts [all].")
@click.option("--caption-column", default=None, help="Caption column of the CSV.")
@click.option("--id-column", default=None, help="Id column of the CSV (names the image files).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, help="Generation batch size.")
@click.option(
    "--shard",
    default=None,
    metavar="K/N",
    help="Generate only prompts i with i mod N == K (no scoring); score in a final run without it.",
)
@click.option("--score-only", is_flag=True, help="Generate nothing; every image must exist.")
@click.option(
    "--fid-extractor",
    type=click.Choice(FID_EXTRACTORS),
    default="inception-v3",
    help="inception-v3 (real FID weights) or stand-in (tiny random net: offline smoke runs only).",
)
@click.option(
    "--inception-weights",
    default=None,
    type=click.Path(dir_okay=False),
    help="FID Inception weights: .safetensors, or the pytorch-fid .pth with --allow-pickle.",
)
@click.option(
    "--clip-model",
    default=DEFAULT_CLIP,
    help="CLIP hub id or folder; 'stand-in' (tiny random, offline); 'none' skips the CLIP score.",
)
@click.option("--is-splits", type=click.IntRange(1), default=10, help="Inception Score splits [10].")
@click.option(
    "--save-stats", is_flag=True, help="Write each model's FID statistics to OUT/stats/<model>.npz."
)
@click.option(
    "--save-reference-stats",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the reference's FID statistics (.npz) to reuse as --reference.",
)
@click.option("--grid", type=click.IntRange(0, 256), default=8, help="Prompts shown in the report's grid.")
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder (a `vae-decoder` run's final/ folder, or a TAESD-layout .safetensors file) every model decodes with instead of its VAE; "
    "its images get their own folders.",
)
@runtime_options
@random_weights_option
@lora_option
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.argument("more_models", nargs=-1)
def eval_(as_json, clip_model, more_models, **options):
    """FID, IS and CLIP score of MODELS over a prompt set, with an HTML report (OUT/report.html).

    Models: `--models A B C`, repeated `-m A -m B`, or comma-separated.
    """
    from slimsd.cli import require
    from slimsd.measure.evaluate import EvalConfig, run_eval

    if options["reference"] and not options["shard"]:
        require("scipy")  # FID's matrix square root
    options["models"] = options["models"] + split_models(more_models)
    config = EvalConfig(clip_model=None if clip_model.lower() == "none" else clip_model, **options)
    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    result = run_eval(config, log=log)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    if "shard" in result:
        for model, g in result["generation"].items():
            click.echo(
                f"{model}: shard {result['shard']}: {g['generated']} generated ({g['regenerated']} of them "
                f"made with other settings before), {g['reused']} reused"
            )
        return
    for row in result["models"]:
        fid = "–" if row["fid"] is None else f"{row['fid']:.3f}"
        clip = "–" if row["clip_score"] is None else f"{row['clip_score']:.3f}"
        click.echo(
            f"{row['model']}: FID {fid}  IS {row['inception_score']:.3f} ± {row['inception_score_std']:.3f}"
            f"  CLIP {clip}  ({row['num_images']} images)"
        )
    click.echo(f"wrote {config.out}/scores.json and {config.out}/report.html")
