import json
from pathlib import Path

import click

from slimsd.commands.options import deep_cache_option, lora_option, random_weights_option, runtime_options

# Options that --from-png fills from the file unless given on the command line.
FROM_PNG_KEYS = {
    "negative": "negative_prompt",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "width": "width",
    "height": "height",
    "scheduler": "scheduler",
    "batch_size": "batch_size",
    "deep_cache": "deep_cache",
    "strength": "strength",
}


def _read_prompts(path: str) -> list[str]:
    from slimsd.errors import SlimsdError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SlimsdError(
            f"--prompts file {path!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _check_out(out: str) -> None:
    """Refuse an --out below a file before minutes of loading (click checks only --out itself)."""
    from slimsd.errors import SlimsdError

    for folder in (Path(out), *Path(out).parents):
        if folder.exists():
            if not folder.is_dir():
                raise SlimsdError(f"--out {out!r} cannot be a folder: {str(folder)!r} is a file")
            return


@click.command()
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option(
    "--prompts",
    "prompts_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A text file with one prompt per line (blank lines and # comments skipped).",
)
@click.option("--negative", default=None, help="Negative prompt.")
@click.option(
    "--steps", type=int, default=None, help="Denoising steps (1-200; default: the model's own, else 25)."
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="Classifier-free guidance scale (0-50; default: the model's own, else 7.5).",
)
@click.option(
    "--seed", type=int, default=None, help="Seed of image 0; image i uses seed+i; -1 draws one (default)."
)
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", type=int, default=None, help="Images per forward pass (default 1).")
@click.option("--width", type=int, default=None, help="Multiple of 8, 64-2048 (default: the model's own).")
@click.option("--height", type=int, default=None, help="Multiple of 8, 64-2048 (default: the model's own).")
@click.option(
    "--scheduler",
    default=None,
    help="ddim | pndm | euler | euler-ancestral | dpm++2m | dpm++2m-karras | unipc | lcm "
    "(default: the model's own).",
)
@click.option(
    "--out",
    default="outputs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (existing files are never overwritten).",
)
@click.option(
    "--from-png",
    "from_png",
    type=click.Path(exists=True, dir_okay=False),
    help="Regenerate the image from this PNG's own metadata (options given here override it).",
)
@click.option(
    "--init-image",
    default=None,
    metavar="FILE",
    help="img2img: start from this image (stretched to the output size; the size defaults to the image's).",
)
@click.option(
    "--strength",
    type=float,
    default=None,
    help="img2img: how far the init image is noised, above 0 up to 1 (default 0.75; 1: almost entirely); "
    "the last steps x strength steps run.",
)
@click.option(
    "--mask",
    default=None,
    metavar="FILE",
    help="Inpainting: white is repainted, black kept; the init image's size.",
)
@click.option(
    "--controlnet", default=None, metavar="DIR", help="A diffusers ControlNet folder to steer with."
)
@click.option("--control-image", default=None, metavar="FILE", help="The ControlNet's condition image.")
@click.option(
    "--control-scale", type=float, default=None, help="How strongly the ControlNet steers (0-2; default 1)."
)
@click.option(
    "--vae",
    default=None,
    metavar="PATH",
    help="A tiny decoder to decode with instead of the model's VAE: a `vae-decoder` run's final/ folder "
    "(AutoencoderTiny) or a TAESD-layout .safetensors file (slimsd export's, or a published taesd_decoder).",
)
@deep_cache_option
@click.option("--no-grid", is_flag=True, help="Do not write a grid image.")
@runtime_options
@random_weights_option
@lora_option
@click.option("--json", "as_json", is_flag=True, help="Print paths, seeds, timings and the runtime as JSON.")
def generate(
    model,
    prompt,
    prompts_file,
    negative,
    steps,
    guidance,
    seed,
    num_images,
    batch_size,
    width,
    height,
    scheduler,
    out,
    from_png,
    init_image,
    strength,
    mask,
    controlnet,
    control_image,
    control_scale,
    vae,
    deep_cache,
    no_grid,
    device,
    dtype,
    optimize,
    allow_pickle,
    prediction_type,
    random_weights,
    loras,
    as_json,
):
    """Generate images for PROMPT (or --prompts FILE) with MODEL; each PNG carries its parameters.

    MODEL is a preset, micro-sd, micro-sdxl, toy-sd, a local diffusers folder, a single .safetensors file
    (A1111/ComfyUI layout) or a hub id. With --from-png, MODEL and PROMPT default to those stored in the file,
    and so do the init image, mask and ControlNet when they are still at their recorded paths, unchanged (else
    give them again).
    """
    from slimsd.errors import SlimsdError
    from slimsd.images import read_input_image
    from slimsd.models.loading import load
    from slimsd.progress import Progress
    from slimsd.run import generate as g
    from slimsd.run.outputs import save_grid, save_images

    given = dict(
        negative=negative,
        steps=steps,
        guidance=guidance,
        seed=seed,
        width=width,
        height=height,
        scheduler=scheduler,
        batch_size=batch_size,
        deep_cache=deep_cache,
        strength=strength,
    )
    init = read_input_image(init_image, "init image") if init_image else None
    dtype_note = None  # --from-png in the dtype the image records: said once the model has loaded
    mask_image = read_input_image(mask, "mask") if mask else None
    control = read_input_image(control_image, "control image") if control_image else None
    if from_png:
        model, loras, prompts, init, mask_image, controlnet, control_scale, control = _reload_from_png(
            from_png, given, model, prompt, loras, init, mask_image, controlnet, control_scale, control
        )
        vae = vae or _reload_vae(from_png)
        dtype, dtype_note = _reload_dtype(from_png, device) if dtype == "auto" else (dtype, None)
    else:
        prompts = _prompts(model, prompt, prompts_file)
    # steps and guidance left out: the model's own (a step-distilled student says 4 steps), known once loaded
    opts = {"negative": "", "seed": -1, "batch_size": 1, "deep_cache": 1} | {
        k: v for k, v in given.items() if v is not None
    }
    if init is None and opts.get("strength") is not None:
        raise SlimsdError("--strength applies to img2img: give --init-image FILE with it")
    g.check_mask(init, mask_image)
    if (controlnet is None) != (control is None):
        raise SlimsdError("--controlnet DIR and --control-image FILE go together: give both")
    if controlnet is not None:
        control_scale = 1.0 if control_scale is None else control_scale
        g.check_control_scale(control_scale)
    own_w, own_h = g.input_size(init) if init else (64, 64)  # without an init image: the model's own, >= 64
    g.validate(
        steps=opts.get("steps", g.DEFAULT_STEPS),
        guidance=opts.get("guidance", g.DEFAULT_GUIDANCE),
        width=opts.get("width") or own_w,
        height=opts.get("height") or own_h,
        seed=opts["seed"],
        num_images=num_images,
        batch_size=opts["batch_size"],
        scheduler=opts.get("scheduler"),
        deep_cache=opts["deep_cache"],
        strength=opts.get("strength", g.DEFAULT_STRENGTH) if init else None,
    )  # before minutes of loading
    _check_out(out)
    cn = None
    if controlnet is not None:  # before the model: a bad folder fails before minutes of loading
        from slimsd.run.controlnet import load_controlnet

        cn = load_controlnet(controlnet, allow_pickle=allow_pickle)

    def warn(message: str) -> None:
        click.echo(f"slimsd: warning: {message}", err=True)

    pipe = load(
        model,
        device=device,
        dtype=dtype,
        optimize=optimize,
        allow_pickle=allow_pickle,
        random_weights=random_weights,
        loras=loras,
        on_warning=warn,
        prediction_type=prediction_type,
        vae=vae,
    )

    if dtype_note:  # after the load, so that a refusal stays the only line
        click.echo(f"slimsd: {dtype_note}", err=True)
    bar = Progress("generate", disable=as_json)

    results = g.generate(
        pipe,
        prompts,
        negative=opts["negative"],
        steps=opts.get("steps"),
        guidance=opts.get("guidance"),
        width=opts.get("width"),
        height=opts.get("height"),
        seed=opts["seed"],
        num_images=num_images,
        batch_size=opts["batch_size"],
        scheduler=opts.get("scheduler"),
        deep_cache=opts["deep_cache"],
        on_warning=warn,
        progress=bar.update_to,
        init_image=init,
        strength=opts.get("strength"),
        mask=mask_image,
        controlnet=cn,
        control_image=control,
        control_scale=1.0 if control_scale is None else control_scale,
    )
    bar.close()
    paths = save_images(results, out)
    grid = save_grid(results, out) if len(results) > 1 and not no_grid else None
    _report(model, pipe, results, paths, grid, as_json)


def _reload_from_png(
    from_png, given, model, prompt, loras, init, mask_image, controlnet, control_scale, control
):
    """--from-png: the settings stored in the PNG fill what the command line leaves out (GIVEN, in place); the
    model, LoRAs, prompt, init image, mask and ControlNet too, when they are still at their recorded paths."""
    from slimsd.errors import SlimsdError
    from slimsd.models.schedulers import SCHEDULERS
    from slimsd.run.pnginfo import input_to_reload, loras_to_reload, model_to_reload, settings_from_png

    stored = settings_from_png(from_png)
    for opt, key in FROM_PNG_KEYS.items():
        if given[opt] is None and stored.get(key) is not None:
            given[opt] = stored[key]
    if given["scheduler"] not in SCHEDULERS:
        given["scheduler"] = None  # the model's own, as when the image was made
    model = model or model_to_reload(stored)
    loras = loras or loras_to_reload(stored)
    prompts = [prompt] if prompt else [stored.get("prompt", "")]
    init = init or input_to_reload(stored, "init_image", "init image", "--init-image")
    if init is None and stored.get("strength") is not None:  # A1111 text only: no file recorded
        raise SlimsdError(
            f"the image was made by img2img (strength {stored['strength']:g}) from an init image the PNG "
            "does not record; give it with --init-image FILE"
        )
    mask_image = mask_image or (input_to_reload(stored, "mask", "mask", "--mask") if init else None)
    recorded = stored.get("controlnet")
    if isinstance(recorded, dict) and not controlnet:
        controlnet = recorded.get("path")
        control_scale = recorded.get("scale") if control_scale is None else control_scale
        control = control or input_to_reload(recorded, "image", "control image", "--control-image")
    return model, loras, prompts, init, mask_image, controlnet, control_scale, control


def _reload_dtype(from_png, device) -> tuple[str, str | None]:
    """--from-png: the dtype the image was made in (fp32 on a bf16 CPU differs by grey levels), and a line
    for people where it is not this machine's default or cannot run here."""
    from slimsd.run.pnginfo import dtype_to_reload, settings_from_png

    return dtype_to_reload(settings_from_png(from_png), device)


def _reload_vae(from_png) -> str | None:
    """--from-png: the tiny decoder the image was decoded with (None: the model's own VAE)."""
    from slimsd.run.pnginfo import settings_from_png, vae_to_reload

    return vae_to_reload(settings_from_png(from_png))


def _prompts(model, prompt, prompts_file) -> list[str]:
    """The prompts of a command without --from-png (MODEL and a prompt are then required)."""
    from slimsd.errors import SlimsdError

    if not model:
        raise SlimsdError("missing MODEL: a preset, micro-sd, micro-sdxl, toy-sd, a folder or a hub id")
    if prompt and prompts_file:
        raise SlimsdError("give either PROMPT or --prompts FILE, not both")
    prompts = [prompt] if prompt else _read_prompts(prompts_file) if prompts_file else []
    if not prompts:
        raise SlimsdError("missing PROMPT: give a prompt, or --prompts FILE with one prompt per line")
    return prompts


def _report(model, pipe, results, paths, grid, as_json: bool) -> None:
    """One line per image (and the grid), or the JSON summary."""
    if as_json:
        settings = {
            k: v
            for k, v in vars(results[0].settings).items()
            if k not in ("prompt", "seed", "time_s", "extra")
        }
        images = [
            {"path": str(r.path), "prompt": r.settings.prompt, "seed": r.seed, "time_s": r.time_s}
            for r in results
        ]
        summary = {
            "model": model,
            "images": images,
            "grid": str(grid) if grid else None,
            "seeds": [r.seed for r in results],
            "total_time_s": round(sum(r.time_s for r in results), 4),
            "settings": settings,
            "runtime": pipe._slimsd["runtime"],
            "loras": pipe._slimsd["loras"],
            "vae": pipe._slimsd["vae"],
        }
        click.echo(json.dumps(summary, indent=1))
        return
    for r, p in zip(results, paths, strict=True):
        click.echo(f"{p}  seed {r.seed}  {r.time_s:.2f} s")
    if grid:
        click.echo(f"{grid}  (grid)")
