"""Generation: load a pipeline, pick a scheduler by name, sample with per-image seeds, write PNGs with metadata.

Reproducibility rules (the point of this module):

- Image *i* of a prompt uses seed ``S + i`` whatever the batch size: every image gets its own
  ``torch.Generator`` (on the CPU, so a seed means the same noise on any device), and diffusers draws each
  image's initial latents and ancestral noise from its own generator.
- Seed -1 draws a fresh seed; the seed actually used is reported and stored.
- Every PNG carries the AUTOMATIC1111 ``parameters`` text chunk ("PNG info": prompt, ``Negative prompt:``,
  ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …``) and a ``slimsd`` JSON chunk with
  every setting, so :func:`settings_from_png` can regenerate the image from the file alone.

A batch runs the U-Net on several images at once, which changes floating-point summation order: image *i*
of a batch matches a batch-of-one run with seed ``S + i`` to within float rounding (about 1e-6), and exactly
when both runs use the same batch size. The ``slimsd`` chunk records the batch size for that reason.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
import time
import unicodedata
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from slimsd.errors import SlimsdError, unknown

# name -> (diffusers class, overrides on top of the model's own scheduler config, A1111 sampler name)
SCHEDULERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++2m": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
        "DPM++ 2M",
    ),
    "dpm++2m-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        "DPM++ 2M Karras",
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    "lcm": ("LCMScheduler", {}, "LCM"),
}
SAMPLER_TO_SCHEDULER = {a1111: name for name, (_, _, a1111) in SCHEDULERS.items()}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Limits: wide enough for every real model, narrow enough to catch typos before minutes of work.
SIZE_RANGE = (64, 2048)
STEPS_RANGE = (1, 200)
GUIDANCE_RANGE = (0.0, 50.0)
MAX_SEED = 2**32 - 1  # A1111's seed range; also what a PNG's "Seed:" field round-trips
MAX_IMAGES = 100
MAX_BATCH = 64
PNG_JSON_KEY = "slimsd"


# ---------------------------------------------------------------------------------------------------------------
# Loading


def resolve_device(device: str | None) -> str:
    """``None`` -> 'cuda' when CUDA is available, else 'cpu'. Refuses devices this machine lacks."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise SlimsdError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N, mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimsdError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SlimsdError("device 'mps' requested but MPS is not available here; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``None`` -> fp16 on a GPU, fp32 on the CPU (CPU fp16 kernels are slow or missing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    if dtype == "fp16" and device == "cpu":
        raise SlimsdError("dtype 'fp16' is not supported on the CPU; use fp32 or bf16 there")
    return DTYPES[dtype]


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__


def load(
    model: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    scheduler: str | None = None,
    allow_pickle: bool = False,
    random_weights: bool = False,
):
    """A ready diffusers pipeline for MODEL: a preset, ``micro-sd``/``micro-sdxl``/``toy-sd``, a local
    diffusers folder or a hub id (see :func:`slimsd.models.loading.load_pipeline`).

    Defaults: the GPU in fp16 when CUDA is there, else the CPU in fp32. An SDXL VAE in fp16 overflows to NaN
    (black images), so in fp16 it is marked ``force_upcast``: diffusers decodes in fp32.
    """
    from slimsd.models.loading import describe_model, load_pipeline

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise unknown("scheduler", scheduler, SCHEDULERS)
    kind = describe_model(model)
    # fp32 is what every loader gives by default; asking for it explicitly only makes diffusers cast and warn.
    load_dtype = None if torch_dtype == torch.float32 else torch_dtype
    pipe = load_pipeline(
        model, random_weights=random_weights, allow_pickle=allow_pickle, torch_dtype=load_dtype
    )
    pipe = pipe.to(device)
    if is_sdxl(pipe) and torch_dtype == torch.float16 and getattr(pipe, "vae", None) is not None:
        pipe.vae.register_to_config(force_upcast=True)
    if kind == "local":
        source = str(Path(model).resolve())
    elif kind == "preset" and not random_weights:
        from slimsd.models.presets import get_preset

        source = get_preset(model).hub_id or model
    else:
        source = model
    # The scheduler config as loaded: every named scheduler is built from it, so switching back and forth
    # never carries one scheduler's options (e.g. Karras sigmas) into another.
    pipe._slimsd = {
        "model": model,
        "kind": kind,
        "source": source,
        "random_weights": random_weights,
        "base_scheduler": dict(pipe.scheduler.config),
        "default_scheduler": scheduler_name(pipe.scheduler),
    }
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe


def scheduler_name(scheduler) -> str | None:
    """Our name for a diffusers scheduler instance, or None if it is none of ours."""
    cls = type(scheduler).__name__
    cfg = scheduler.config
    for name, (cls_name, overrides, _) in SCHEDULERS.items():
        if cls_name == cls and all(cfg.get(k) == v for k, v in overrides.items()):
            if name == "dpm++2m" and cfg.get("use_karras_sigmas"):
                continue
            return name
    return None


def set_scheduler(pipe, name: str) -> None:
    """Replace the pipeline's scheduler by NAME, built from the model's own noise schedule (betas, timesteps)."""
    import diffusers

    if name not in SCHEDULERS:
        raise unknown("scheduler", name, SCHEDULERS)
    cls_name, overrides, _ = SCHEDULERS[name]
    info = getattr(pipe, "_slimsd", None)
    base = info["base_scheduler"] if info else dict(pipe.scheduler.config)
    base = {k: v for k, v in base.items() if k != "use_karras_sigmas"}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(base, **overrides)


def model_info(pipe) -> dict:
    """What we know about where PIPE came from (set by :func:`load`; bare pipelines get placeholders)."""
    info = getattr(pipe, "_slimsd", None)
    if info is None:
        info = {
            "model": type(pipe).__name__,
            "kind": "pipeline",
            "source": None,
            "base_scheduler": dict(pipe.scheduler.config),
            "default_scheduler": scheduler_name(pipe.scheduler),
        }
        pipe._slimsd = info
    return info


def default_size(pipe) -> int:
    """The model's native image size in pixels (U-Net sample size x VAE down-sampling)."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(pipe.unet.config.sample_size) * int(scale)


# ---------------------------------------------------------------------------------------------------------------
# Settings and validation


@dataclass
class Settings:
    """Everything that decides the pixels (plus the model), as stored in the PNG's JSON chunk."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = 0
    scheduler: str = "pndm"
    model: str = ""
    model_source: str | None = None
    batch_size: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    slimsd_version: str = ""
    time_s: float = 0.0  # this image's share of its batch's wall time
    extra: dict = field(default_factory=dict)

    def a1111_parameters(self) -> str:
        """The AUTOMATIC1111 ``parameters`` chunk: prompt, negative prompt line, settings line."""
        sampler = SCHEDULERS[self.scheduler][2] if self.scheduler in SCHEDULERS else self.scheduler
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {sampler}, CFG scale: {_num(self.guidance)}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: {_a1111_value(self.model)}, "
            f"Version: slimsd {self.slimsd_version}"
        )
        return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _a1111_value(v: str) -> str:
    # A1111 values are comma separated; a model path with a comma would break parsers, so quote it then.
    return json.dumps(v) if ("," in v or ":" in v or '"' in v) else v


def validate(
    *,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    num_images: int = 1,
    batch_size: int = 1,
    scheduler: str | None = None,
) -> None:
    """Refuse bad generation settings with one line naming the value and what is allowed."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v % 8 or not SIZE_RANGE[0] <= v <= SIZE_RANGE[1]:
            raise SlimsdError(
                f"{name} {v!r} is not allowed: a multiple of 8 from {SIZE_RANGE[0]} to "
                f"{SIZE_RANGE[1]} is (the VAE works on 8x8-pixel cells)"
            )
    if not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise SlimsdError(f"steps {steps!r} is out of range; allowed: {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
    if not (
        isinstance(guidance, int | float)
        and math.isfinite(guidance)
        and GUIDANCE_RANGE[0] <= guidance <= GUIDANCE_RANGE[1]
    ):
        raise SlimsdError(
            f"guidance {guidance!r} is out of range; allowed: {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g}"
        )
    if seed != -1 and not 0 <= seed <= MAX_SEED:
        raise SlimsdError(f"seed {seed!r} is out of range; allowed: -1 (random) or 0 to {MAX_SEED}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise SlimsdError(f"num-images {num_images!r} is out of range; allowed: 1 to {MAX_IMAGES}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise SlimsdError(f"batch-size {batch_size!r} is out of range; allowed: 1 to {MAX_BATCH}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise unknown("scheduler", scheduler, SCHEDULERS)


def draw_seed() -> int:
    return random.SystemRandom().randint(0, MAX_SEED)


def prompt_warnings(pipe, prompts: Sequence[str], negative: str = "") -> list[str]:
    """One warning per prompt longer than the text encoder takes (CLIP: 77 tokens); diffusers cuts it."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        return []
    limit = tokenizer.model_max_length
    out = []
    for label, text in [*(("prompt", p) for p in dict.fromkeys(prompts)), ("negative prompt", negative)]:
        if not text:
            continue
        n = len(tokenizer(text, truncation=False).input_ids)
        if n > limit:
            kept = tokenizer.decode(
                tokenizer(text, truncation=True, max_length=limit).input_ids, skip_special_tokens=True
            )
            out.append(
                f"{label} is {n} tokens but the text encoder takes {limit}: it was truncated after "
                f"{kept[-40:]!r}"
            )
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GeneratedImage:
    image: Image.Image
    settings: Settings
    index: int  # position in the whole run (prompt-major)
    path: Path | None = None

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def time_s(self) -> float:
        return self.settings.time_s


def generate(
    pipe,
    prompts: str | Sequence[str],
    negative: str = "",
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    seed: int = -1,
    num_images: int = 1,
    batch_size: int = 1,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> list[GeneratedImage]:
    """Generate ``num_images`` images for each prompt; image *i* of a prompt uses seed ``seed + i``.

    Returns one :class:`GeneratedImage` per image, prompt-major, with its seed and its share of the wall time.
    ``progress(done_steps, total_steps)`` is called after every denoising step; ``on_warning`` receives
    warnings (default: :func:`warnings.warn`).
    """
    from slimsd import __version__

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SlimsdError("no prompt given; pass a PROMPT or --prompts FILE with one prompt per line")
    info = model_info(pipe)
    width = width or default_size(pipe)
    height = height or default_size(pipe)
    validate(
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        seed=seed,
        num_images=num_images,
        batch_size=batch_size,
        scheduler=scheduler,
    )
    scheduler = scheduler or info["default_scheduler"]
    for w in prompt_warnings(pipe, prompts, negative):
        (on_warning or (lambda m: warnings.warn(m, stacklevel=3)))(w)
    base_seed = draw_seed() if seed == -1 else seed
    seed_cap = MAX_SEED + 1
    jobs = [(p, (base_seed + i) % seed_cap) for p in prompts for i in range(num_images)]
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    total_steps = len(batches) * steps
    device = str(pipe.device)
    dtype_name = {v: k for k, v in DTYPES.items()}.get(pipe.unet.dtype, str(pipe.unet.dtype))
    # The pipeline's own scheduler comes back afterwards: a call's choice must not leak into the next one.
    original_scheduler = pipe.scheduler
    try:
        if scheduler is not None:
            set_scheduler(pipe, scheduler)
        results: list[GeneratedImage] = []
        for b, batch in enumerate(batches):
            generators = [torch.Generator("cpu").manual_seed(s) for _, s in batch]

            def on_step(_pipe, step, _t, kwargs, _b=b):
                if progress is not None:
                    progress(_b * steps + step + 1, total_steps)
                return kwargs

            kwargs = {}
            # Only when given: SDXL uses zero embeddings for "no negative prompt", not the embedding of "".
            if negative:
                kwargs["negative_prompt"] = [negative] * len(batch)
            start = time.perf_counter()
            images = pipe(
                prompt=[p for p, _ in batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=width,
                height=height,
                generator=generators,
                callback_on_step_end=on_step,
                output_type="pil",
                **kwargs,
            ).images
            elapsed = time.perf_counter() - start
            for (prompt, s), image in zip(batch, images, strict=True):
                settings = Settings(
                    prompt=prompt,
                    negative_prompt=negative,
                    steps=steps,
                    guidance=float(guidance),
                    width=width,
                    height=height,
                    seed=s,
                    scheduler=scheduler or "default",
                    model=info["model"],
                    model_source=info["source"],
                    batch_size=batch_size,
                    dtype=dtype_name,
                    device=device,
                    slimsd_version=__version__,
                    time_s=round(elapsed / len(batch), 4),
                )
                results.append(GeneratedImage(image=image, settings=settings, index=len(results)))
    finally:
        pipe.scheduler = original_scheduler
    return results


# ---------------------------------------------------------------------------------------------------------------
# PNG files


def png_bytes(image: Image.Image, settings: Settings | None = None, extra_json: dict | None = None) -> bytes:
    """PNG bytes with the A1111 ``parameters`` chunk and the ``slimsd`` JSON chunk (iTXt when not latin-1)."""
    info = PngInfo()
    if settings is not None:
        info.add_text("parameters", settings.a1111_parameters())
        info.add_text(PNG_JSON_KEY, json.dumps(asdict(settings), ensure_ascii=False, sort_keys=True))
    if extra_json is not None:
        info.add_text(PNG_JSON_KEY, json.dumps(extra_json, ensure_ascii=False, sort_keys=True))
    buf = BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def safe_stem(text: str, max_len: int = 60) -> str:
    """A file-name fragment from any text: ASCII letters, digits and '-', no separators or control
    characters, at most ``max_len`` characters, never empty, never '.' or '..'."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return text[:max_len].rstrip("-") or "image"


def next_index(folder: Path) -> int:
    """One more than the largest ``NNNNN-`` prefix in FOLDER (A1111's running counter)."""
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(?:grid-)?(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def write_new_file(folder: Path, stem: str, suffix: str, data: bytes) -> Path:
    """Write DATA atomically under a name that did not exist: ``stem.suffix``, else ``stem-1.suffix``, ...

    The bytes go to a temporary file first and are then hard-linked to the final name; ``link`` fails rather
    than replace an existing file, so two writers (e.g. concurrent UI requests) never overwrite each other.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".slimsd-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for n in range(10_000):
            path = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        raise SlimsdError(f"could not find a free file name for {stem!r} in {str(folder)!r}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_images(results: Sequence[GeneratedImage], out_dir: str | Path) -> list[Path]:
    """Write each image as ``NNNNN-SEED-prompt.png`` (never overwriting); sets ``result.path``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlimsdError(f"output path {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    start = next_index(out)
    paths = []
    for k, r in enumerate(results):
        stem = f"{start + k:05d}-{r.seed}-{safe_stem(r.settings.prompt)}"
        r.path = write_new_file(out, stem, ".png", png_bytes(r.image, r.settings))
        paths.append(r.path)
    return paths


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Images tiled row-major on a near-square grid (cells sized to the largest image)."""
    if not images:
        raise SlimsdError("no images to put on a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def save_grid(results: Sequence[GeneratedImage], out_dir: str | Path) -> Path:
    """The grid of RESULTS, with the first image's ``parameters`` and the list of every image's settings."""
    first = results[0]
    data = {"grid": [asdict(r.settings) for r in results]}
    stem = f"grid-{next_index(Path(out_dir)):05d}-{safe_stem(first.settings.prompt)}"
    info = PngInfo()
    info.add_text("parameters", first.settings.a1111_parameters())
    info.add_text(PNG_JSON_KEY, json.dumps(data, ensure_ascii=False, sort_keys=True))
    buf = BytesIO()
    make_grid([r.image for r in results]).save(buf, format="PNG", pnginfo=info)
    return write_new_file(Path(out_dir), stem, ".png", buf.getvalue())


def read_png_text(path: str | Path) -> dict[str, str]:
    """The PNG's text chunks (tEXt, iTXt, zTXt)."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"PNG file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise SlimsdError(
                    f"{str(path)!r} is a {im.format} file; a PNG written by slimsd or A1111 is expected"
                )
            return dict(getattr(im, "text", {}))
    except (OSError, SyntaxError) as e:
        raise SlimsdError(f"{str(path)!r} is not a readable image: {e}") from None


def parse_a1111(parameters: str) -> dict:
    """A1111's ``parameters`` text -> {prompt, negative_prompt, steps, guidance, width, height, seed, scheduler,
    model} (the keys it has)."""
    lines = parameters.strip().split("\n")
    if not lines or not lines[-1].startswith("Steps:"):
        raise SlimsdError(
            "the PNG's 'parameters' chunk has no 'Steps: ...' line; it is not A1111-style metadata"
        )
    fields = dict(re.findall(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', lines[-1]))
    fields = {k.strip(): (json.loads(v) if v.startswith('"') else v.strip()) for k, v in fields.items()}
    prompt, negative = [], []
    for line in lines[:-1]:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").lstrip())
        else:
            prompt.append(line)
    out: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    try:
        if "Steps" in fields:
            out["steps"] = int(fields["Steps"])
        if "CFG scale" in fields:
            out["guidance"] = float(fields["CFG scale"])
        if "Seed" in fields:
            out["seed"] = int(fields["Seed"])
        if "Size" in fields:
            out["width"], out["height"] = (int(x) for x in fields["Size"].split("x"))
    except ValueError as e:
        raise SlimsdError(f"the PNG's 'parameters' chunk has a malformed value: {e}") from None
    if "Sampler" in fields:
        sampler = fields["Sampler"]
        if fields.get("Schedule type") == "Karras" and f"{sampler} Karras" in SAMPLER_TO_SCHEDULER:
            sampler = f"{sampler} Karras"
        out["scheduler"] = SAMPLER_TO_SCHEDULER.get(sampler, sampler)
    if "Model" in fields:
        out["model"] = fields["Model"]
    return out


def settings_from_png(path: str | Path) -> dict:
    """The settings stored in a PNG: the ``slimsd`` JSON chunk if present, else A1111's ``parameters``."""
    text = read_png_text(path)
    if PNG_JSON_KEY in text:
        try:
            data = json.loads(text[PNG_JSON_KEY])
        except json.JSONDecodeError as e:
            raise SlimsdError(f"the PNG's {PNG_JSON_KEY!r} chunk is not valid JSON: {e}") from None
        if "grid" in data:
            raise SlimsdError(f"{str(path)!r} is a grid; regenerate from one of its images instead")
        return data
    if "parameters" in text:
        return parse_a1111(text["parameters"])
    raise SlimsdError(f"{str(path)!r} carries no generation metadata (no 'parameters' or 'slimsd' chunk)")


def model_to_reload(settings: dict) -> str:
    """Which MODEL string reloads the model a PNG names: a known name as is, else its recorded source."""
    from slimsd.models.loading import MICRO_NAMES, TOY_NAMES
    from slimsd.models.presets import PRESETS

    model = settings.get("model") or ""
    if model in MICRO_NAMES or model in TOY_NAMES or model in PRESETS:
        return model
    source = settings.get("model_source")
    if source and (Path(source).exists() or not Path(model).exists()):
        return source
    if not model:
        raise SlimsdError("the PNG names no model; pass MODEL on the command line")
    return model
