import json

import click

from slimsd.commands.options import filter_option


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (see configs/); keys as in slimsd.train.distill.DistillConfig.",
)
@click.argument("overrides", nargs=-1)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the resolved config, the estimated memory per process (DDP, FSDP, ZeRO-2/3) and compute per "
    "step, and exit.",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes (GPUs) the --dry-run estimate plans for.",
)
@filter_option()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def distill(config_file, overrides, dry_run, num_processes, rules, as_json):
    """Distill a student U-Net from its frozen teacher: objective=kd (task + output-KD + feature-KD), or
    objective=lcm / lcm-lora (latent consistency distillation into a few-step student).

    OVERRIDES are key=value pairs on top of the config file, e.g. max_steps=10 mixed_precision=bf16.
    Runs unchanged under `accelerate launch`.
    """
    from slimsd.train.config import make_config, read_values
    from slimsd.train.distill import train
    from slimsd.train.filters import add_rules

    cfg = make_config(add_rules(read_values(config_file, overrides), rules))
    if dry_run:
        click.echo(plan_text(cfg, num_processes, as_json), nl=False)
        return
    report(train(cfg), as_json)


def plan_text(cfg, num_processes: int, as_json: bool) -> str:
    """The resolved config, each stage of a plan, and the memory and compute estimate (of each stage)."""
    from dataclasses import asdict, replace

    from slimsd.commands.data import dry_run_rows
    from slimsd.errors import SlimsdError
    from slimsd.train.config import config_yaml, validate
    from slimsd.train.estimate import describe, estimate

    cfg = validate(cfg)
    runs = [("", cfg)]
    if cfg.stages:
        # each stage's student from its recipe; a stage taught by the previous stage's student is counted with
        # the original teacher (an upper bound: the previous student is smaller)
        kept = ("batch_size", "resolution", "gradient_checkpointing", "mixed_precision", "ema")
        runs = []
        for k, stage in enumerate(cfg.stages, 1):
            teacher = stage.get("teacher", cfg.teacher)
            over = {key: v for key, v in stage.items() if key in kept}
            one = replace(
                cfg,
                stages=None,
                student=stage["recipe"],
                teacher=cfg.teacher if teacher == "previous" else teacher,
                **over,
            )
            runs.append((f"# stage {k}\n", one))
    estimates = []
    for _, one in runs:
        try:
            estimates.append(estimate(one, num_processes))
        except SlimsdError as e:  # e.g. a hub teacher offline: the config is still worth printing
            estimates.append({"error": str(e)})
    rows_lines, rows = dry_run_rows(cfg, num_processes)  # the rows a run would use (indexed and filtered)
    if as_json:
        found = estimates if cfg.stages else estimates[0]
        return json.dumps({"config": asdict(cfg), "estimate": found, "data": rows}, indent=1) + "\n"
    if cfg.stages:
        from slimsd.train.stages import describe as describe_stages

    text = config_yaml(cfg) + "".join(f"{line}\n" for line in rows_lines)
    text += describe_stages(cfg) if cfg.stages else ""
    for (head, _), est in zip(runs, estimates, strict=True):
        text += head + (
            describe(est) if "error" not in est else f"# estimate: not available ({est['error']})\n"
        )
    return text


def report(result: dict, as_json: bool) -> None:
    """The end of a training command: one line (or a JSON summary) from the main process."""
    if result.get("already_finished"):  # train() said so; final/ is left as it is
        if as_json:
            click.echo(
                json.dumps({k: result[k] for k in ("final_dir", "steps", "already_finished")}, indent=1)
            )
        return
    summary = {
        k: result[k]
        for k in (
            "final_dir",
            "steps",
            "num_processes",
            "engine",
            "skipped",
            "resumed_from",
            "images_per_second",
        )
    }
    summary["last"] = result["losses"][-1] if result["losses"] else None
    if result["process_index"] != 0:  # under accelerate launch / torchrun: one report, from the main process
        return
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        last = summary["last"] or {}
        terms = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k not in ("step", "lr", "loss"))
        click.echo(
            f"wrote {summary['final_dir']} after {summary['steps']} steps; last loss "
            f"{last.get('loss', float('nan')):.4f}" + (f" ({terms})" if terms else "")
        )
