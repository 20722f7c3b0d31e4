"""``slimsd demo``: the whole job on the toy world, in minutes on a CPU.

1. compress the toy teacher (slimsd.toy.teacher) with BK-SDM's ``bk-small`` recipe (Kim et al. 2023: drop one
   residual/attention pair per down stage and the mid block);
2. cache the VAE latents and text embeddings of a shapes data set once (both students train on it);
3. distill student A with knowledge distillation: task + output-KD + feature-KD (λ = 1, 1, 1);
4. train student B from the same initial weights with the task loss alone, for the same steps and data;
4b. step-distil the KD student with latent consistency distillation (``objective=lcm``, Luo et al. 2023) into
   a 4-step student: one run goes teacher -> slim student -> few-step slim student;
4c. distil the teacher's VAE decoder into a tiny one (``objective=vae-decoder``, issue 24) and add a row: the LCM
   student decoding with it;
4d. quantise the LCM student to int8 for OpenVINO (``slimsd quantize``: calibrated on its own 4-step trajectory
   over toy captions, the sensitive layers kept in float) and sample it like the others (its own row);
5. measure, for teacher / KD student / task-only student / LCM student: caption fidelity (colour and shape read back from
   the pixels of samples, slimsd.toy.shapes; mean over several seeds) on fresh captions of the colour x shape
   combinations seen in training (``caption_fidelity``) and on combinations no training data contains
   (``caption_fidelity_held_out``), each model at its own steps (25; the LCM student 4), U-Net parameters, the
   median latency of one U-Net step (classifier-free guidance batch, same device and threads) and of one whole
   image (``image_ms``: text encoding, every U-Net evaluation at the model's steps and guidance, VAE decode);
6. write ``results.json``, the sample sheet (``sheet.png``: a row per model, a column per caption, same seeds)
   and the page that shows both (``index.html``, slimsd.toy.report).

The training runs through :func:`slimsd.train.distill.train`; nothing here trains on its own.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from slimsd.devices import cpu_default_dtype
from slimsd.errors import SlimsdError
from slimsd.toy.report import PAGE_FILE, SHEET_FILE, draw_sheet, render_page
from slimsd.toy.teacher import TOY_SAMPLING

QUANTISED = (
    "lcm_student_int8"  # the LCM student through slimsd quantize (an OpenVINO folder, not a torch model)
)
MODELS = ("teacher", "kd_student", "task_only_student", "lcm_student", QUANTISED)
LABELS = {
    "teacher": "teacher (toy-sd)",
    "kd_student": "KD student",
    "task_only_student": "task-only student",
    "lcm_student": "LCM student (KD+LCM)",
    QUANTISED: "LCM student int8 (OpenVINO)",
}
TINY_DECODER_ROW = "lcm_student_tiny_decoder"  # the LCM student decoding with the tiny decoder (4c)
TINY_DECODER_DIR = "tiny_decoder"  # its training run; final/ is a plain AutoencoderTiny folder
LABELS[TINY_DECODER_ROW] = "LCM student + tiny decoder"
# results.json says which program wrote the folder: a rerun replaces only the demo's own output
DEMO_KIND = "slimsd-demo"
# everything the demo writes at the top of its folder
DEMO_ENTRIES = {"student-init", "cache", *MODELS[1:], TINY_DECODER_DIR, "results.json", SHEET_FILE, PAGE_FILE}
# what demos wrote before the sheet and the page (the folder of such a run is still the demo's to replace)
OLD_ENTRIES = {*(f"grid-{m}.png" for m in MODELS), "grid-captions.txt"}
SHEET_SEED = 1234  # caption i of the sheet: seed SHEET_SEED + i, in every row


@dataclass
class DemoConfig:
    out: str = "demo-out"
    # Optimizer steps of each student. Short, for a demo of minutes: BK-SDM's point is that KD recovers a pruned
    # U-Net faster than the task loss alone; on the toy world KD leads the task-only twin by 0.17 / 0.11 / 0.18
    # caption fidelity at 150 / 300 / 600 steps (benchmarks/results/toy_budgets.json, seeds 0-2).
    steps: int = 150
    seed: int = 0
    teacher: str = "toy-sd"
    recipe: str = "bk-small"
    data_images: int = 2048  # shapes images in the training set (cached once)
    batch_size: int = 16
    learning_rate: float = 5e-4
    # after min(20, steps // 10) warm-up steps; learning rate 1e-3 and a cosine schedule measured worse for
    # both students, 2.5e-4 for the task-only one (benchmarks/results/toy_settings/)
    lr_scheduler: str = "constant_with_warmup"
    lambda_task: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    feat_norm: str = "none"  # "teacher": each feature term over the teacher feature's mean square
    caption_dropout: float = 0.1  # keeps the students good at classifier-free guidance, like the teacher
    # sample from an exponential moving average of the weights with this decay (None: the last weights; 0.95
    # measured worse at 150 steps, benchmarks/results/toy_settings/toy_ema0.95.md)
    ema_decay: float | None = None
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    eval_prompts: int = 24  # captions per seed, of seen and of held-out combinations each
    # the toy teacher's own sampling (it samples poorly at 20 steps)
    inference_steps: int = TOY_SAMPLING["num_inference_steps"]
    guidance_scale: float = TOY_SAMPLING["guidance_scale"]
    # None: each model's own (PNDM for the toy teacher and its KD / task-only students, LCM for the LCM student)
    scheduler: str | None = None
    # The KD student step-distilled by LCM (objective=lcm): training steps, learning rate, the teacher's guidance
    # range it learns (CFG scales around the toy teacher's best, 2), and the steps it samples with.
    lcm_steps: int = 300
    lcm_learning_rate: float = 1e-4
    lcm_guidance_range: tuple[float, float] = (1.5, 3.0)
    lcm_inference_steps: int = 4
    # The teacher's VAE decoder distilled into a tiny one (objective=vae-decoder): the preset, its training budget
    # and settings (configs/micro-sd-tiny-decoder.yaml's, as measured by benchmarks/toy_tiny_decoder.py: pixel
    # MSE, Adam betas (0.9, 0.9) as TAESD, 3e-3 with a cosine decay; the feature term off, it doubles a step).
    decoder: str = "micro-tiny-decoder"
    # 200 steps leave it unreadable (fidelity 0.01 in a demo run); the config's 4000 (chosen on validation sets,
    # benchmarks/results/toy_tiny_decoder_sweep.json) would add about 4 min to a demo of 4.5 min: 1000 here
    decoder_steps: int = 1000
    decoder_learning_rate: float = 3e-3
    decoder_lambda_feat: float = 0.0
    grid_prompts: int = 8  # captions on the sheet: a quarter of them (rounded down) of held-out combinations
    latency_repeats: int = 30
    image_repeats: int = 5  # whole images timed per model (image_ms)
    threads: int | None = None  # torch CPU threads; None: torch's default
    optimize: bool = True  # sample with the fast runtime (slimsd.models.runtime), as `slimsd generate` does
    overwrite: bool = False
    progress: bool = False
    command: str | None = None  # the command line that ran the demo, for the page (None: from this config)
    log: object = field(default=print, repr=False)


def _validate(cfg: DemoConfig) -> None:
    for name in (
        "steps",
        "data_images",
        "batch_size",
        "eval_prompts",
        "inference_steps",
        "grid_prompts",
        "latency_repeats",
        "lcm_steps",
        "lcm_inference_steps",
        "image_repeats",
        "decoder_steps",
    ):
        if getattr(cfg, name) < 1:
            raise SlimsdError(f"demo {name.replace('_', '-')} {getattr(cfg, name)!r}: must be at least 1")
    if not cfg.eval_seeds:
        raise SlimsdError("demo needs at least one evaluation seed")
    if cfg.threads is not None and cfg.threads < 1:
        raise SlimsdError(f"--threads {cfg.threads!r}: must be at least 1")


def demo_output(out: Path) -> bool:
    """Whether ``out`` holds the demo's own earlier output (its results.json, nothing a user added)."""
    try:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        entries = {p.name for p in out.iterdir()}
    except (OSError, ValueError):
        return False
    return (
        isinstance(results, dict)
        and results.get("kind") == DEMO_KIND
        and entries <= DEMO_ENTRIES | OLD_ENTRIES
    )


def check_out(cfg: DemoConfig) -> bool:
    """Refuse an existing ``cfg.out`` that is not the demo's own output, unless ``cfg.overwrite``; returns
    whether the run replaces an existing folder (checked before any work starts)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise SlimsdError(f"output path {str(out)!r} exists and is not a folder")
    if out.exists() and not cfg.overwrite and not demo_output(out):
        raise SlimsdError(
            f"output folder {str(out)!r} exists and is not an earlier demo output; pass --overwrite to replace "
            "it, or choose another --out"
        )
    return out.exists()


# --- measurements -------------------------------------------------------------------------------------------


# Seed streams of the evaluation captions, apart from every training set's (shapes:N uses the run's seed).
CAPTION_SEEDS = {"seen": 1_000_003, "held_out": 2_000_003}
# Tuning captions (for choosing sampling settings: benchmarks/toy_samplers.py) are drawn from their own stream
# and share nothing with the demo's evaluation captions (its 3 seeds x 24 per split, which every toy evaluation
# here uses): no caption text, and no held-out colour x shape combination. Every held-out combination is
# evaluated, so tuning has seen combinations only.
TUNING_CAPTION_SEED = 3_000_003


def eval_captions(cfg: DemoConfig, seed: int, split: str = "seen") -> list[str]:
    """Evaluation captions of ``split``: ``seen`` = fresh draws of training combinations (the same caption text
    can occur in training: the world has 360 captions); ``held_out`` = combinations no training set contains."""
    from slimsd.toy.shapes import make_captions

    return make_captions(cfg.eval_prompts, seed=CAPTION_SEEDS[split] + seed, split=split)


def tuning_captions(cfg: DemoConfig, seed: int, split: str = "seen") -> list[str]:
    """``cfg.eval_prompts`` captions to choose settings on: draws of seen combinations (as the world draws them)
    whose text no evaluation caption has; none of ``held_out`` (every held-out combination is evaluated)."""
    import random

    from slimsd.toy.shapes import sample_scene

    if split != "seen":
        return []
    evaluation = DemoConfig()
    taken = {
        c
        for s in evaluation.eval_seeds
        for p in ("seen", "held_out")
        for c in eval_captions(evaluation, s, p)
    }
    rng, out = random.Random(TUNING_CAPTION_SEED + seed), []
    while len(out) < cfg.eval_prompts:  # 300 seen captions, at most 72 of them evaluated
        caption = sample_scene(rng, "seen").caption
        out += [caption] if caption not in taken else []
    return out


def sample(
    pipe, captions: list[str], seed: int, cfg: DemoConfig, steps: int | None = None, deep_cache: int = 1
):
    """One image per caption; caption i uses seed ``seed + i``, through slimsd's own generation, at ``steps``
    (default: the teacher's ``cfg.inference_steps``) and the demo's guidance (``deep_cache``: DeepCache's
    interval, for benchmarks)."""
    from slimsd.run.generate import MAX_BATCH, generate

    results = generate(
        pipe,
        captions,
        steps=steps or cfg.inference_steps,
        guidance=cfg.guidance_scale,
        scheduler=cfg.scheduler,
        width=64,
        height=64,
        batch_size=min(len(captions), MAX_BATCH),
        seeds=[seed + i for i in range(len(captions))],
        deep_cache=deep_cache,
    )
    return [r.image for r in results]


def fidelity(
    pipe,
    cfg: DemoConfig,
    steps: int | None = None,
    deep_cache: int = 1,
    caption_source: Callable[[DemoConfig, int, str], list[str]] = eval_captions,
) -> dict:
    """Caption fidelity per seed and its mean (plus colour and shape accuracy), on seen and held-out
    combinations (image i of evaluation seed s uses sample seed 10_000 * (s + 1) + i in both);
    ``caption_source``: the captions of a seed and split (``tuning_captions`` to choose settings on captions no evaluation uses; a
    split without captions is left out)."""
    from slimsd.toy.shapes import caption_fidelity

    out = {}
    for split, suffix in (("seen", ""), ("held_out", "_held_out")):
        if not caption_source(cfg, cfg.eval_seeds[0], split):
            continue
        per_seed = []
        for s in cfg.eval_seeds:
            captions = caption_source(cfg, s, split)
            images = sample(pipe, captions, 10_000 * (s + 1), cfg, steps, deep_cache)
            r = caption_fidelity(images, captions, details=True)
            per_seed.append({k: r[k] for k in ("fidelity", "colour_accuracy", "shape_accuracy")})
        mean = {k: statistics.fmean(p[k] for p in per_seed) for k in per_seed[0]}
        out |= {
            f"caption_fidelity{suffix}": mean["fidelity"],
            f"colour_accuracy{suffix}": mean["colour_accuracy"],
            f"shape_accuracy{suffix}": mean["shape_accuracy"],
            f"caption_fidelity{suffix}_per_seed": [p["fidelity"] for p in per_seed],
        }
    return out


def step_latencies(unets: dict, repeats: int) -> dict[str, float]:
    """Median ms of one U-Net forward at batch 2 (a classifier-free-guidance step) per model, timed
    round-robin (A B C A B C ...) so that load from other processes hits each model alike. An LCM student's
    U-Net gets its guidance embedding (``timestep_cond``), as in sampling."""
    from slimsd.measure.bench import time_round_robin, unet_inputs

    fns = {}
    for name, unet in unets.items():
        inputs = unet_inputs(unet, 64, 2, str(unet.device), unet.dtype)
        cond = unet.config.get("time_cond_proj_dim")
        if cond:
            inputs["timestep_cond"] = torch.zeros(2, cond, device=unet.device, dtype=unet.dtype)
        fns[name] = lambda u=unet, x=inputs: u(**x)
    timings = time_round_robin(fns, "cpu", warmup=3, repeats=repeats)
    return {name: t["median_ms"] for name, t in timings.items()}


def image_latencies(pipes: dict, steps: dict[str, int], cfg: DemoConfig) -> dict[str, float]:
    """Median ms of one whole 64 px image per model, as ``slimsd generate`` makes it (text encoding, every U-Net
    evaluation at the model's own steps and guidance, VAE decode), timed round-robin like the steps."""
    from slimsd.measure.bench import time_round_robin
    from slimsd.run.generate import generate

    fns = {
        name: lambda p=pipe, n=steps[name]: generate(
            p, "a red circle", steps=n, guidance=cfg.guidance_scale, width=64, height=64, seed=0
        )
        for name, pipe in pipes.items()
    }
    timings = time_round_robin(fns, "cpu", warmup=1, repeats=cfg.image_repeats)
    return {name: t["median_ms"] for name, t in timings.items()}


def save_png(image, path: Path) -> None:
    import io

    from slimsd.atomic import atomic_write_bytes

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# --- the run ------------------------------------------------------------------------------------------------


def distill_config(cfg: DemoConfig, student: Path, data: Path, output_dir: Path, kd: bool):
    from slimsd.train.distill import DistillConfig

    return DistillConfig(
        teacher=cfg.teacher,
        student=str(student),
        data=str(data),
        output_dir=str(output_dir),
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler=cfg.lr_scheduler,
        lr_warmup_steps=min(20, cfg.steps // 10),
        lambda_task=cfg.lambda_task,
        lambda_out=cfg.lambda_out if kd else 0.0,
        lambda_feat=cfg.lambda_feat if kd else 0.0,
        feat_norm=cfg.feat_norm,
        caption_dropout=cfg.caption_dropout,
        ema=cfg.ema_decay is not None,
        ema_decay=cfg.ema_decay if cfg.ema_decay is not None else DistillConfig.ema_decay,
        checkpoint_every=0,
        keep_last=1,
        resume=None,
        mixed_precision="no",
        seed=cfg.seed,
        tensorboard=False,
        progress=cfg.progress,
    )


def lcm_config(cfg: DemoConfig, student: Path, data: Path, output_dir: Path):
    """Latent consistency distillation of the KD student from the teacher (objective=lcm)."""
    from dataclasses import replace

    low, high = cfg.lcm_guidance_range
    return replace(
        distill_config(cfg, student, data, output_dir, kd=False),
        objective="lcm",
        max_steps=cfg.lcm_steps,
        learning_rate=cfg.lcm_learning_rate,
        lr_warmup_steps=min(20, cfg.lcm_steps // 10),
        caption_dropout=0.0,
        guidance_min=low,
        guidance_max=high,
        sample_steps=cfg.lcm_inference_steps,
        sample_guidance=cfg.guidance_scale,
    )


def tiny_decoder_config(cfg: DemoConfig, data: Path, output_dir: Path):
    """The teacher's VAE decoder distilled into ``cfg.decoder`` (objective=vae-decoder) on the demo's cache."""
    from slimsd.train.distill import DistillConfig

    return DistillConfig(
        objective="vae-decoder",
        teacher=cfg.teacher,
        student=cfg.decoder,
        data=str(data),
        output_dir=str(output_dir),
        max_steps=cfg.decoder_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.decoder_learning_rate,
        adam_beta2=0.9,
        weight_decay=0.0,
        lr_scheduler="cosine",
        lr_warmup_steps=min(50, cfg.decoder_steps // 10),
        lambda_task=0.0,
        lambda_out=1.0,
        lambda_feat=cfg.decoder_lambda_feat,
        resolution=64,
        checkpoint_every=0,
        keep_last=1,
        resume=None,
        # bf16 autocast where the CPU computes bf16 natively (2.6x less time a step there, as the toy benchmark
        # trains), fp32 elsewhere: only the decoder's training precision, the demo samples every row in fp32
        mixed_precision="bf16" if cpu_default_dtype() == "bf16" else "no",
        seed=cfg.seed,
        tensorboard=False,
        progress=cfg.progress,
    )


def tiny_decoder_row(cfg: DemoConfig, tmp: Path, data: Path, lcm_dir: str, timings: dict) -> tuple:
    """4c: train the tiny decoder into TMP / TINY_DECODER_DIR; -> (the LCM student in LCM_DIR decoding with it, as
    users load it: ``slimsd.load(vae=DIR)``, what the row records of the decoder)."""
    from slimsd.models.loading import load
    from slimsd.train.distill import train

    t0 = time.perf_counter()
    cfg.log(
        f"distilling the teacher's VAE decoder into {cfg.decoder} (objective=vae-decoder), {cfg.decoder_steps} "
        f"steps of batch {cfg.batch_size} ..."
    )
    run = train(tiny_decoder_config(cfg, data, tmp / TINY_DECODER_DIR))
    timings["tiny_decoder_train_s"] = time.perf_counter() - t0
    cfg.log(f"  done in {timings['tiny_decoder_train_s']:.0f} s")
    pipe = load(lcm_dir, device="cpu", dtype="fp32", optimize=cfg.optimize, vae=run["final_dir"])
    last = run["losses"][-10:]
    return pipe, {
        "final_dir": str(Path(cfg.out) / "lcm_student" / "final"),
        "decoder_dir": str(Path(cfg.out) / TINY_DECODER_DIR / "final"),
        "decoder": cfg.decoder,
        "decoder_params": sum(p.numel() for p in pipe.vae.decoder.parameters()),
        "decoder_train_steps": cfg.decoder_steps,
        "final_decoder_pixel_loss": statistics.fmean(r["pixel"] for r in last),
    }


def tiny_decoder_ratios(results: dict) -> dict:
    """The tiny-decoder row against the LCM student's (the same latents, decoded by the full VAE) and the
    teacher's image time."""
    tiny, lcm, teacher = results[TINY_DECODER_ROW], results["lcm_student"], results["teacher"]
    return {
        "tiny_decoder_vs_lcm": tiny["caption_fidelity"] / lcm["caption_fidelity"]
        if lcm["caption_fidelity"]
        else None,
        "tiny_decoder_image_speedup": teacher["image_ms"] / tiny["image_ms"],
    }


# Calibration captions of the int8 row: as benchmarks/toy_quantisation.py draws them (their own seed stream)
CALIBRATION_PROMPTS, CALIBRATION_CAPTION_SEED = 16, 5_000_003


def quantise_lcm(cfg: DemoConfig, lcm_dir: Path, out: Path) -> Path:
    """The LCM student as `slimsd quantize` makes it by default (OpenVINO, NNCF int8 weights and activations,
    trajectory calibration, the sensitive layers kept), calibrated on toy captions; written to OUT."""
    import tempfile

    from slimsd.run.quantize import quantize
    from slimsd.toy.shapes import make_captions

    cfg.log(
        f"quantising {LABELS['lcm_student']} to int8 for OpenVINO, calibrated on {CALIBRATION_PROMPTS} captions "
        "along its own sampling trajectory ..."
    )
    with tempfile.TemporaryDirectory() as scratch:
        prompts = Path(scratch) / "calibration.txt"
        captions = make_captions(CALIBRATION_PROMPTS, seed=CALIBRATION_CAPTION_SEED)
        prompts.write_text("\n".join(captions) + "\n", encoding="utf-8")
        quantize(
            str(lcm_dir), out, to="openvino", prompts_file=str(prompts), sensitivity_layers=16, seed=cfg.seed
        )
    return out


def run_demo(cfg: DemoConfig) -> dict:
    """Compress, distill (KD and task-only), measure and write everything under ``cfg.out``."""
    from slimsd.atomic import atomic_dir, atomic_write_text
    from slimsd.models.compress import compress
    from slimsd.models.loading import load
    from slimsd.train.cache import write_cache
    from slimsd.train.distill import train

    _validate(cfg)
    out = Path(cfg.out)
    replace = check_out(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    log = cfg.log
    if replace:
        log(f"replacing the earlier output in {out} when this run completes")
    start = time.perf_counter()
    timings = {}
    # Built in a temporary sibling and renamed into place: an interrupted rerun leaves the earlier output whole.
    with atomic_dir(out, overwrite=replace) as tmp:
        t0 = time.perf_counter()
        init = compress(cfg.teacher, cfg.recipe, tmp / "student-init")
        log(
            f"compressed {cfg.teacher} with {cfg.recipe}: U-Net {init.teacher_unet_params:,} -> "
            f"{init.student_unet_params:,} parameters"
        )
        cache = tmp / "cache"
        write_cache(cfg.teacher, f"shapes:{cfg.data_images}", cache, resolution=64, seed=cfg.seed)
        timings["compress_and_cache_s"] = time.perf_counter() - t0

        runs = {}
        for name, kd in (("kd_student", True), ("task_only_student", False)):
            t0 = time.perf_counter()
            what = "task + output-KD + feature-KD" if kd else "task loss only"
            log(f"training {LABELS[name]} ({what}), {cfg.steps} steps of batch {cfg.batch_size} ...")
            runs[name] = train(distill_config(cfg, tmp / "student-init", cache, tmp / name, kd))
            timings[f"{name}_train_s"] = time.perf_counter() - t0
            last = runs[name]["losses"][-10:]
            log(
                f"  done in {timings[f'{name}_train_s']:.0f} s; task loss over the last {len(last)} steps "
                f"{statistics.fmean(r['task'] for r in last):.4f}"
            )

        t0 = time.perf_counter()
        log(
            f"step-distilling the KD student with LCM (objective=lcm), {cfg.lcm_steps} steps, to sample in "
            f"{cfg.lcm_inference_steps} steps ..."
        )
        runs["lcm_student"] = train(lcm_config(cfg, tmp / "kd_student" / "final", cache, tmp / "lcm_student"))
        timings["lcm_student_train_s"] = time.perf_counter() - t0
        log(f"  done in {timings['lcm_student_train_s']:.0f} s")

        # Sampled as users run them (slimsd.load: the fast runtime), in fp32 on the CPU for comparable numbers.
        models = {"teacher": cfg.teacher} | {name: run["final_dir"] for name, run in runs.items()}
        pipes = {
            name: load(m, device="cpu", dtype="fp32", optimize=cfg.optimize) for name, m in models.items()
        }
        lcm_dir = runs["lcm_student"]["final_dir"]
        pipes[TINY_DECODER_ROW], tiny = tiny_decoder_row(cfg, tmp, cache, lcm_dir, timings)
        t0 = time.perf_counter()
        pipes[QUANTISED] = load(str(quantise_lcm(cfg, Path(models["lcm_student"]), tmp / QUANTISED)))
        timings["quantise_s"] = time.perf_counter() - t0

        # Counted on the models as compressed: the fast runtime's fused QKV projections are not extra weights.
        unet_params = {
            "teacher": init.teacher_unet_params,
            "kd_student": init.student_unet_params,
            "task_only_student": init.student_unet_params,
            # plus the guidance embedding's projection (time_cond_proj_dim -> time embedding)
            "lcm_student": runs["lcm_student"]["student_unet_params"],
            TINY_DECODER_ROW: runs["lcm_student"]["student_unet_params"],
            QUANTISED: runs["lcm_student"]["student_unet_params"],
        }
        steps = {name: cfg.inference_steps for name in pipes}
        steps |= {name: cfg.lcm_inference_steps for name in ("lcm_student", TINY_DECODER_ROW, QUANTISED)}
        t0 = time.perf_counter()
        results = {}
        for name, pipe in pipes.items():
            log(
                f"sampling {LABELS[name]}: {len(cfg.eval_seeds)} seeds x {cfg.eval_prompts} captions of seen "
                "and of held-out combinations"
            )
            results[name] = {
                **fidelity(pipe, cfg, steps[name]),
                "unet_params": unet_params[name],
                "steps": steps[name],
            }
        timings["evaluate_s"] = time.perf_counter() - t0
        lat = step_latencies({k: p.unet for k, p in pipes.items()}, cfg.latency_repeats)
        images_ms = image_latencies(pipes, steps, cfg)
        for name in pipes:
            results[name]["step_latency_ms"] = lat[name]
            results[name]["image_ms"] = images_ms[name]
        for name in runs:
            results[name]["final_dir"] = str(out / name / "final")
            last = runs[name]["losses"][-10:]
            key = "lcm" if name == "lcm_student" else "task"
            results[name][f"final_{key}_loss"] = statistics.fmean(r[key] for r in last)
        results[TINY_DECODER_ROW] |= tiny
        results[QUANTISED]["folder"] = str(out / QUANTISED)

        captions, held_out = sheet_captions(cfg)
        sheet_images = {
            name: sample(pipe, captions, SHEET_SEED, cfg, steps[name]) for name, pipe in pipes.items()
        }
        for name in results:  # every row says what it is: the table, the sheet and the page show its label
            results[name].setdefault("label", LABELS.get(name, name))

        teacher_fid = results["teacher"]["caption_fidelity"]
        summary = {
            "kind": DEMO_KIND,
            "models": list(results),  # the rows, in order
            **results,
            "kd_vs_teacher": results["kd_student"]["caption_fidelity"] / teacher_fid if teacher_fid else None,
            "task_only_vs_teacher": (
                results["task_only_student"]["caption_fidelity"] / teacher_fid if teacher_fid else None
            ),
            "lcm_vs_teacher": (
                results["lcm_student"]["caption_fidelity"] / teacher_fid if teacher_fid else None
            ),
            "lcm_image_speedup": results["teacher"]["image_ms"] / results["lcm_student"]["image_ms"],
            # the target: the int8 student keeps >= 97% of the fp32 student's caption fidelity
            "int8_vs_lcm": (
                results[QUANTISED]["caption_fidelity"] / results["lcm_student"]["caption_fidelity"]
                if results["lcm_student"]["caption_fidelity"]
                else None
            ),
            "int8_image_speedup": results["lcm_student"]["image_ms"] / results[QUANTISED]["image_ms"],
            "sheet": {
                "file": SHEET_FILE,
                "captions": captions,
                "held_out": held_out,
                "first_seed": SHEET_SEED,
            },
            "page": PAGE_FILE,
            "command": cfg.command or python_command(cfg),
            "out": str(out),
            "config": {
                k: v
                for k, v in asdict(cfg).items()
                if k not in ("log", "out", "overwrite", "progress", "command")
            },
            "threads": torch.get_num_threads(),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        summary |= tiny_decoder_ratios(results)
        summary["timings_s"]["total_s"] = round(time.perf_counter() - start, 1)
        atomic_write_text(tmp / "results.json", json.dumps(summary, indent=2) + "\n")
        save_png(draw_sheet(summary, sheet_images), tmp / SHEET_FILE)
        atomic_write_text(tmp / PAGE_FILE, render_page(summary))
    return summary


def sheet_captions(cfg: DemoConfig) -> tuple[list[str], list[bool]]:
    """The sheet's captions (``cfg.grid_prompts``: the last quarter, rounded down, of held-out combinations) and
    whether each is held out; drawn from their own seed streams, apart from the evaluation's."""
    from slimsd.toy.shapes import make_captions

    held = cfg.grid_prompts // 4
    seen = make_captions(cfg.grid_prompts - held, seed=cfg.seed + 7)
    return seen + make_captions(held, seed=cfg.seed + 7, split="held_out"), [False] * len(seen) + [
        True
    ] * held


def python_command(cfg: DemoConfig) -> str:
    """The call that ran a demo started from Python, naming the settings that are not the defaults."""
    from dataclasses import fields

    default = DemoConfig()
    changed = [
        f"{f.name}={getattr(cfg, f.name)!r}"
        for f in fields(cfg)
        if f.name not in ("log", "command", "progress") and getattr(cfg, f.name) != getattr(default, f.name)
    ]
    return f"slimsd.toy.demo.run_demo(DemoConfig({', '.join(changed)}))"
