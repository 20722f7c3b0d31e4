import json

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (see configs/); keys as in slimsd.train.distill.DistillConfig.",
)
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def distill(config_file, overrides, dry_run, as_json):
    """Distill a student U-Net from its frozen teacher: objective=kd (task + output-KD + feature-KD), or
    objective=lcm / lcm-lora (latent consistency distillation into a few-step student).

    OVERRIDES are key=value pairs on top of the config file, e.g. max_steps=10 mixed_precision=bf16.
    Runs unchanged under `accelerate launch`.
    """
    from slimsd.train.config import config_yaml, load_config
    from slimsd.train.distill import train

    cfg = load_config(config_file, overrides)
    if dry_run:
        click.echo(config_yaml(cfg), nl=False)
        if cfg.stages:
            from slimsd.train.stages import describe

            click.echo(describe(cfg), nl=False)
        return
    result = train(cfg)
    if result.get("already_finished"):  # train() said so; final/ is left as it is
        if as_json:
            click.echo(
                json.dumps({k: result[k] for k in ("final_dir", "steps", "already_finished")}, indent=1)
            )
        return
    summary = {
        k: result[k]
        for k in ("final_dir", "steps", "num_processes", "skipped", "resumed_from", "images_per_second")
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
