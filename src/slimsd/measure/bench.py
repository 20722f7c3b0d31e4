"""Latency, memory, parameters and MACs of diffusion models, side by side.

For each model ``run`` reports:

- U-Net parameters and MACs (``slimsd.models.counting``, BK-SDM's convention: convs and linears, batch 1);
- U-Net per-step latency: the median of ``repeats`` timed forwards at batch 1 after ``warmup`` untimed ones
  (CUDA events on a GPU, ``perf_counter`` on CPU). The U-Nets of all models (and, with ``baseline``, plain
  diffusers eager copies of them) are timed round-robin, A B C A B C ..., so that a noisy, shared machine
  slows all of them alike and the ratios between them stay meaningful;
- end to end, the time of one image at ``steps`` steps with classifier-free guidance, split into text
  encoding, denoising (U-Net + scheduler) and VAE decoding, and images/s at each of ``batch_sizes``;
- peak memory during generation: CUDA max allocated on a GPU; on CPU the process's peak RSS (VmHWM), reset
  through ``/proc/self/clear_refs`` just before the timed run so that each model is measured alone.

Every row records the device, dtype, torch and diffusers versions, date, CPU model, thread count and load
average. Results go out as a Markdown table, JSON rows and a bar chart (PNG).
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
from slimsd.run import runtime

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class BenchConfig:
    models: list[str]
    resolution: int | None = None  # None: each model's own (512 SD-class, 1024 SDXL-class, 64 micro)
    steps: int | None = None  # None: 25 on a GPU (the articles' setting), 4 on CPU
    device: str = "auto"
    dtype: str = "auto"
    random_weights: bool = False
    baseline: str | None = None  # "diffusers": plain diffusers eager, same weights, timed alongside
    baseline_dtype: str | None = None  # None: the dtype slimsd runs in; "float32": diffusers' default on CPU
    batch_sizes: list[int] | None = None  # None: [1] on CPU, [1, 4] on a GPU
    warmup: int = 1
    repeats: int = 3
    e2e: bool = True
    compile: bool = False
    channels_last: bool = True
    fuse_qkv: bool = True
    threads: int | None = None
    guidance: float = 7.5
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    allow_pickle: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Environment and memory


def environment(rt: runtime.RuntimeConfig) -> dict:
    import diffusers

    env = {
        "device": rt.device,
        "device_name": devices.device_name(rt.device),
        "dtype": devices.dtype_name(rt.dtype),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": devices.cpu_model(),
        "cpu_isa": devices.cpu_isa(),
        "cpu_count": os.cpu_count(),
        "threads": rt.threads or torch.get_num_threads(),
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


def unet_config_of(model: str) -> dict | None:
    """The U-Net config of a preset (students: the recipe applied to the teacher's config), else None."""
    from slimsd.models.presets import PRESETS, get_preset, student_teacher_unet

    if model not in PRESETS or PRESETS[model].kind == "micro":
        return None
    p = get_preset(model)
    cfg = student_teacher_unet(p)
    if p.kind == "student":
        from slimsd.models.architecture import load_recipe, student_config

        cfg = student_config(cfg, load_recipe(p.recipe))
    return cfg


def build_unet(
    model: str, *, random_weights: bool, dtype: torch.dtype, seed: int = 0, allow_pickle: bool = False
):
    """Just the U-Net of ``model`` (cheaper than a pipeline): random presets are built from their config."""
    cfg = unet_config_of(model)
    if cfg is not None and random_weights:
        from diffusers import UNet2DConditionModel

        from slimsd.models.loading import default_dtype

        with torch.random.fork_rng(devices=[]), default_dtype(dtype):
            torch.manual_seed(seed)
            return UNet2DConditionModel.from_config(cfg)
    return build_pipeline(
        model, random_weights=random_weights, dtype=dtype, seed=seed, allow_pickle=allow_pickle
    ).unet


def build_pipeline(
    model: str,
    *,
    random_weights: bool,
    dtype: torch.dtype,
    seed: int = 0,
    allow_pickle: bool = False,
    device: str = "cpu",
    optimize: bool = False,
):
    from slimsd.models.loading import load

    return load(
        model,
        device=device,
        dtype=dtype,
        optimize=optimize,
        random_weights=random_weights,
        seed=seed,
        allow_pickle=allow_pickle,
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
        if cfg.random_weights and kind in ("hub", "local"):
            raise SlimsdError(f"--random-weights needs preset or micro model names; {m!r} is a {kind} model")
    if cfg.baseline not in (None, "diffusers"):
        raise SlimsdError(f"unknown baseline {cfg.baseline!r}; allowed: diffusers")
    device = devices.resolve_device(cfg.device)
    rt = runtime.RuntimeConfig(
        device=device,
        dtype=devices.resolve_dtype(cfg.dtype, device),
        channels_last=cfg.channels_last,
        fuse_qkv=cfg.fuse_qkv,
        compile=cfg.compile,
        threads=cfg.threads,
    )
    gpu = rt.device.startswith("cuda")
    steps = cfg.steps if cfg.steps is not None else (25 if gpu else 4)
    batch_sizes = cfg.batch_sizes or ([1, 4] if gpu else [1])
    if steps < 1 or cfg.repeats < 1 or cfg.warmup < 0 or min(batch_sizes) < 1:
        raise SlimsdError("steps, repeats and batch sizes must be at least 1, warmup at least 0")
    cfg = replace(cfg, steps=steps, batch_sizes=sorted(set(batch_sizes)))
    return cfg, rt


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


def measure_step_latency(cfg: BenchConfig, rt: runtime.RuntimeConfig, resolutions: dict[str, int]) -> dict:
    """Per model: U-Net per-step latency (and the baseline's), all U-Nets timed round-robin in one loop.

    Returns model -> {"slimsd": timing, "baseline": timing or None, "max_abs_diff": vs baseline}.
    """
    fns, results, keep_alive = {}, {}, []
    base_dtype = baseline_dtype(cfg, rt)
    for model in cfg.models:
        unet = build_unet(
            model,
            random_weights=cfg.random_weights,
            dtype=rt.dtype,
            seed=cfg.seed,
            allow_pickle=cfg.allow_pickle,
        )
        base = None
        if cfg.baseline == "diffusers":
            # Plain diffusers: the same weights, eager, its default layout and attention processors.
            base = copy.deepcopy(unet).eval().requires_grad_(False).to(device=rt.device, dtype=base_dtype)
        fast = runtime.optimize_unet(unet, rt)
        inputs = unet_inputs(fast, resolutions[model], 1, rt.device, rt.dtype, seed=cfg.seed)
        fns[(model, "slimsd")] = _caller(fast, inputs)
        base_inputs = unet_inputs(fast, resolutions[model], 1, rt.device, base_dtype, seed=cfg.seed)
        if base is not None:
            fns[(model, "baseline")] = _caller(base, base_inputs)
        keep_alive.append((fast, base, inputs, base_inputs))
    timings = time_round_robin(fns, rt.device, cfg.warmup, cfg.repeats)
    for model, (fast, base, inputs, base_inputs) in zip(cfg.models, keep_alive, strict=True):
        r = {"slimsd": timings[(model, "slimsd")], "baseline": timings.get((model, "baseline"))}
        if base is not None:
            with torch.inference_mode():
                a, b = fast(**inputs).sample.float(), base(**base_inputs).sample.float()
            r["max_abs_diff"] = (a - b).abs().max().item()
        results[model] = r
    return results


def baseline_dtype(cfg: BenchConfig, rt: runtime.RuntimeConfig) -> torch.dtype:
    return devices.resolve_dtype(cfg.baseline_dtype, rt.device) if cfg.baseline_dtype else rt.dtype


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


def generate_timed(pipe, cfg: BenchConfig, resolution: int, batch: int, steps: int, device: str) -> dict:
    """One pipeline call, timed: total, text encoding, VAE decoding, and denoising (the rest)."""
    text, vae = _Stopwatch(device), _Stopwatch(device)
    patched = []
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            patched.append((enc, "forward", enc.forward))
            enc.forward = text.wrap(enc.forward)
    patched.append((pipe.vae, "decode", pipe.vae.decode))
    pipe.vae.decode = vae.wrap(pipe.vae.decode)
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    try:
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(
                cfg.prompt,
                num_inference_steps=steps,
                guidance_scale=cfg.guidance,
                height=resolution,
                width=resolution,
                num_images_per_prompt=batch,
                generator=generator,
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


def measure_end_to_end(
    model: str, cfg: BenchConfig, rt: runtime.RuntimeConfig, resolution: int, optimized: bool = True
) -> dict:
    """End-to-end time per image (parts apart), images/s per batch size, and peak memory, for one model."""
    pipe = build_pipeline(
        model, random_weights=cfg.random_weights, dtype=rt.dtype, seed=cfg.seed, allow_pickle=cfg.allow_pickle
    )
    if optimized:
        runtime.optimize_pipeline(pipe, rt)
    else:
        pipe.to(rt.device, baseline_dtype(cfg, rt))
        pipe.set_progress_bar_config(disable=True)
    out = {"images_per_s": {}}
    warm = time.perf_counter()
    generate_timed(pipe, cfg, resolution, 1, 1, rt.device)  # warm-up (and compilation, if any)
    out["warmup_s"] = time.perf_counter() - warm
    for batch in cfg.batch_sizes:
        reset_peak_memory(rt.device)
        t = generate_timed(pipe, cfg, resolution, batch, cfg.steps, rt.device)
        mem, kind = peak_memory(rt.device)
        if batch == cfg.batch_sizes[0]:
            out.update({k: v / batch for k, v in t.items()})  # per image
            out["peak_memory_bytes"], out["peak_memory_kind"], out["e2e_batch"] = mem, kind, batch
        out["images_per_s"][str(batch)] = batch / t["total_s"]
    del pipe
    return out


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def run(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmarks every model of ``cfg``; returns one JSON-ready row per model."""
    log = log or (lambda _msg: None)
    cfg, rt = resolve(cfg)
    threads = torch.get_num_threads()
    try:
        runtime.set_threads(rt.threads)
        return _run(cfg, rt, log)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run(cfg: BenchConfig, rt: runtime.RuntimeConfig, log: Callable[[str], None]) -> list[dict]:
    env = environment(rt)
    resolutions = {m: model_resolution(m, cfg) for m in cfg.models}
    rows = [{**count(m, resolutions[m])} for m in cfg.models]
    log(
        f"step latency: {', '.join(cfg.models)} round-robin, {cfg.warmup} warm-up + {cfg.repeats} timed forwards"
    )
    steps = measure_step_latency(cfg, rt, resolutions)
    for row in rows:
        s = steps[row["model"]]
        row["step_latency_ms"] = s["slimsd"]["median_ms"]
        row["step_latency_all_ms"] = [t * 1000 for t in s["slimsd"]["times_s"]]
        row["first_call_s"] = s["slimsd"]["first_s"]  # includes torch.compile's warm-up when compiling
        if s["baseline"] is not None:
            row["baseline"] = cfg.baseline
            row["baseline_dtype"] = devices.dtype_name(baseline_dtype(cfg, rt))
            row["baseline_step_latency_ms"] = s["baseline"]["median_ms"]
            row["baseline_step_latency_all_ms"] = [t * 1000 for t in s["baseline"]["times_s"]]
            row["speedup_vs_baseline"] = row["baseline_step_latency_ms"] / row["step_latency_ms"]
            row["max_abs_diff_vs_baseline"] = s["max_abs_diff"]
    del steps
    if cfg.e2e:
        for row in rows:
            log(f"end to end: {row['model']}, {cfg.steps} steps, batch sizes {cfg.batch_sizes}")
            e2e = measure_end_to_end(row["model"], cfg, rt, row["resolution"])
            row.update({"steps": cfg.steps, **{k: e2e[k] for k in e2e}})
            row["e2e_s"] = row.pop("total_s")
            if cfg.baseline == "diffusers":
                base = measure_end_to_end(row["model"], cfg, rt, row["resolution"], optimized=False)
                row["baseline_e2e_s"] = base["total_s"]
                row["baseline_denoise_s"] = base["denoise_s"]
    ref = rows[0]
    for row in rows:
        row["mac_ratio_vs_first"] = ref["unet_macs"] / row["unet_macs"]
        row["speedup_vs_first"] = ref["step_latency_ms"] / row["step_latency_ms"]
        row["speedup_over_mac_ratio"] = row["speedup_vs_first"] / row["mac_ratio_vs_first"]
        row.update(env)
        row["runtime"] = runtime.describe(rt)
        row["guidance"] = cfg.guidance
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table, with the environment in a line below it."""
    has_base = any("baseline_step_latency_ms" in r for r in rows)
    has_e2e = any("e2e_s" in r for r in rows)
    head = ["model", "px", "U-Net params (M)", "U-Net MACs (G)", "step ms"]
    if has_base:
        head += ["diffusers step ms", "speed-up"]
    head += ["MAC ratio", "step speed-up", "speed-up / MAC ratio"]
    if has_e2e:
        head += ["steps", "text s", "denoise s", "VAE s", "s / image", "images/s", "peak mem (GiB)"]
        if has_base:
            head += ["diffusers s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["model"],
            str(r["resolution"]),
            _fmt(r["unet_params"] / 1e6),
            _fmt(r["unet_macs"] / 1e9),
            _fmt(r["step_latency_ms"]),
        ]
        if has_base:
            cells += [_fmt(r.get("baseline_step_latency_ms")), _fmt(r.get("speedup_vs_baseline"), 2) + "×"]
        cells += [
            _fmt(r["mac_ratio_vs_first"], 2),
            _fmt(r["speedup_vs_first"], 2),
            f"{100 * r['speedup_over_mac_ratio']:.0f}%",
        ]
        if has_e2e:
            ips = ", ".join(f"{v:.3g} @{b}" for b, v in r.get("images_per_s", {}).items())
            mem = r.get("peak_memory_bytes")
            cells += [
                str(r.get("steps", "–")),
                _fmt(r.get("text_encode_s"), 2),
                _fmt(r.get("denoise_s"), 2),
                _fmt(r.get("vae_decode_s"), 2),
                _fmt(r.get("e2e_s"), 2),
                ips or "–",
                _fmt(mem / 2**30 if mem else None, 2),
            ]
            if has_base:
                cells += [_fmt(r.get("baseline_e2e_s"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    r = rows[0]
    rt = r["runtime"]
    opts = ", ".join(k for k in ("channels_last", "fuse_qkv", "compile") if rt.get(k)) or "eager"
    load = f", load average {r['load_average']}" if r.get("load_average") else ""
    isa = f"; {' '.join(r['cpu_isa'])}" if r.get("cpu_isa") and r["device"] == "cpu" else ""
    lines.append("")
    lines.append(
        f"{r['date']} · {r['device']} ({r['device_name']}{isa}), {r['threads']} threads · {r['dtype']} · "
        f"slimsd runtime: {opts} · torch {r['torch']}, diffusers {r['diffusers']}{load}. "
        f"Step latency: median of {len(r['step_latency_all_ms'])} forwards at batch 1; "
        "ratios relative to the first model."
    )
    return "\n".join(lines) + "\n"


def chart_png(rows: list[dict], title: str | None = None) -> bytes:
    """A bar chart of per-step U-Net latency per model (slimsd, and the baseline when measured), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    has_base = any("baseline_step_latency_ms" in r for r in rows)
    width = 0.4 if has_base else 0.6
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(rows), 4), dpi=100)
    xs = range(len(rows))
    ax.bar(
        [x - (width / 2 if has_base else 0) for x in xs],
        [r["step_latency_ms"] for r in rows],
        width,
        label="slimsd",
    )
    if has_base:
        ax.bar(
            [x + width / 2 for x in xs],
            [r.get("baseline_step_latency_ms") or 0 for r in rows],
            width,
            label="diffusers eager",
        )
        ax.legend()
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("U-Net step latency (ms, batch 1)")
    ax2.bar(xs, [r["unet_macs"] / 1e9 for r in rows], 0.6, color="tab:gray")
    ax2.set_xticks(list(xs), names, rotation=20, ha="right")
    ax2.set_ylabel("U-Net MACs (G)")
    r = rows[0]
    fig.suptitle(title or f"{r['device_name']} · {r['dtype']} · {r['date'][:10]}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
