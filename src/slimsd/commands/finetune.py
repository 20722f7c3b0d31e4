import click

from slimsd.commands.options import filter_option


@click.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config (see configs/finetune-micro-sd.yaml); keys as in slimsd.train.objectives.finetune.FINETUNE_NAMES/KEYS.",
)
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@filter_option()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def finetune(config_file, overrides, rules, dry_run, as_json):
    """Fine-tune LoRA adapters on any model (a teacher or a student: preset, micro name or folder) with the
    plain denoising loss, optionally with DreamBooth prior preservation (class_prompt=...). The distillation
    trainer's loop: checkpoints, exact resume, validation images, `accelerate launch`.

    OVERRIDES are key=value pairs on top of the config file, e.g. model=micro-sd data=photos/ max_steps=500.
    The adapters go to OUTPUT/final/pytorch_lora_weights.safetensors (use with --lora).
    """
    import yaml

    from slimsd.commands.data import dry_run_rows
    from slimsd.commands.distill import report
    from slimsd.train.config import finetune_config, read_values
    from slimsd.train.distill import train
    from slimsd.train.filters import add_rules
    from slimsd.train.objectives.finetune import finetune_view

    cfg = finetune_config(add_rules(read_values(config_file, overrides), rules))
    if dry_run:
        lines, _ = dry_run_rows(cfg)  # the rows a run would use
        click.echo(
            yaml.safe_dump(finetune_view(cfg), sort_keys=False) + "".join(f"{x}\n" for x in lines), nl=False
        )
        return
    report(train(cfg), as_json)
