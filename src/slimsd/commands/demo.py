import contextlib
import json
import shlex
import sys

import click

from slimsd.commands.options import optimize_option

KD_WEIGHT = "Weight of this KD term for the KD student (0 for an ablation)."


@click.command()
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder: students, results.json, the sample sheet (sheet.png) and the page (index.html). A rerun "
    "replaces the demo's earlier output.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace --out even if it is not an earlier demo output (a rerun replaces its own output anyway).",
)
@click.option(
    "--steps",
    default=150,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training steps of each student.",
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option(
    "--data-images",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="Shapes images in the training set.",
)
@click.option("--lambda-out", default=1.0, show_default=True, type=click.FloatRange(min=0), help=KD_WEIGHT)
@click.option("--lambda-feat", default=1.0, show_default=True, type=click.FloatRange(min=0), help=KD_WEIGHT)
@click.option(
    "--feat-norm",
    default="none",
    show_default=True,
    type=click.Choice(["none", "teacher"]),
    help="teacher: divide each feature term by the teacher feature's mean square.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the data, noise and init.")
@click.option(
    "--eval-seeds",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Evaluation seeds (fidelity is their mean).",
)
@click.option(
    "--eval-prompts",
    default=24,
    show_default=True,
    type=click.IntRange(min=1),
    help="Captions per evaluation seed, of seen and of held-out colour x shape combinations each.",
)
@click.option("--inference-steps", default=25, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--lcm-steps",
    default=300,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training steps of the LCM student (the KD student step-distilled).",
)
@click.option(
    "--lcm-learning-rate", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True)
)
@click.option(
    "--lcm-inference-steps",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps the LCM student samples with.",
)
@click.option(
    "--decoder-steps",
    default=1000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training steps of the tiny VAE decoder (objective=vae-decoder) the LCM student's last row decodes with.",
)
@click.option("--guidance", default=2.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="torch CPU threads (default: torch's choice; 1 is fastest on a busy machine).",
)
@optimize_option
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def demo(
    out,
    overwrite,
    steps,
    batch_size,
    learning_rate,
    data_images,
    lambda_out,
    lambda_feat,
    feat_norm,
    seed,
    eval_seeds,
    eval_prompts,
    inference_steps,
    lcm_steps,
    lcm_learning_rate,
    lcm_inference_steps,
    decoder_steps,
    guidance,
    threads,
    optimize,
    as_json,
):
    """Compress the toy teacher (bk-small), distill it with KD, train a task-only twin, step-distil the KD
    student with LCM to 4 steps, distil a tiny VAE decoder for it, quantise it to int8, compare the six."""
    from pathlib import Path

    from slimsd.toy.demo import DemoConfig, run_demo
    from slimsd.toy.report import format_table

    def log(msg):
        click.echo(msg, err=as_json)

    cfg = DemoConfig(
        out=out,
        overwrite=overwrite,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        data_images=data_images,
        lambda_out=lambda_out,
        lambda_feat=lambda_feat,
        feat_norm=feat_norm,
        seed=seed,
        eval_seeds=tuple(range(eval_seeds)),
        eval_prompts=eval_prompts,
        inference_steps=inference_steps,
        lcm_steps=lcm_steps,
        lcm_learning_rate=lcm_learning_rate,
        lcm_inference_steps=lcm_inference_steps,
        decoder_steps=decoder_steps,
        guidance_scale=guidance,
        threads=threads,
        optimize=optimize,
        command=command_line(click.get_current_context()),
        log=log,
    )
    # In --json mode stdout carries the JSON object alone: anything else a library prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        summary = run_demo(cfg)
    page = Path(summary["out"]) / summary["page"]
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        click.echo(f"the table, the sample sheet and what each column means: {page}", err=True)
    else:
        click.echo(format_table(summary))
        click.echo(f"results.json and the sample sheet ({summary['sheet']['file']}) in {summary['out']}")
        click.echo(f"the table, the sample sheet and what each column means: {page}")


def command_line(ctx: click.Context) -> str:
    """The command as typed, in canonical form: `slimsd demo` and each option given on the command line."""
    words = ["slimsd", ctx.info_name or "demo"]
    for param in ctx.command.params:
        if ctx.get_parameter_source(param.name) is not click.core.ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            words.append(param.opts[-1] if value or not param.secondary_opts else param.secondary_opts[-1])
        else:
            words += [param.opts[-1], str(value)]
    return shlex.join(words)
