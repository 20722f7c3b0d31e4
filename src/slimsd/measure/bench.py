"""Latency, memory, parameters and MACs of diffusion models, side by side: slimsd as users run it, and plain
diffusers beside it.

Each model is measured as one or more *variants*, one row each:

- ``slimsd``: what ``slimsd generate`` runs: :func:`slimsd.load` (the fast runtime, unless ``optimize=False``) in
  the dtype of the device/dtype policy, images made by :func:`slimsd.run.generate.generate`;
- with ``baseline="diffusers"``, plain diffusers (the same weights, eager, its own layout and attention, the
  pipeline called as a diffusers user calls it) in the **same dtype** as slimsd (like for like: the runtime's own
  gain) and in **diffusers' default dtype**, fp32 (what a user gets without slimsd). Where the two are the same
  dtype there is one diffusers row.

Per row:

- U-Net parameters and MACs (``slimsd.models.counting``, BK-SDM's convention: convs and linears, batch 1);
- U-Net per-step latency: the median of ``repeats`` timed forwards at batch 1 after ``warmup`` untimed ones
  (CUDA events on a GPU, ``perf_counter`` on CPU). All U-Nets of all variants are timed round-robin, A B C A B C
  ..., so that a noisy, shared machine slows all of them alike and the ratios between them stay meaningful;
- end to end, per image: text encoding + ``steps`` U-Net steps at the classifier-free-guidance batch + VAE
  decoding (each part timed where it is called), and images/s at each of ``batch_sizes``; the slimsd rows
  with ``deep_cache`` N run the whole U-Net on every N-th step only (:mod:`slimsd.run.deepcache`);
- peak memory during generation: CUDA max allocated on a GPU; on CPU the process's peak RSS (VmHWM), reset
  through ``/proc/self/clear_refs`` just before the timed run so that each variant is measured alone.

Process-wide settings (threads, flush-to-zero for denormals) are applied once, before any variant is built, so
every row runs under the same ones; they are recorded with the device, dtype, versions, date, CPU model and
load average. Results go out as a Markdown table, JSON rows and a bar chart (PNG).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import io
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from slimsd import devices
from slimsd.errors import SlimsdError
from slimsd.models import runtime
from slimsd.models.decoders import check_decoder, decoder_record
from slimsd.run.deepcache import check_interval

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
DIFFUSERS_DEFAULT_DTYPE = torch.float32  # what DiffusionPipeline.from_pretrained gives without torch_dtype
LABELS = {
    "slimsd": "slimsd",
    "diffusers": "diffusers (same dtype, also its default)",
    "diffusers-same-dtype": "diffusers (same dtype)",
    "diffusers-default-dtype": "diffusers (its default dtype)",
}


@dataclass
class BenchConfig:
    models: list[str]
    resolution: int | None = None  # None: each model's own (512 SD-class, 1024 SDXL-class, 64 micro)
    steps: int | None = None  # None: a step-distilled model's own, else 25 on a GPU (the articles'), 4 on CPU
    device: str = "auto"
    dtype: str = "auto"
    random_weights: bool = False
    baseline: str | None = None  # "diffusers": plain diffusers, same weights, timed alongside
    batch_sizes: list[int] | None = None  # None: [1] on CPU, [1, 4] on a GPU
    warmup: int = 1
    repeats: int = 3
    e2e: bool = True
    e2e_repeats: int = 1  # timed end-to-end runs per variant and batch size (alternating; the median is kept)
    deep_cache: int = 1  # the slimsd end-to-end runs' deep-cache interval (slimsd.run.deepcache); 1: off
    optimize: bool = True  # the slimsd rows with the fast runtime (False: slimsd's loader, plain modules)
    compile: bool = False
    channels_last: bool = True
    fuse_qkv: bool = True
    threads: int | None = None
    guidance: float | None = None  # None: a step-distilled model's own, else 7.5
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    allow_pickle: bool = False
    prediction_type: str | None = None  # None: each model's own
    vae: str | None = None  # a tiny decoder (folder or file) every variant decodes with (models.decoders)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    name: str  # a key of LABELS
    dtype: torch.dtype
    slimsd: bool  # slimsd's runtime and generation path, or plain diffusers


def variants(cfg: BenchConfig, rt: runtime.RuntimeConfig) -> list[Variant]:
    out = [Variant("slimsd", rt.dtype, True)]
    if cfg.baseline == "diffusers":
        if rt.dtype == DIFFUSERS_DEFAULT_DTYPE:
            out.append(Variant("diffusers", rt.dtype, False))
        else:
            out.append(Variant("diffusers-same-dtype", rt.dtype, False))
            out.append(Variant("diffusers-default-dtype", DIFFUSERS_DEFAULT_DTYPE, False))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Environment and memory


def environment(rt: runtime.RuntimeConfig) -> dict:
    import diffusers

    env = {
        "device": rt.device,
        "device_name": devices.device_name(rt.device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": devices.cpu_model(),
        "cpu_isa": devices.cpu_isa(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "process": runtime.process_settings(),
    }
    with contextlib.suppress(OSError):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory(device: str) -> tuple[int | None, str]:
    """(bytes, what was measured) since the last :func:`reset_peak_memory`."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024, "peak_rss"
    except OSError:
        pass
    import resource  # no /proc (macOS): the process-lifetime peak, not reset per model

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if platform.system() == "Darwin" else 1024), "peak_rss_process"


# ---------------------------------------------------------------------------------------------------------------
# Timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``fn`` (CUDA events on a GPU)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict:
    """Times each function ``repeats`` times, interleaved (A B A B ...), after ``warmup`` untimed calls each.

    Returns name -> {"first_s": the first call (compilation, if any), "times_s": [...], "median_ms": ...}.
    """
    out = {name: {"times_s": []} for name in fns}
    with torch.inference_mode():
        for name, fn in fns.items():
            first = time_once(fn, device)
            out[name]["first_s"] = first
            for _ in range(max(warmup - 1, 0)):
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                out[name]["times_s"].append(time_once(fn, device))
    for r in out.values():
        r["median_ms"] = statistics.median(r["times_s"]) * 1000 if r["times_s"] else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Models


def build_unet(model: str, cfg: BenchConfig, dtype: torch.dtype):
    """Just the U-Net of ``model`` (cheaper than a pipeline): random presets are built from their config."""
    from slimsd.models.presets import PRESETS

    if cfg.random_weights and model in PRESETS and PRESETS[model].kind != "micro":
        from diffusers import UNet2DConditionModel

        from slimsd.models.counting import preset_architecture
        from slimsd.models.loading import default_dtype

        with torch.random.fork_rng(devices=[]), default_dtype(dtype):
            torch.manual_seed(cfg.seed)
            return UNet2DConditionModel.from_config(preset_architecture(model)[0])
    return load_variant(model, replace(cfg, vae=None), Variant("diffusers", dtype, False), "cpu").unet


def load_variant(model: str, cfg: BenchConfig, variant: Variant, device: str):
    """The pipeline a variant runs: slimsd.load with the runtime, or the plain diffusers pipeline (the same
    weights: slimsd's loader with ``optimize=False`` hands over diffusers' own object, untouched). With
    ``cfg.vae`` both decode with the tiny decoder (diffusers' rows: ``pipe.vae = AutoencoderTiny(DIR)``)."""
    from slimsd.models.loading import load

    return load(
        model,
        device=device,
        dtype=variant.dtype,
        optimize=variant.slimsd and cfg.optimize,
        compile=variant.slimsd and cfg.compile,
        random_weights=cfg.random_weights,
        seed=cfg.seed,
        allow_pickle=cfg.allow_pickle,
        prediction_type=cfg.prediction_type,
        vae=cfg.vae,
    )


def unet_inputs(unet, resolution: int, batch: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random latents and text states of the right shapes (counting.unet_dummy_inputs' shapes)."""
    from slimsd.models.counting import unet_dummy_inputs

    inputs = unet_dummy_inputs(unet, resolution, batch=batch, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)

    def rand(t):
        return torch.randn(t.shape, generator=g).to(device=device, dtype=dtype)

    inputs["sample"] = rand(inputs["sample"])
    inputs["encoder_hidden_states"] = rand(inputs["encoder_hidden_states"])
    inputs["timestep"] = inputs["timestep"].to(device)
    if "added_cond_kwargs" in inputs:
        added = inputs["added_cond_kwargs"]
        added["text_embeds"] = rand(added["text_embeds"])
        added["time_ids"] = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device, dtype=dtype
        )
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def resolve(cfg: BenchConfig) -> tuple[BenchConfig, runtime.RuntimeConfig]:
    """Defaults filled in from the device; checks that every model name resolves (before any work)."""
    from slimsd.models.loading import describe_model

    if not cfg.models:
        raise SlimsdError("no models given; pass --models with at least one model name")
    for m in cfg.models:
        kind = describe_model(m)
        if cfg.random_weights and kind in ("hub", "local", "single-file"):
            raise SlimsdError(f"--random-weights needs preset or micro model names; {m!r} is a {kind} model")
    check_interval(cfg.deep_cache)
    if cfg.vae is not None:
        check_decoder(cfg.vae)
    if cfg.deep_cache > 1 and cfg.compile:
        raise SlimsdError("--deep-cache does not work with --compile; use one or the other")
    if cfg.baseline not in (None, "diffusers"):
        raise SlimsdError(f"unknown baseline {cfg.baseline!r}; allowed: diffusers")
    device = devices.resolve_device(cfg.device)
    rt = runtime.RuntimeConfig(
        device=device,
        dtype=devices.resolve_dtype(cfg.dtype, device),
        channels_last=cfg.channels_last and cfg.optimize,
        fuse_qkv=cfg.fuse_qkv and cfg.optimize,
        compile=cfg.compile,
        threads=cfg.threads,
    )
    gpu = rt.device.startswith("cuda")
    batch_sizes = cfg.batch_sizes or ([1, 4] if gpu else [1])
    if (
        (cfg.steps is not None and cfg.steps < 1)
        or cfg.repeats < 1
        or cfg.e2e_repeats < 1
        or cfg.warmup < 0
        or min(batch_sizes) < 1
    ):
        raise SlimsdError("steps, repeats, e2e repeats and batch sizes must be at least 1, warmup at least 0")
    cfg = replace(cfg, batch_sizes=sorted(set(batch_sizes)))
    return cfg, rt


def e2e_settings(model: str, cfg: BenchConfig, device: str) -> tuple[int, float]:
    """The steps and guidance of MODEL's end-to-end run: as given, else a step-distilled model's own (LCM: 4
    steps, guidance through its embedding), else 25 on a GPU / 4 on a CPU and 7.5."""
    from slimsd.models.loading import model_sampling

    own = model_sampling(model) or {}
    steps = cfg.steps if cfg.steps is not None else own.get("steps", 25 if device.startswith("cuda") else 4)
    guidance = cfg.guidance if cfg.guidance is not None else own.get("guidance", 7.5)
    return int(steps), float(guidance)


def model_resolution(model: str, cfg: BenchConfig) -> int:
    from slimsd.models.counting import summarize

    return cfg.resolution or summarize(model)["resolution"]


def count(model: str, resolution: int) -> dict:
    from slimsd.models.counting import summarize

    s = summarize(model, resolution)
    keep = (
        "model",
        "kind",
        "resolution",
        "unet_params",
        "unet_macs",
        "text_encoder_params",
        "vae_params",
        "total_params",
    )
    return {k: s[k] for k in keep}


def measure_step_latency(
    cfg: BenchConfig, rt: runtime.RuntimeConfig, kinds: list[Variant], resolutions: dict[str, int]
) -> dict:
    """(model, variant name) -> timing, the runtime in effect, and the largest difference of its output from
    slimsd's on the same inputs; all U-Nets of all variants timed round-robin in one loop."""
    modules, fns = {}, {}
    for model in cfg.models:
        unet = build_unet(model, cfg, rt.dtype)
        for v in kinds:  # the diffusers copies first: the slimsd one is then made from the original, in place
            if not v.slimsd:
                modules[(model, v.name)] = (
                    copy.deepcopy(unet).eval().requires_grad_(False).to(rt.device, v.dtype)
                )
        if cfg.optimize:
            modules[(model, "slimsd")] = runtime.optimize_unet(unet, rt)
        else:
            modules[(model, "slimsd")] = unet.eval().requires_grad_(False).to(rt.device, rt.dtype)
        del unet
    inputs = {}
    for (model, name), module in modules.items():
        dtype = next(v.dtype for v in kinds if v.name == name)
        inputs[(model, name)] = unet_inputs(module, resolutions[model], 1, rt.device, dtype, seed=cfg.seed)
        fns[(model, name)] = _caller(module, inputs[(model, name)])
    timings = time_round_robin(fns, rt.device, cfg.warmup, cfg.repeats)
    with torch.inference_mode():
        outputs = {key: module(**inputs[key]).sample.float().cpu() for key, module in modules.items()}
    for (model, name), timing in timings.items():
        diff = outputs[(model, name)] - outputs[(model, "slimsd")]
        timing["max_abs_diff_vs_slimsd"] = diff.abs().max().item()
        timing["applied"] = runtime.applied(
            modules[(model, name)], optimized=name == "slimsd" and cfg.optimize
        )
    return timings


def _caller(unet, inputs):
    return lambda: unet(**inputs)


class _Stopwatch:
    """Accumulates the time spent inside wrapped calls (text encoders, VAE decode)."""

    def __init__(self, device: str):
        self.device, self.seconds = device, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.seconds += time.perf_counter() - t0
            return out

        return timed


def generate_timed(
    pipe, cfg: BenchConfig, variant: Variant, resolution: int, batch: int, steps: int, guidance: float
) -> dict:
    """One batch of images made the way the variant's users make them, timed: total, text encoding, VAE
    decoding, and denoising (the rest: U-Net steps at the CFG batch, scheduler, latents in and out)."""
    device = str(pipe.device)
    text, vae = _Stopwatch(device), _Stopwatch(device)
    patched = []
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            patched.append((enc, "forward", enc.forward))
            enc.forward = text.wrap(enc.forward)
    patched.append((pipe.vae, "decode", pipe.vae.decode))
    pipe.vae.decode = vae.wrap(pipe.vae.decode)
    try:
        _sync(device)
        t0 = time.perf_counter()
        if variant.slimsd:  # what `slimsd generate` runs
            from slimsd.run.generate import generate

            generate(
                pipe,
                cfg.prompt,
                steps=steps,
                guidance=guidance,
                width=resolution,
                height=resolution,
                seed=cfg.seed,
                num_images=batch,
                batch_size=batch,
                deep_cache=cfg.deep_cache,
                on_warning=lambda _msg: None,
            )
        else:  # what a diffusers user writes
            with torch.inference_mode():
                pipe(
                    cfg.prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    num_images_per_prompt=batch,
                    generator=torch.Generator("cpu").manual_seed(cfg.seed),
                    output_type="pil",
                )
        _sync(device)
        total = time.perf_counter() - t0
    finally:
        for obj, attr, original in patched:
            setattr(obj, attr, original)
    return {
        "total_s": total,
        "text_encode_s": text.seconds,
        "vae_decode_s": vae.seconds,
        "denoise_s": total - text.seconds - vae.seconds,
    }


def resident_memory(device: str) -> int | None:
    """Memory in use now: CUDA allocated bytes on a GPU, the process's resident set on CPU (Linux)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def decoder_params(pipe) -> int | None:
    """Parameters of the decoder PIPE decodes with (the model's VAE decoder or a tiny one); None where it is not
    a torch module (an exported runtime's session)."""
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    return sum(p.numel() for p in decoder.parameters()) if isinstance(decoder, torch.nn.Module) else None


def weights_bytes(pipe) -> int:
    """Bytes of the pipeline's parameters and buffers (every component)."""
    total = 0
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*part.parameters(), *part.buffers()))
    return total


def measure_end_to_end(
    model: str, cfg: BenchConfig, kinds: list[Variant], device: str, resolution: int
) -> dict:
    """Per variant of one model: time per image (parts apart), images/s per batch size, and peak memory.

    The variants' pipelines are resident together and their timed runs alternate (A B, B A, A B ...; the median
    of ``e2e_repeats`` is kept), so that a shared machine slows them alike. Peak memory is therefore measured per
    run as the increase over what was resident before it (activations, workspace), plus the variant's own
    weights: the memory that variant alone needs.
    """
    pipes = {v.name: load_variant(model, cfg, v, device) for v in kinds}
    steps, guidance = e2e_settings(model, cfg, device)
    out: dict[str, dict] = {v.name: {"images_per_s": {}, "steps": steps, "guidance": guidance} for v in kinds}
    for v in kinds:  # warm-up (and compilation, if any)
        t0 = time.perf_counter()
        generate_timed(pipes[v.name], cfg, v, resolution, 1, 1, guidance)
        out[v.name]["warmup_s"] = time.perf_counter() - t0
    for batch in cfg.batch_sizes:
        runs: dict[str, list] = {v.name: [] for v in kinds}
        for r in range(cfg.e2e_repeats):
            for v in kinds if r % 2 == 0 else kinds[::-1]:  # A B, B A, ...: no variant always goes first
                before = resident_memory(device)
                reset_peak_memory(device)
                t = generate_timed(pipes[v.name], cfg, v, resolution, batch, steps, guidance)
                peak, kind = peak_memory(device)
                working = None if before is None or peak is None else max(peak - before, 0)
                runs[v.name].append((t, working, kind))
        for v in kinds:
            o = out[v.name]
            t, working, kind = sorted(runs[v.name], key=lambda r: r[0]["total_s"])[len(runs[v.name]) // 2]
            if batch == cfg.batch_sizes[0]:
                o.update({k: x / batch for k, x in t.items()})  # per image
                o["e2e_all_s"] = [r[0]["total_s"] / batch for r in runs[v.name]]
                weights = weights_bytes(pipes[v.name])
                o["peak_memory_bytes"] = None if working is None else weights + working
                o["peak_memory_kind"] = f"weights + increase of {kind}"
                o["e2e_batch"] = batch
                o["deep_cache"] = cfg.deep_cache if v.slimsd else 1  # plain diffusers has none
            o["images_per_s"][str(batch)] = batch / t["total_s"]
    for v in kinds:
        out[v.name]["runtime"] = pipes[v.name]._slimsd["runtime"]
        out[v.name]["vae_decoder_params"] = decoder_params(pipes[v.name])
    del pipes
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def run(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmarks every model of ``cfg``; returns one JSON-ready row per model and variant."""
    log = log or (lambda _msg: None)
    cfg, rt = resolve(cfg)
    threads = torch.get_num_threads()
    try:
        # Once, before anything is built: every variant runs under the same process-wide settings.
        runtime.apply_process_settings(rt)
        return _run(cfg, rt, log)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(cfg: BenchConfig, rt: runtime.RuntimeConfig, log: Callable[[str], None]) -> list[dict]:
    env = environment(rt)
    kinds = variants(cfg, rt)
    resolutions = {m: model_resolution(m, cfg) for m in cfg.models}
    counts = {m: count(m, resolutions[m]) for m in cfg.models}
    decoder = decoder_record(cfg.vae) if cfg.vae is not None else None  # every row's: None, each model's VAE
    log(
        f"step latency: {', '.join(cfg.models)} x {', '.join(v.name for v in kinds)} round-robin, "
        f"{cfg.warmup} warm-up + {cfg.repeats} timed forwards"
    )
    steps = measure_step_latency(cfg, rt, kinds, resolutions)
    rows = []
    for model in cfg.models:
        for v in kinds:
            s = steps[(model, v.name)]
            rows.append(
                {
                    **counts[model],
                    "variant": v.name,
                    "label": LABELS[v.name],
                    "dtype": devices.dtype_name(v.dtype),
                    "step_latency_ms": s["median_ms"],
                    "step_latency_all_ms": [t * 1000 for t in s["times_s"]],
                    "first_call_s": s["first_s"],  # includes torch.compile's warm-up when compiling
                    "max_abs_diff_vs_slimsd": s["max_abs_diff_vs_slimsd"],
                    "step_runtime": s["applied"],
                    "vae": decoder,
                }
            )
    if cfg.e2e:
        for model in cfg.models:
            log(
                f"end to end: {model} ({', '.join(v.name for v in kinds)} alternating), "
                f"{e2e_settings(model, cfg, rt.device)[0]} steps, "
                f"batch sizes {cfg.batch_sizes}, {cfg.e2e_repeats} timed run(s) each"
            )
            e2e = measure_end_to_end(model, cfg, kinds, rt.device, resolutions[model])
            for row in rows:
                if row["model"] == model:
                    row.update(e2e[row["variant"]])
                    row["e2e_s"] = row.pop("total_s")
    _ratios(rows)
    for row in rows:
        row.update(env)
        row["requested_runtime"] = runtime.describe(rt)["requested"]
    return rows


def _ratios(rows: list[dict]) -> None:
    """Within each variant, every model against the first model (its MAC ratio and step speed-up); on each
    slimsd row, its speed-up over each diffusers variant of the same model (step, and end to end)."""
    first = {}
    for row in rows:
        ref = first.setdefault(row["variant"], row)
        row["mac_ratio_vs_first"] = ref["unet_macs"] / row["unet_macs"]
        row["speedup_vs_first"] = ref["step_latency_ms"] / row["step_latency_ms"]
        row["speedup_over_mac_ratio"] = row["speedup_vs_first"] / row["mac_ratio_vs_first"]
    for row in rows:
        if row["variant"] != "slimsd":
            continue
        for other in rows:
            if other["model"] == row["model"] and other["variant"] != "slimsd":
                row[f"step_speedup_vs_{other['variant']}"] = other["step_latency_ms"] / row["step_latency_ms"]
                if "e2e_s" in row:
                    row[f"e2e_speedup_vs_{other['variant']}"] = other["e2e_s"] / row["e2e_s"]


# ---------------------------------------------------------------------------------------------------------------
# Output


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (one row per model and variant), the environment in a line below."""
    has_e2e = any("e2e_s" in r for r in rows)
    slimsd_rows = {r["model"]: r for r in rows if r["variant"] == "slimsd"}
    head = [
        "model",
        "run",
        "dtype",
        "px",
        "U-Net params (M)",
        "U-Net MACs (G)",
        "step ms",
        "slimsd step speed-up",
    ]
    head += ["MAC ratio", "step speed-up", "speed-up / MAC ratio"]
    if has_e2e:
        head += ["steps", "text s", "denoise s", "VAE s", "s / image", "slimsd e2e speed-up", "images/s"]
        head += ["peak mem (GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        mine = slimsd_rows.get(r["model"], {})
        vs = mine.get(f"step_speedup_vs_{r['variant']}")
        deep_cache = r.get("deep_cache", 1)
        cells = [
            r["model"],
            r["label"] + (f", deep cache {deep_cache}" if deep_cache > 1 else ""),
            r["dtype"],
            str(r["resolution"]),
            _fmt(r["unet_params"] / 1e6),
            f"{r['unet_macs'] / 1e9:,.3g}",
            _fmt(r["step_latency_ms"]),
            "–" if vs is None else _fmt(vs, 2) + "×",
            _fmt(r["mac_ratio_vs_first"], 2),
            _fmt(r["speedup_vs_first"], 2),
            f"{100 * r['speedup_over_mac_ratio']:.0f}%",
        ]
        if has_e2e:
            ips = ", ".join(f"{v:.3g} @{b}" for b, v in r.get("images_per_s", {}).items())
            mem = r.get("peak_memory_bytes")
            e2e_vs = mine.get(f"e2e_speedup_vs_{r['variant']}")
            cells += [
                str(r.get("steps", "–")),
                _fmt(r.get("text_encode_s"), 2),
                _fmt(r.get("denoise_s"), 2),
                _fmt(r.get("vae_decode_s"), 2),
                _fmt(r.get("e2e_s"), 2),
                "–" if e2e_vs is None else _fmt(e2e_vs, 2) + "×",
                ips or "–",
                _fmt(mem / 2**30 if mem else None, 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    applied = r["step_runtime"]
    proc = r["process"]
    load = f", load average {r['load_average']}" if r.get("load_average") else ""
    isa = f"; {' '.join(r['cpu_isa'])}" if r.get("cpu_isa") and r["device"] == "cpu" else ""
    lines.append("")
    lines.append(
        f"{r['date']} · {r['device']} ({r['device_name']}{isa}), {r['threads']} threads"
        f"{', flush-denormal' if proc.get('flush_denormal') else ''} (every row) · "
        f"decoder: {_decoder(r.get('vae'))} · "
        f"slimsd runtime: {runtime.summary(applied)} · torch {r['torch']}, diffusers {r['diffusers']}{load}. "
        f"Step latency: median of {len(r['step_latency_all_ms'])} forwards at batch 1, all rows round-robin; "
        "speed-up and MAC ratios relative to the first model of the same run; slimsd speed-up: the diffusers "
        "row's time over slimsd's."
    )
    return "\n".join(lines) + "\n"


def _decoder(record: dict | None) -> str:
    """The decoder every row used, for the table's footnote."""
    if not record:
        return "each model's VAE"
    return f"tiny decoder {record['path']} (sha256 {record['sha256'][:10]})"


def chart_png(rows: list[dict], title: str | None = None) -> bytes:
    """A bar chart of per-step U-Net latency per model and variant, and of U-Net MACs, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(names)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(models), 4), dpi=100)
    xs = range(len(models))
    for k, name in enumerate(names):
        ms = {r["model"]: r["step_latency_ms"] for r in rows if r["variant"] == name}
        ax.bar(
            [x - 0.4 + width * (k + 0.5) for x in xs],
            [ms.get(m, 0) for m in models],
            width,
            label=f"{LABELS[name]}, {next(r['dtype'] for r in rows if r['variant'] == name)}",
        )
    ax.legend(fontsize=7)
    ax.set_xticks(list(xs), models, rotation=20, ha="right")
    ax.set_ylabel("U-Net step latency (ms, batch 1)")
    macs = {r["model"]: r["unet_macs"] for r in rows}
    ax2.bar(xs, [macs[m] / 1e9 for m in models], 0.6, color="tab:gray")
    ax2.set_xticks(list(xs), models, rotation=20, ha="right")
    ax2.set_ylabel("U-Net MACs (G)")
    r = rows[0]
    fig.suptitle(title or f"{r['device_name']} · {r['date'][:10]}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
