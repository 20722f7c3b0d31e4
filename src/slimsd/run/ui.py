"""The web UI: a Gradio Blocks app over :mod:`slimsd.run.generate`.

Four tabs. *Generate*: model, prompt, negative prompt, an "Advanced" accordion (steps, guidance, size, seed with
randomize, number of images, scheduler, deep cache, precision) and a PNG gallery whose files are the very PNGs
written to the output folder, so a download keeps its ``parameters`` chunk. *img2img*: the same settings, an init
image, an optional mask (inpainting) and the denoising strength. *Compare*: one prompt and seed on several
models side by side, each with its time: the source articles' four-model timing notebook, as a page. *PNG info*:
a dropped PNG's settings, sent to Generate in the dtype the image records (a model loaded in a dtype other than
the server's is cached beside it as ``MODEL (fp32)``), so that an image reproduces pixel for pixel.

Decoders: the operator may serve tiny decoders (``UIConfig.vaes``: label -> folder, from ``slimsd ui --vae
[NAME=]DIR``); Generate's settings then offer "full" (the model's own VAE) and those labels, nothing else. A model
decoding with one is cached beside the others as ``MODEL (tiny)``; its PNGs record the decoder, and PNG info sends
the label whose weights' sha256 the PNG records (never a path the PNG names). Compare runs each model with each
ticked decoder: the same latents decoded by each, side by side.

Only the operator's models are served: the ``--models`` list, exactly as given. Any other name a visitor types or
sends to the API is refused with one message that says nothing about the file system, unless the operator
allows custom models; ``allow_pickle`` applies only to the operator's own list, never to a visitor's name.

Models load on first use and stay in a small LRU cache; dropping one (evicted, or the "Unload" button) deletes
the pipeline and frees its memory. A load runs outside the cache's lock (one future per model: two requests for
the same model load it once), so generations on loaded models go on while another model loads. The queue is on, with a concurrency limit shared by both tabs (one model
run at a time on the device by default) and a maximum size: a burst past it is refused cleanly, and the app
keeps serving. Endpoints ``/generate``, ``/img2img`` and ``/compare`` work with ``gradio_client``; an image sent
to ``/img2img`` must be an upload (Gradio refuses a payload naming any other file on the server).
"""

from __future__ import annotations

import gc
import inspect
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimsd.devices import dtype_name, resolve_device, resolve_dtype
from slimsd.errors import SlimsdError
from slimsd.models.decoders import decoder_record
from slimsd.models.loading import load
from slimsd.models.runtime import summary
from slimsd.models.schedulers import SCHEDULERS
from slimsd.run import generate as g
from slimsd.run.deepcache import INTERVAL_RANGE
from slimsd.run.outputs import save_images
from slimsd.run.pnginfo import dtype_to_reload, settings_from_png

DEFAULT_SCHEDULER = "model default"
DEFAULT_DTYPE = "server default"
FULL_DECODER = "full"  # the model's own VAE


def default_models() -> list[str]:
    """The offline models first (micro-sd, micro-sdxl, toy-sd), then every teacher and student preset."""
    from slimsd.models.presets import names

    return names("micro") + names("teacher", "student")


@dataclass
class UIConfig:
    models: list[str] = field(default_factory=default_models)
    out_dir: Path = Path("outputs/ui")
    device: str | None = None
    dtype: str | None = None
    optimize: bool = True  # the fast runtime (slimsd.models.runtime)
    allow_pickle: bool = False  # for the models above only, never for a visitor's
    prediction_type: str | None = None  # None: each model's own
    allow_custom_models: bool = False  # visitors may type any model name, folder or hub id
    max_loaded: int = 2  # pipelines kept in memory at once
    concurrency: int = 1  # model runs at once, both tabs together
    max_queue: int = 16  # waiting requests beyond this are refused
    loras: list = field(default_factory=list)  # (path, scale): merged into every model served
    vaes: dict = field(default_factory=dict)  # label -> tiny decoder (folder, file) beside FULL_DECODER


def parse_decoders(specs) -> dict[str, str]:
    """``--vae [NAME=]DIR`` values -> {label: folder}, each folder checked (one line each): one unnamed folder
    is "tiny"; several must each be named, every name its own and none "full"."""
    from slimsd.models.decoders import check_decoder

    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not re.fullmatch(r"[\w.-]+", name):  # no name: the whole value is the folder
            name, folder, sep = "tiny", spec, ""
        if not sep and len(specs) > 1:
            raise SlimsdError(f"--vae {spec!r}: with several decoders, name each: --vae NAME=PATH")
        name = name.strip()
        if name == FULL_DECODER or name in out:
            raise SlimsdError(f"--vae {spec!r}: the name {name!r} is taken; give each decoder its own name")
        out[name] = str(check_decoder(folder))
    return out


class ModelCache:
    """Pipelines by model name, loaded on first use, least recently used dropped beyond ``max_loaded``."""

    def __init__(self, config: UIConfig):
        self.config = config
        self.models = list(dict.fromkeys(m.strip() for m in config.models if m.strip())) or default_models()
        self._pipes: OrderedDict[str, object] = OrderedDict()
        self._loading: dict[str, Future] = {}  # models being loaded, by the request that loads them
        self._lock = threading.Lock()  # guards the two dicts; never held during a load
        self._run_locks: dict[str, threading.Lock] = {}  # a pipeline's scheduler is state: one run at a time
        self.device = resolve_device(config.device)
        self.dtype = dtype_name(resolve_dtype(config.dtype, self.device))  # what the server runs in
        # the decoders offered, by label; the sha256 of each one's weights (what a PNG records of it)
        self.decoders = [FULL_DECODER, *config.vaes]
        self.decoder_sha = {label: decoder_record(f)["sha256"] for label, f in config.vaes.items()}

    def decoder(self, value) -> str | None:
        """The operator's label a visitor sent (None: the model's own VAE), or one refusal naming the served."""
        if value in (None, "", FULL_DECODER):
            return None
        if isinstance(value, str) and value in self.config.vaes:
            return value
        shown = value[:77] + "..." if isinstance(value, str) and len(value) > 80 else value
        raise SlimsdError(f"decoder {shown!r} is not served here; served: {', '.join(self.decoders)}")

    def key(self, model: str, dtype=None, decoder=None) -> tuple[str, str | None]:
        """(cache key, dtype to load in): the server's own dtype and the model's own VAE under the model's name,
        another dtype (a PNG reproduced in the dtype it was made in) or a tiny decoder beside it, as
        'MODEL (fp32)', 'MODEL (tiny)', 'MODEL (fp32, tiny)'."""
        label = self.decoder(decoder)
        name = None
        if dtype not in (None, "", DEFAULT_DTYPE):
            if not isinstance(dtype, str):
                raise SlimsdError(f"dtype {dtype!r} is not a dtype name")
            name = dtype_name(resolve_dtype(dtype, self.device))  # refuses what this device does not run
            name = None if name == self.dtype else name
        tags = [t for t in (name, label) if t]
        return (f"{model} ({', '.join(tags)})" if tags else model), name

    def admit(self, model) -> tuple[str, bool]:
        """(model name, allow_pickle) for a name a visitor sent, or one refusal that does not look at the disk."""
        model = (model or "").strip() if isinstance(model, str) else ""
        if not model:
            raise SlimsdError("no model selected")
        if model in self.models:
            return model, self.config.allow_pickle
        if self.config.allow_custom_models:
            return model, False  # a visitor's file is never unpickled
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise SlimsdError(f"model {shown!r} is not served here; served: {', '.join(self.models)}")

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._pipes)

    def get(self, model, dtype=None, decoder=None):
        model, allow_pickle = self.admit(model)
        key, dtype = self.key(model, dtype, decoder)
        vae = self.config.vaes.get(self.decoder(decoder))
        model, name = key, model  # the cache and its locks go by key; the load by the model's name
        with self._lock:
            if model in self._pipes:
                self._pipes.move_to_end(model)
                return self._pipes[model]
            future = self._loading.get(model)
            if future is None:  # this request loads it; make room first, so memory peaks at max_loaded
                future = self._loading[model] = Future()
                while self._pipes and len(self._pipes) + len(self._loading) > max(1, self.config.max_loaded):
                    self._drop_locked(next(iter(self._pipes)))
                loader = True
            else:
                loader = False
        if not loader:
            return future.result()  # the same load, or its error
        try:
            pipe = load(
                name,
                device=self.config.device,
                dtype=dtype or self.config.dtype,
                optimize=self.config.optimize,
                allow_pickle=allow_pickle,
                prediction_type=self.config.prediction_type,
                loras=self.config.loras,
                vae=vae,
                on_warning=lambda m: print(f"slimsd: warning: {name}: {m}", file=sys.stderr, flush=True),
            )
        except BaseException as e:
            with self._lock:
                del self._loading[model]
            future.set_exception(e)
            raise
        with self._lock:
            del self._loading[model]
            self._pipes[model] = pipe
            self._run_locks.setdefault(model, threading.Lock())
            while len(self._pipes) > max(1, self.config.max_loaded):  # loads that ran side by side
                self._drop_locked(next(iter(self._pipes)))
        future.set_result(pipe)
        return pipe

    @contextmanager
    def using(self, model, dtype=None, decoder=None) -> Iterator[object]:
        pipe = self.get(model, dtype, decoder)
        with self._run_locks[self.key(model.strip(), dtype, decoder)[0]]:
            yield pipe

    def drop(self, model) -> bool:
        """Unload MODEL, in every dtype and with every decoder it is loaded with."""
        model, _ = self.admit(model)
        with self._lock:
            keys = [k for k in self._pipes if k == model or k.startswith(f"{model} (")]
            return any([self._drop_locked(k) for k in keys])

    def _drop_locked(self, model: str) -> bool:
        pipe = self._pipes.pop(model, None)
        if pipe is None:
            return False
        del pipe  # a run in progress keeps its own reference; memory goes when it ends
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True


# Requests reach the functions below raw (the events skip gradio's preprocessing), so each value is checked here.


def _text(value, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SlimsdError(f"{name} {value!r} is not text")
    return value


def _number(value, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise SlimsdError(f"{name} {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(f):
        raise SlimsdError(f"{name} {value!r} is not a number")
    return f


def _int(value, name: str) -> int:
    f = _number(value, name)
    if not f.is_integer():
        raise SlimsdError(f"{name} {value!r} is not a whole number")
    return int(f)


def run_generate(
    cache: ModelCache,
    model,
    prompt,
    negative,
    steps,
    guidance,
    width,
    height,
    seed,
    randomize,
    num_images,
    scheduler,
    deep_cache=1,
    dtype=DEFAULT_DTYPE,
    decoder=FULL_DECODER,
    progress=None,
    warn=None,
):
    """One Generate click: -> (gallery items [(png path, caption)], markdown summary). Raises SlimsdError.
    ``dtype``: the server's own, or another this device runs (a PNG reproduced in the dtype it was made in).
    ``decoder``: FULL_DECODER (the model's VAE) or a label of the operator's tiny decoders.

    ``progress`` is Gradio-style: called as ``progress((done, total), desc=...)``."""
    return _run(
        cache,
        model,
        prompt,
        negative,
        steps,
        guidance,
        width,
        height,
        seed,
        randomize,
        num_images,
        scheduler,
        deep_cache,
        progress,
        warn,
        dtype=dtype,
        decoder=decoder,
    )


def run_img2img(
    cache: ModelCache,
    model,
    prompt,
    init_image,
    mask=None,
    strength=g.DEFAULT_STRENGTH,
    negative="",
    steps=25,
    guidance=7.5,
    width=0,
    height=0,
    seed=0,
    randomize=True,
    num_images=1,
    scheduler=DEFAULT_SCHEDULER,
    deep_cache=1,
    progress=None,
    warn=None,
):
    """One img2img click: as :func:`run_generate`, from ``init_image`` (and ``mask``: inpainting) at
    ``strength``. The images arrive as Gradio file payloads, which Gradio has already checked to be uploads."""
    cache.admit(model)  # first, as for every request: one refusal for a model not served
    init = _image_file(init_image, "init image")
    if init is None:
        raise SlimsdError("no init image; upload the image to start from")
    return _run(
        cache,
        model,
        prompt,
        negative,
        steps,
        guidance,
        width,
        height,
        seed,
        randomize,
        num_images,
        scheduler,
        deep_cache,
        progress,
        warn,
        init=init,
        mask=_image_file(mask, "mask"),
        strength=_number(strength, "strength"),
    )


def _image_file(value, name: str):
    """An uploaded image (a Gradio file payload, or a path from a caller in this process) as an InputImage."""
    from slimsd.images import read_input_image

    if isinstance(value, dict):  # FileData: {"path": ..., "orig_name": ...}
        value = value.get("path")
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise SlimsdError(f"{name} {value!r} is not an uploaded image")
    return read_input_image(value, name)


def _run(
    cache: ModelCache,
    model,
    prompt,
    negative,
    steps,
    guidance,
    width,
    height,
    seed,
    randomize,
    num_images,
    scheduler,
    deep_cache,
    progress,
    warn,
    init=None,
    mask=None,
    strength=None,
    dtype=None,
    decoder=None,
):
    model, _ = cache.admit(model)
    cache.key(model, dtype, decoder)  # a dtype this device does not run, a decoder not served: refused now
    prompt, negative = _text(prompt, "prompt").strip(), _text(negative, "negative prompt")
    guidance = _number(guidance, "guidance")
    if not prompt:
        raise SlimsdError("the prompt is empty; type what the image should show")
    seed = -1 if randomize else _int(seed, "seed")
    scheduler = None if scheduler in (None, "", DEFAULT_SCHEDULER) else scheduler
    steps, width, height, num_images = (
        _int(v, n)
        for v, n in ((steps, "steps"), (width, "width"), (height, "height"), (num_images, "num images"))
    )
    deep_cache = _int(deep_cache, "deep cache")
    g.check_mask(init, mask)
    own_w, own_h = g.input_size(init) if init is not None else (64, 64)
    g.validate(
        steps=steps,
        guidance=guidance,
        width=width or own_w,
        height=height or own_h,
        seed=seed,
        num_images=num_images,
        scheduler=scheduler,
        deep_cache=deep_cache,
        strength=strength,
    )  # before loading anything
    with cache.using(model, dtype, decoder) as pipe:
        results = g.generate(
            pipe,
            prompt,
            negative=negative,
            steps=steps,
            guidance=guidance,
            width=width or None,
            height=height or None,
            seed=seed,
            num_images=num_images,
            batch_size=1,
            scheduler=scheduler,
            deep_cache=deep_cache,
            progress=None
            if progress is None
            else (lambda done, total: progress((done, total), desc="denoising")),
            on_warning=warn,
            init_image=init,
            mask=mask,
            strength=strength,
        )
        applied = pipe._slimsd["runtime"]
        loras = pipe._slimsd.get("loras", [])
    save_images(results, cache.config.out_dir)
    items = [(str(r.path), f"seed {r.seed} · {r.time_s:.2f} s") for r in results]
    lines = [
        f"**{model}** · {results[0].settings.scheduler} · {steps} steps · "
        f"{results[0].settings.width}x{results[0].settings.height}"
        + (f" · strength {strength:g}" + (" · inpainting" if mask else "") if init is not None else "")
        + (f" · deep cache {deep_cache}" if deep_cache > 1 else ""),
        "",
        f"runtime: {summary(applied)}",
        "",
    ]
    if cache.decoder(decoder):
        lines += [f"decoder: {cache.decoder(decoder)} (a tiny decoder in place of the model's VAE)", ""]
    if loras:
        lines += ["LoRA: " + ", ".join(lora_summary(r) for r in loras), ""]
    lines += [
        f"- image {i}: seed `{r.seed}`, {r.time_s:.2f} s — `{r.path.name}`" for i, r in enumerate(results)
    ]
    return items, "\n".join(lines)


def from_png(cache: ModelCache, png) -> tuple[list, str]:
    """An uploaded PNG's settings as the Generate tab's values (in :func:`run_generate`'s order, the seed fixed,
    one image) and what it records, for people: A1111's ``parameters`` text and the dtype it reproduces in.
    The model must be one this server serves; the dtype is the one recorded where this device runs it."""
    path = png.get("path") if isinstance(png, dict) else png
    if not isinstance(path, str) or not path:
        raise SlimsdError("no PNG; upload an image slimsd (or AUTOMATIC1111) wrote")
    stored = settings_from_png(path)
    model = stored.get("model") or ""
    if model not in cache.models and stored.get("model_source") in cache.models:
        model = stored["model_source"]
    model, _ = cache.admit(model)
    dtype, note = dtype_to_reload(stored, cache.device)
    scheduler = stored.get("scheduler")
    values = {
        "model": model,
        "prompt": stored.get("prompt", ""),
        "negative": stored.get("negative_prompt", ""),
        "steps": stored.get("steps", 25),
        "guidance": stored.get("guidance", 7.5),
        "width": stored.get("width", 0),
        "height": stored.get("height", 0),
        "seed": stored.get("seed", 0),
        "randomize": False,
        "num_images": 1,
        "scheduler": scheduler if scheduler in SCHEDULERS else DEFAULT_SCHEDULER,
        "deep_cache": stored.get("deep_cache") or 1,
        "dtype": DEFAULT_DTYPE if dtype == "auto" else dtype,
    }
    values["decoder"], decoder_note = _decoder_to_send(cache, stored.get("vae"))
    lines = [f"**{model}** · seed `{values['seed']}` · {values['steps']} steps", ""]
    lines += [f"dtype: {note}" if note else f"dtype: {values['dtype']}", ""]
    lines += [f"decoder: {decoder_note}", ""]
    if stored.get("init_image") or stored.get("strength") is not None:
        lines += ["made by img2img: the img2img tab takes its init image", ""]
    return [values[name] for name in inspect.signature(run_generate).parameters if name in values], "\n".join(
        lines
    )


def _decoder_to_send(cache: ModelCache, record) -> tuple[str, str]:
    """(the decoder label Generate gets, a line for people) for a PNG's ``vae`` record: the served decoder with
    the same weights (sha256), else the model's own VAE, said (the image will not come back the same)."""
    if not isinstance(record, dict) or not record.get("sha256"):
        return FULL_DECODER, "full (the model's own VAE)"
    for label, sha in cache.decoder_sha.items():
        if sha == record["sha256"]:
            return label, f"{label} (the tiny decoder the image records, sha256 {sha[:10]})"
    return FULL_DECODER, (
        f"the image was decoded by a tiny decoder this server does not serve (sha256 {str(record['sha256'])[:10]}); "
        "sent with the model's own VAE: the image will differ"
    )


def lora_summary(record: dict) -> str:
    """'lcm ×0.8 (72 layers, 56 skipped)': one merged LoRA, for the info line."""
    skipped = f", {record['layers_skipped']} skipped" if record["layers_skipped"] else ""
    return f"{record['name']} ×{record['scale']:g} ({record['layers_applied']} layers{skipped})"


def own_sampling(cache: ModelCache, model) -> tuple[int, float]:
    """The steps and guidance MODEL samples with by default (a step-distilled student's own, e.g. LCM 4 steps;
    else 25 and 7.5), read from its folder without loading it: the Generate tab's sliders follow the model."""
    from slimsd.models.loading import model_sampling

    model, _ = cache.admit(model)
    own = g.sampling_defaults(model_sampling(model))
    return own["steps"], own["guidance"]


def run_compare(
    cache: ModelCache,
    models,
    prompt,
    negative,
    steps,
    guidance,
    seed,
    scheduler,
    own_steps=True,
    decoders=None,
    progress=None,
    warn=None,
):
    """The same prompt and seed on each model in turn, with each of ``decoders`` (default: the model's own VAE;
    the same latents decoded by each) -> (gallery items, table rows). With ``own_steps``, a step-distilled model
    samples at its own steps and guidance (an LCM student: 4 steps, its guidance embedding) and every other model
    at ``steps`` and ``guidance``: a comparison as each is meant to be used."""
    models = [models] if isinstance(models, str) else list(models or [])
    if not models:
        raise SlimsdError("no model selected; tick at least one model to compare")
    models = [cache.admit(m)[0] for m in models]  # every one, before the first is run
    decoders = [decoders] if isinstance(decoders, str) else list(decoders or [FULL_DECODER])
    for d in decoders:
        cache.decoder(d)  # a decoder not served: refused before anything runs
    runs = [(m, d) for m in models for d in decoders]
    prompt, negative = _text(prompt, "prompt").strip(), _text(negative, "negative prompt")
    guidance = _number(guidance, "guidance")
    if not prompt:
        raise SlimsdError("the prompt is empty; type what the images should show")
    seed = _int(seed, "seed")
    seed = g.draw_seed() if seed == -1 else seed
    steps = _int(steps, "steps")
    scheduler = None if scheduler in (None, "", DEFAULT_SCHEDULER) else scheduler
    g.validate(steps=steps, guidance=guidance, width=64, height=64, seed=seed, scheduler=scheduler)
    items, rows = [], []
    for k, (model, decoder) in enumerate(runs):
        start = time.perf_counter()
        with cache.using(model, None, decoder) as pipe:
            load_s = time.perf_counter() - start
            unet_m = sum(p.numel() for p in pipe.unet.parameters()) / 1e6

            def step(done, total, _k=k, _m=model):
                if progress is not None:
                    progress((_k * total + done, len(runs) * total), desc=_m)

            distilled = bool(own_steps) and bool(pipe._slimsd.get("sampling"))
            (r,) = g.generate(
                pipe,
                prompt,
                negative=negative,
                steps=None if distilled else steps,
                guidance=None if distilled else guidance,
                seed=seed,
                scheduler=None if distilled else scheduler,
                progress=step,
                on_warning=warn,
            )
        save_images([r], cache.config.out_dir)
        label = f"{model} · {decoder}" if cache.decoder(decoder) else model
        items.append((str(r.path), f"{label} · {r.settings.steps} steps · {r.time_s:.2f} s"))
        row = [model, r.settings.steps, round(r.time_s, 3), round(load_s, 2), round(unet_m, 2), r.seed]
        rows.append([*row, cache.decoder(decoder) or FULL_DECODER])
    return items, rows


def settings_fields(gr, cache: ModelCache, config: UIConfig, models: list[str], prefix: str = "") -> dict:
    """The model and the settings a generation takes (prompt, negative prompt, the "Advanced" accordion),
    by the names of :func:`run_generate`'s parameters; element ids start with PREFIX. The Generate and img2img
    tabs each have a set; the sliders follow the model (an LCM student samples in 4 steps)."""
    schedulers = [DEFAULT_SCHEDULER, *SCHEDULERS]
    f: dict = {}
    with gr.Row():
        f["model"] = gr.Dropdown(
            models,
            value=models[0],
            label="Model",
            allow_custom_value=config.allow_custom_models,
            info=(
                "A listed model, or type a preset, local diffusers folder or hub id"
                if config.allow_custom_models
                else "The models this server offers"
            ),
            scale=3,
        )
        f["unload"] = gr.Button("Unload model", scale=1)
    f["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"{prefix}prompt")
    f["negative"] = gr.Textbox(value="", label="Negative prompt", lines=1, elem_id=f"{prefix}negative")
    with gr.Accordion("Advanced", open=False, elem_id=f"{prefix}advanced"):
        with gr.Row():
            first_steps, first_guidance = own_sampling(cache, models[0])
            f["steps"] = gr.Slider(
                1, g.STEPS_RANGE[1], value=first_steps, step=1, label="Steps", elem_id=f"{prefix}steps"
            )
            f["guidance"] = gr.Slider(
                0, g.GUIDANCE_RANGE[1], value=first_guidance, step=0.5, label="Guidance (CFG)"
            )
        with gr.Row():
            own = "the image's" if prefix else "the model's own"
            f["width"] = gr.Slider(0, g.SIZE_RANGE[1], value=0, step=8, label=f"Width (0: {own})")
            f["height"] = gr.Slider(0, g.SIZE_RANGE[1], value=0, step=8, label=f"Height (0: {own})")
        with gr.Row():
            f["seed"] = gr.Number(value=0, precision=0, label="Seed (image i uses seed+i)")
            f["randomize"] = gr.Checkbox(value=True, label="Randomize seed")
            f["num_images"] = gr.Slider(
                1, 8, value=1 if prefix else 2, step=1, label="Images", elem_id=f"{prefix}num-images"
            )
            f["scheduler"] = gr.Dropdown(schedulers, value=DEFAULT_SCHEDULER, label="Scheduler")
            f["deep_cache"] = gr.Slider(
                1,
                INTERVAL_RANGE[1],
                value=1,
                step=1,
                label="Deep cache (full U-Net every N steps; 1: off)",
                elem_id=f"{prefix}deep-cache",
            )
            dtypes = (
                ("fp16", "bf16", "fp32") if cache.device.startswith(("cuda", "mps")) else ("bf16", "fp32")
            )
            f["dtype"] = gr.Dropdown(
                [DEFAULT_DTYPE, *dtypes],
                value=DEFAULT_DTYPE,
                label=f"Precision (server default: {cache.dtype})",
                elem_id=f"{prefix}dtype",
            )
            if not prefix:  # img2img encodes the init image: the model's own VAE only
                f["decoder"] = gr.Dropdown(
                    cache.decoders,
                    value=FULL_DECODER,
                    label="Decoder (full: the model's VAE; tiny: distilled, faster, less detail)",
                    visible=len(cache.decoders) > 1,
                    elem_id=f"{prefix}decoder",
                )

    def on_model(name):
        try:
            return own_sampling(cache, name)
        except SlimsdError:
            return gr.update(), gr.update()

    f["model"].change(on_model, [f["model"]], [f["steps"], f["guidance"]], queue=False, api_name=False)
    return f


def result_fields(gr, prefix: str = ""):
    """The PNG gallery (its files are the PNGs written, so a download keeps the metadata) and the info line."""
    gallery = gr.Gallery(
        label="Images",
        format="png",
        type="filepath",
        columns=4,
        elem_id=f"{prefix}gallery",
        buttons=["download", "fullscreen"],
    )
    return gallery, gr.Markdown(elem_id=f"{prefix}info")


def wired(fn, fields: dict) -> list:
    """FIELDS named like FN's parameters, in its order: the wiring cannot drift."""
    return [fields[n] for n in inspect.signature(fn).parameters if n in fields]


def png_info_tab(gr, cache: ModelCache, generate_fields: dict, tabs) -> None:
    """A1111's "PNG Info": drop a PNG, read what it records, send its settings (the dtype included) to the
    Generate tab, which then reproduces the image."""
    png = gr.File(label="A PNG slimsd or AUTOMATIC1111 wrote", file_types=[".png"], elem_id="png")
    info = gr.Markdown(elem_id="png-info")
    send = gr.Button("Send to Generate", variant="primary", elem_id="png-send")
    values = gr.State([])

    def on_png(file):
        if file is None:
            return [], ""
        try:
            return from_png(cache, file)
        except SlimsdError as e:
            raise gr.Error(str(e)) from None

    def on_send(read):
        if not read:
            raise gr.Error("no PNG read yet; upload one first")
        return [*read, gr.Tabs(selected="generate")]

    png.change(on_png, [png], [values, info], api_name=False, queue=False)
    outputs = [*wired(run_generate, generate_fields), tabs]
    send.click(on_send, [values], outputs, api_name=False, queue=False)


def build_app(config: UIConfig | None = None, cache: ModelCache | None = None):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr

    config = config or UIConfig()
    cache = cache or ModelCache(config)
    models = cache.models
    schedulers = [DEFAULT_SCHEDULER, *SCHEDULERS]  # the Compare tab's

    def handler(fn):
        """``fn(cache, *inputs, progress, warn)`` as a Gradio event: the inputs keep fn's names (the API's
        parameter names), Gradio's progress bar and warnings are passed in, errors show in the page."""

        def on_event(*inputs, **progress):  # Gradio fills `progress` in where the signature below puts it
            try:
                return fn(cache, *inputs, warn=gr.Warning, **progress)
            except SlimsdError as e:
                raise gr.Error(str(e)) from None
            except Exception as e:  # e.g. a broken checkpoint: show it in the page; the app keeps serving
                raise gr.Error(f"{type(e).__name__}: {e}") from e

        params = [p for name, p in inspect.signature(fn).parameters.items() if name not in ("cache", "warn")]
        params = [p.replace(default=gr.Progress()) if p.name == "progress" else p for p in params]
        on_event.__signature__ = inspect.Signature(params)
        return on_event

    on_generate, on_compare = handler(run_generate), handler(run_compare)

    def on_unload(model):
        try:
            dropped = cache.drop(model)
        except SlimsdError as e:
            raise gr.Error(str(e)) from None
        state = ", ".join(cache.loaded()) or "none"
        return f"{'Unloaded' if dropped else 'Not loaded:'} {model.strip()}. Loaded now: {state}."

    with gr.Blocks(title="slimsd", analytics_enabled=False) as app:
        gr.Markdown(
            "# slimsd\nDistilled Stable Diffusion: generate, from text or from an image, and compare models "
            "side by side."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                fields = generate_fields = settings_fields(gr, cache, config, models)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery, info = result_fields(gr)
                status = gr.Markdown()
                run.click(
                    on_generate,
                    wired(run_generate, fields),
                    [gallery, info],
                    api_name="generate",
                    concurrency_id="device",
                    preprocess=False,  # raw values: the model check is ModelCache.admit's, one message for all
                )
                fields["unload"].click(
                    on_unload, [fields["model"]], [status], api_name="unload", queue=False, preprocess=False
                )
            with gr.Tab("img2img"):
                fields = settings_fields(gr, cache, config, models, prefix="img2img-")
                with gr.Row():
                    fields["init_image"] = gr.Image(
                        type="filepath", label="Init image", elem_id="img2img-init", format="png"
                    )
                    fields["mask"] = gr.Image(
                        type="filepath",
                        label="Mask (optional; white is repainted, black kept; the init image's size)",
                        elem_id="img2img-mask",
                        format="png",
                    )
                fields["strength"] = gr.Slider(
                    0.01,
                    1,
                    value=g.DEFAULT_STRENGTH,
                    step=0.01,
                    label="Denoising strength (1: nothing of the image is kept)",
                    elem_id="img2img-strength",
                )
                i_run = gr.Button("Generate from the image", variant="primary", elem_id="img2img-generate")
                i_gallery, i_info = result_fields(gr, prefix="img2img-")
                i_status = gr.Markdown()
                fields["unload"].click(
                    on_unload, [fields["model"]], [i_status], api_name=False, queue=False, preprocess=False
                )
                i_run.click(
                    handler(run_img2img),
                    wired(run_img2img, fields),
                    [i_gallery, i_info],
                    api_name="img2img",
                    concurrency_id="device",
                    # raw values, as for /generate; Gradio still checks that a file payload is an upload
                    preprocess=False,
                )
            with gr.Tab("Compare"):
                c_models = gr.CheckboxGroup(models, value=models[:2], label="Models")
                c_prompt = gr.Textbox(label="Prompt", lines=2)
                c_negative = gr.Textbox(value="", label="Negative prompt")
                with gr.Row():
                    c_steps = gr.Slider(1, g.STEPS_RANGE[1], value=25, step=1, label="Steps")
                    c_guidance = gr.Slider(
                        0, g.GUIDANCE_RANGE[1], value=7.5, step=0.5, label="Guidance (CFG)"
                    )
                    c_seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
                    c_scheduler = gr.Dropdown(schedulers, value=DEFAULT_SCHEDULER, label="Scheduler")
                c_own = gr.Checkbox(
                    value=True,
                    label="Step-distilled models at their own steps and guidance (others: the sliders)",
                )
                c_decoders = gr.CheckboxGroup(
                    cache.decoders,
                    value=[FULL_DECODER],
                    label="Decoders (each model with each: the same latents decoded by each)",
                    visible=len(cache.decoders) > 1,
                )
                c_run = gr.Button("Compare", variant="primary")
                c_gallery = gr.Gallery(label="Side by side", format="png", type="filepath", columns=4)
                c_table = gr.Dataframe(
                    headers=["model", "steps", "generate s", "load s", "U-Net params (M)", "seed", "decoder"],
                    label="Times (generation excludes loading)",
                    interactive=False,
                )
                c_run.click(
                    on_compare,
                    [
                        c_models,
                        c_prompt,
                        c_negative,
                        c_steps,
                        c_guidance,
                        c_seed,
                        c_scheduler,
                        c_own,
                        c_decoders,
                    ],
                    [c_gallery, c_table],
                    api_name="compare",
                    concurrency_id="device",
                    preprocess=False,
                )
            with gr.Tab("PNG info", id="png-info"):
                png_info_tab(gr, cache, generate_fields, tabs)
    app.queue(max_size=config.max_queue, default_concurrency_limit=config.concurrency)
    app.slimsd_cache = cache
    return app


def launch(
    config: UIConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
):
    """Serve the app; on 127.0.0.1 unless HOST says otherwise, and public only with ``share=True``."""
    import gradio as gr

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    config.out_dir = Path(config.out_dir).resolve()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    app = build_app(config)
    # System fonts: the default theme fetches Google Fonts, which an offline machine cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(config.out_dir)],
        prevent_thread_lock=not block,
        show_error=True,
        theme=theme,
        footer_links=["api"],
    )
    return app
