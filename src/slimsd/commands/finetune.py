import click


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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def finetune(config_file, overrides, dry_run, as_json):
    """Fine-tune LoRA adapters on any model (a teacher or a student: preset, micro name or folder) with the
    plain denoising loss, optionally with DreamBooth prior preservation (class_prompt=...). The distillation
    trainer's loop: checkpoints, exact resume, validation images, `accelerate launch`.

    OVERRIDES are key=value pairs on top of the config file, e.g. model=micro-sd data=photos/ max_steps=500.
    The adapters go to OUTPUT/final/pytorch_lora_weights.safetensors (use with --lora).
    """
    import yaml

    from slimsd.commands.distill import report
    from slimsd.train.config import finetune_config, read_values
    from slimsd.train.distill import train
    from slimsd.train.objectives.finetune import finetune_view

    cfg = finetune_config(read_values(config_file, overrides))
    if dry_run:
        click.echo(yaml.safe_dump(finetune_view(cfg), sort_keys=False), nl=False)
        return
    report(train(cfg), as_json)
