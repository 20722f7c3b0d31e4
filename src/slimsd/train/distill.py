"""Knowledge distillation of a compressed U-Net from its frozen teacher: the training loop, top to bottom.

    loss = λ_task · task + λ_out · output-KD + λ_feat · Σ feature-KD      (BK-SDM, Kim et al. 2023; losses.py)

One ``train(cfg)`` that runs unchanged on one CPU, one GPU or many under ``accelerate launch``:

- the student is trainable and stays fp32 (mixed precision autocasts its forward; the loss scaler then
  unscales fp32 gradients, so there is no "Attempting to unscale FP16 gradients" error); the teacher, VAE and
  text encoder(s) are frozen, in the compute dtype, under ``torch.no_grad``;
- the data order, the noise, the timesteps and the VAE samples are drawn from (seed, step) for the *global*
  batch, and each process takes its slice: P processes with batch B compute what one process with batch P·B
  computes, and a resumed run computes what an uninterrupted one does (checkpoints hold the student, the
  optimizer, the LR schedule, the EMA, the generator state and the step);
- feature taps are hooks on the unwrapped U-Nets' block objects, attached before ``accelerator.prepare``
  (robust to DDP/FSDP wrapping and torch.compile, see losses.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models.lora import LORA_FILE
from slimsd.train import consistency as C
from slimsd.train import progressive as P
from slimsd.train import sharding as S
from slimsd.train.checkpoints import apply_optimizer_settings, architecture, load_checkpoint, save_checkpoint
from slimsd.train.config import ATTENTION_TARGETS, DistillConfig, round_length, validate
from slimsd.train.runs import begin_run, plan_run

# --- models ---------------------------------------------------------------------------------------------------


@dataclass
class Models:
    teacher_pipe: object  # the full teacher pipeline (its VAE and text encoder(s) serve the student too)
    student: torch.nn.Module  # the student U-Net (fp32, trainable)
    recipe: dict | None
    weight_map: dict | None
    taps: list[tuple[str, str]]
    student_source: str | None  # a folder whose non-U-Net parts the final pipeline reuses
    lora_base: dict | None = None  # lcm-lora: the frozen student weights the adapters sit on


GUIDANCE_INPUT = ("lcm", "progressive")  # objectives whose student takes the guidance w as an input
LORA_OBJECTIVES = ("lcm-lora", "finetune")  # objectives that train LoRA adapters on a frozen U-Net

# LCM-LoRA's adapted layers (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, convolutions.
LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


def with_guidance_embedding(unet, dim: int):
    """The U-Net with a guidance input (``time_cond_proj_dim``), its other weights unchanged. The new projection
    keeps torch's default initialisation, as the reference does (it loads the teacher's weights non-strictly)."""
    from diffusers import UNet2DConditionModel

    if unet.config.time_cond_proj_dim is not None:
        return unet
    out = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=dim)
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    return out


def add_lora(unet, rank: int, alpha: float | None, targets: list[str] | None = None):
    """LoRA adapters on the U-Net's TARGETS (default: LCM-LoRA's; peft; B = 0, so the model starts unchanged);
    only they train."""
    from peft import LoraConfig

    targets = targets or LORA_TARGETS
    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets))
    except ValueError:  # peft: none of the names is a module of this U-Net
        raise SlimsdError(
            f"LoRA target modules {targets} name no layer of this U-Net; allowed: module names such as "
            "to_q, to_k, to_v, to_out.0"
        ) from None
    return unet


def load_finetune_models(cfg: DistillConfig, device, weight_dtype: torch.dtype) -> Models:
    """objective=finetune: ONE model, whose U-Net (fp32) gets the adapters and fills the student's slot; its
    other parts serve as the frozen VAE and text encoder(s), in the compute dtype. No teacher is loaded."""
    from slimsd.models.loading import load, read_slimsd_info

    pipe = load(cfg.student, device="cpu", dtype="fp32", optimize=False, allow_pickle=cfg.allow_pickle)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module) and part is not pipe.unet:
            part.to(device)
            if weight_dtype != torch.float32:  # (a cast to the dtype it has already makes diffusers warn)
                part.to(weight_dtype)
    info = (read_slimsd_info(cfg.student) or {}) if Path(cfg.student).is_dir() else {}
    unet = add_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets or ATTENTION_TARGETS)
    return Models(pipe, unet, info.get("recipe"), info.get("weight_map"), [], None)


def load_models(cfg: DistillConfig, device, weight_dtype: torch.dtype) -> Models:
    """The teacher pipeline (frozen, in the compute dtype) and the student U-Net (fp32): from a
    `slimsd compress` folder, or compressed here by a recipe."""
    from slimsd.models.architecture import load_recipe, parse_recipe, plan
    from slimsd.models.compress import compress_pipeline
    from slimsd.models.loading import load, read_slimsd_info
    from slimsd.models.single_file import is_single_file
    from slimsd.train.losses import default_taps, parse_taps

    if cfg.objective == "finetune":
        return load_finetune_models(cfg, device, weight_dtype)
    student_is_folder = Path(cfg.student).is_dir() or is_single_file(cfg.student)
    if not student_is_folder:
        recipe_obj = load_recipe(cfg.student)  # a bad recipe fails before the teacher is loaded
    # No fast runtime in training: the taps, the weight map and exact resumption need the modules as they are.
    teacher_pipe = load(
        cfg.teacher, device=device, dtype=weight_dtype, optimize=False, allow_pickle=cfg.allow_pickle
    )
    if student_is_folder:
        student = load(
            cfg.student, device="cpu", dtype="fp32", optimize=False, allow_pickle=cfg.allow_pickle
        ).unet
        info = read_slimsd_info(cfg.student) or {}
        recipe_obj = parse_recipe(info["recipe"]) if info.get("recipe") else None
        weight_map, source = info.get("weight_map"), cfg.student
    else:
        result = compress_pipeline(teacher_pipe, recipe_obj)
        student, weight_map, source = result.pipeline.unet, result.weight_map, None
    student = student.float()
    lora_base = None
    if cfg.objective in GUIDANCE_INPUT:
        student = with_guidance_embedding(student, cfg.cond_proj_dim)
    elif cfg.objective == "lcm-lora":
        lora_base = {k: v.detach().clone() for k, v in student.state_dict().items()}
        student = add_lora(student, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)

    s_cfg, t_cfg = (
        dict(student.config),
        {k: v for k, v in dict(teacher_pipe.unet.config).items() if not k.startswith("_")},
    )
    if cfg.feature_taps is not None:
        taps = parse_taps(cfg.feature_taps)
    elif recipe_obj is not None and "feature_taps" in recipe_obj.extra:
        taps = parse_taps(recipe_obj.extra["feature_taps"])
    else:
        taps = default_taps(s_cfg, t_cfg, plan(t_cfg, recipe_obj)[1] if recipe_obj is not None else None)
    return Models(
        teacher_pipe,
        student,
        recipe_obj.to_dict() if recipe_obj else None,
        weight_map,
        taps,
        source,
        lora_base,
    )


# --- pieces of a step -----------------------------------------------------------------------------------------


def save_validation(
    pipe_cls, teacher_pipe, student, cfg: DistillConfig, resolution: int, path: Path, autocast, write=True
):
    """Images of the fixed prompts from the current student (same seeds every time), as one PNG grid."""
    import io

    from slimsd.atomic import atomic_write_bytes
    from slimsd.images import make_grid

    pipe = pipe_cls(**(dict(teacher_pipe.components) | {"unet": student}))
    pipe.set_progress_bar_config(disable=True)
    was_training = student.training
    student.eval()
    images = []
    for i, prompt in enumerate(cfg.validation_prompts):
        g = torch.Generator().manual_seed(cfg.seed + i)
        with torch.no_grad(), autocast():  # fp32 student, frozen parts in the compute dtype
            images.append(
                pipe(
                    prompt,
                    num_inference_steps=cfg.validation_steps,
                    height=resolution,
                    width=resolution,
                    generator=g,
                ).images[0]
            )
    student.train(was_training)
    buf = io.BytesIO()
    grid = make_grid(images, cols=len(images))
    grid.save(buf, format="PNG")
    if write:
        atomic_write_bytes(path, buf.getvalue())
    return grid


def save_final(
    models: Models, student_state: dict, cfg: DistillConfig, state: dict, reuse_components: bool
) -> Path:
    """The trained student as a plain diffusers pipeline folder (fp32), with slimsd.json provenance."""
    from diffusers import UNet2DConditionModel

    from slimsd import __version__
    from slimsd.atomic import atomic_dir
    from slimsd.models.loading import load

    if cfg.objective == "finetune":
        return save_adapters(models, student_state, cfg, state)
    trained, lcm_lora = student_state, cfg.objective == "lcm-lora"
    if lcm_lora:  # the student's own weights, and the adapters beside them
        student_state = models.lora_base
    unet = UNet2DConditionModel.from_config(models.student.config)
    unet.load_state_dict({k: v.float() for k, v in student_state.items()})
    if reuse_components:
        base = models.teacher_pipe
    else:  # the frozen parts were cast to the compute dtype for training: save fp32 copies
        base = load(
            models.student_source or cfg.teacher,
            device="cpu",
            dtype="fp32",
            optimize=False,
            allow_pickle=cfg.allow_pickle,
        )
    components = dict(base.components) | {"unet": unet}
    sampling = step_sampling(cfg)
    if sampling:  # a few-step student samples with its own scheduler, in plain diffusers too
        components["scheduler"] = step_scheduler(cfg, base.scheduler.config)
    for part in components.values():
        # A fast tokenizer keeps the padding and truncation of its last call in its backend, and saves them:
        # clear them, so that final/ is the same whether this process encoded captions or not (a cached run,
        # or a run resumed at its last step); the pipelines set both on every call anyway.
        backend = getattr(part, "backend_tokenizer", None)
        if backend is not None:
            backend.no_truncation()
            backend.no_padding()
    pipe = (
        type(base)(**components)
        if "requires_safety_checker" not in _init_params(type(base))
        else type(base)(**components, requires_safety_checker=False)
    )
    out = Path(cfg.output_dir) / "final"
    with atomic_dir(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if lcm_lora:  # diffusers' LoRA format: pipe.load_lora_weights(final/) finds it
            write_adapters(tmp, type(base), models.student, trained)
        info = {
            "slimsd_version": __version__,
            "teacher": cfg.teacher,
            "recipe": models.recipe,
            "weight_map": models.weight_map,
            "distill": asdict(cfg),
            "feature_taps": models.taps,
            "step": state["step"],
            "skipped": state["skipped"],
            "config_changes": state["config_changes"],  # allowed changes on resumes, with their steps
        }
        if sampling:
            info["sampling"] = sampling
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def write_adapters(folder: Path, pipe_cls, unet, unet_state: dict) -> None:
    """The adapters of UNET (values from UNET_STATE) as FOLDER/pytorch_lora_weights.safetensors in diffusers'
    LoRA format: peft's key names (``unet....to_q.lora_A.weight``), which ``load_lora_weights`` reads as they are,
    and peft's config (rank, alpha, layers) in the header, from which diffusers and slimsd take alpha/rank."""
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(unet, unet_state)
    metadata = unet.peft_config["default"].to_dict()
    # peft keeps target_modules as a set, whose order changes with Python's string hash seed: sorted, the file
    # is the same on every run
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipe_cls.save_lora_weights(
        folder,
        unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in lora.items()},
        unet_lora_adapter_metadata=metadata,
    )


def save_adapters(models: Models, unet_state: dict, cfg: DistillConfig, state: dict) -> Path:
    """objective=finetune: final/ holds the adapters alone (pytorch_lora_weights.safetensors) and slimsd.json,
    which names the base model; the base model is not copied (use it with ``--lora``)."""
    from slimsd import __version__
    from slimsd.atomic import atomic_dir
    from slimsd.train.config import finetune_view

    out = Path(cfg.output_dir) / "final"
    with atomic_dir(out, overwrite=True) as tmp:
        write_adapters(tmp, type(models.teacher_pipe), models.student, unet_state)
        info = {
            "slimsd_version": __version__,
            "kind": "lora",
            "base_model": cfg.student,
            "lora": LORA_FILE,
            "finetune": finetune_view(cfg),
            "step": state["step"],
            "skipped": state["skipped"],
            "config_changes": state["config_changes"],
        }
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def step_sampling(cfg: DistillConfig) -> dict | None:
    """How a step-distilled student samples by default (``slimsd generate`` reads it from slimsd.json)."""
    if cfg.objective == "kd":
        return None
    embedded = cfg.objective in GUIDANCE_INPUT
    out = {
        "kind": cfg.objective,
        "scheduler": "ddim" if cfg.objective == "progressive" else "lcm",
        "steps": cfg.progressive_steps[-1] if cfg.objective == "progressive" else cfg.sample_steps,
        # a guidance embedding takes the scale (no doubled batch); LCM-LoRA: guidance is baked in
        "guidance": cfg.sample_guidance or (cfg.guidance_min if embedded else 1.0),
        "guidance_range": [cfg.guidance_min, cfg.guidance_max] if embedded else None,
    }
    if cfg.objective == "progressive":
        out["progressive_steps"] = cfg.progressive_steps
    else:
        out["solver_steps"] = cfg.solver_steps
    if cfg.objective == "lcm-lora":
        out["lora"] = LORA_FILE
    return out


def step_scheduler(cfg: DistillConfig, teacher_config: dict):
    """The scheduler of a step-distilled student, on the teacher's noise schedule: LCM's, or (progressive) DDIM
    with trailing spacing that ends at ᾱ = 1, i.e. on the timesteps the last round trained (progressive.py)."""
    from diffusers import DDIMScheduler, LCMScheduler

    if cfg.objective == "progressive":
        # clip_sample: DDIM's default clips x̂₀ to [-1, 1], which suits pixels, not latents
        cls, options = (
            DDIMScheduler,
            {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False},
        )
    else:
        cls = LCMScheduler
        options = {"original_inference_steps": cfg.solver_steps, "timestep_scaling": cfg.timestep_scaling}
    own = set(_init_params(cls))  # the teacher's scheduler may have options this one has not
    return cls.from_config({k: v for k, v in teacher_config.items() if k in own}, **options)


@torch.no_grad()
def update_average(average: dict[str, torch.Tensor], online: dict[str, torch.Tensor], decay: float) -> None:
    """θ_avg ← decay·θ_avg + (1 − decay)·θ, in place, in fp32: the EMA weights and LCM's target network."""
    for k, v in average.items():
        v.mul_(decay).add_(online[k].detach().float(), alpha=1 - decay)


def _init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


# --- the loop -------------------------------------------------------------------------------------------------


def train(cfg: DistillConfig, step_offset: int = 0, keep_process_group: bool = False) -> dict:
    """Distill ``cfg.student`` from ``cfg.teacher`` on ``cfg.data``. Returns {"final_dir", "losses", ...}.
    ``step_offset``: the steps of a staged plan's earlier stages (checkpoint_every counts the plan's steps).
    ``keep_process_group``: a staged plan's stage; the plan's next stages and folder work use the launched
    processes' group (torch cannot reliably start a second one in the same processes), the plan ends it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from slimsd.devices import DTYPES, MIXED_PRECISION, quiet_deepspeed
    from slimsd.models.loading import is_sdxl, native_resolution
    from slimsd.train import data as D
    from slimsd.train.encoders import encode_images, encode_text, time_ids
    from slimsd.train.losses import attach_taps, distill_loss, finetune_loss, task_target

    cfg = validate(cfg)
    quiet_deepspeed()
    if cfg.stages:  # a staged plan runs this loop once per stage
        from slimsd.train.stages import train_plan

        return train_plan(cfg)
    output_dir = Path(cfg.output_dir)
    # 0. The output folder (one run per folder; a resume with a changed config is checked; runs.py), read only.
    run = plan_run(cfg)
    if cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise SlimsdError("use_8bit_adam=true needs bitsandbytes (pip install bitsandbytes; CUDA only)")
    has_tensorboard = importlib.util.find_spec("tensorboard") is not None
    log_with = "tensorboard" if cfg.tensorboard and has_tensorboard else None
    # Under a launcher on a machine without CUDA: one gloo group (sharding.accelerator_kwargs)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _reset_accelerate_state(world_size)  # a train() that failed earlier in this process may have left it set
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(output_dir),
        **S.accelerator_kwargs(world_size),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise SlimsdError(
            f"launched as {world_size} processes but accelerate sees {accelerator.num_processes}: "
            "start them with `accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    engine = S.setup(accelerator, cfg.batch_size)  # single, ddp, fsdp or deepspeed (sharding.py)
    for line in run.notes:
        accelerator.print(line)
    if run.finished:
        accelerator.print(
            f"{output_dir} already finished: step {run.step} of {cfg.max_steps}; the student is in "
            f"{output_dir / 'final'}"
        )
        return {"final_dir": str(output_dir / "final"), "steps": run.step, "already_finished": True}
    if cfg.tensorboard and not has_tensorboard and accelerator.is_main_process:
        print(
            "slimsd: warning: the tensorboard package is not installed, so this run writes no TensorBoard "
            "logs (pip install tensorboard, or set tensorboard=false)",
            file=sys.stderr,
        )
    # Rows dropped when the data is indexed end the run here, before the folder is touched or a model loads.
    source = D.open_source(cfg.data, cfg.seed)
    D.check_rows(source, cfg.data, cfg.batch_size * accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process has read the folder before the main one writes it
    if accelerator.is_main_process:
        begin_run(run, cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    weight_dtype = DTYPES[MIXED_PRECISION[cfg.mixed_precision]]
    device = accelerator.device

    # 1. Models: a frozen teacher in the compute dtype, a trainable fp32 student, taps hooked on both.
    models = load_models(cfg, device, weight_dtype)
    tp = models.teacher_pipe
    sdxl = is_sdxl(tp)
    frozen = [tp.unet, tp.vae, tp.text_encoder] + ([tp.text_encoder_2] if sdxl else [])
    for m in frozen:
        if m is not models.student:  # finetune: the model's own U-Net is the one trained
            m.requires_grad_(False).eval()
    student = models.student.to(device)
    if cfg.objective not in LORA_OBJECTIVES:  # LoRA: only the adapters train (add_lora froze the rest)
        student.requires_grad_(True)
    student.train()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    lcm = cfg.objective in ("lcm", "lcm-lora")
    progressive = cfg.objective == "progressive"
    guided = lcm or progressive  # the teacher guided by a w drawn per sample
    use_teacher = guided or cfg.lambda_out > 0 or cfg.lambda_feat > 0
    use_feat = not guided and cfg.lambda_feat > 0 and bool(models.taps)
    s_taps = attach_taps(student, [s for s, _ in models.taps]) if use_feat else None
    t_taps = attach_taps(tp.unet, [t for _, t in models.taps]) if use_feat else None
    noise_scheduler = DDPMScheduler.from_config(tp.scheduler.config)
    resolution = cfg.resolution or native_resolution(tp)
    prior = None  # finetune with class_prompt: the class images, sampled before the first step
    if cfg.class_prompt is not None:
        from slimsd.train import prior as PR

        if accelerator.is_main_process:
            PR.ensure_class_images(tp, cfg, resolution, accelerator.autocast)
        accelerator.wait_for_everyone()
        prior = PR.read_class_rows(tp, output_dir / PR.CLASS_DIR, cfg, resolution, sdxl)
    # LCM: the solver's timesteps, the schedule's ᾱ, and the target network (an EMA of the student; LCM-LoRA
    # takes the student itself as its target).
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if lcm and not 1 <= cfg.solver_steps <= num_train_timesteps // 2:
        raise SlimsdError(
            f"config key 'solver_steps': {cfg.solver_steps} is out of range for a teacher with "
            f"{num_train_timesteps} timesteps; allowed: 1 to {num_train_timesteps // 2}"
        )
    ddim_ts = C.solver_timesteps(num_train_timesteps, cfg.solver_steps).to(device)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    emb_dim = models.student.config.time_cond_proj_dim if cfg.objective in GUIDANCE_INPUT else None
    # progressive: each round's DDIM schedule, ᾱ with the clean end, the optimizer steps per round.
    if progressive and (
        num_train_timesteps % cfg.progressive_steps[-1] or cfg.progressive_steps[0] > num_train_timesteps
    ):
        raise SlimsdError(
            f"config key 'progressive_steps': {cfg.progressive_steps} does not fit a teacher with "
            f"{num_train_timesteps} timesteps; allowed: counts up to {num_train_timesteps}, the last one a "
            f"divisor of {num_train_timesteps} (DDIM then samples the timesteps it was trained on)"
        )
    grids = (
        [P.schedule(num_train_timesteps, n).to(device) for n in cfg.progressive_steps] if progressive else []
    )
    alphas_end = P.alphas_with_end(alphas_cumprod)
    per_round = round_length(cfg) if progressive else None
    # The target network: LCM's (an EMA of the student), or progressive's round teacher (the student as the
    # last round ended). LCM-LoRA takes the student itself as its target.
    target_unet = None
    if cfg.objective in GUIDANCE_INPUT:
        import copy

        target_unet = copy.deepcopy(student).requires_grad_(False)

    # 2. Optimizer (optionally 8-bit) and LR schedule (stepped once per optimizer step, never per process).
    params = [p for p in student.parameters() if p.requires_grad]
    opt_kwargs = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.weight_decay,
        "eps": cfg.adam_epsilon,
    }
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, **opt_kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **opt_kwargs)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    ema = {k: v.detach().clone().float() for k, v in student.state_dict().items()} if cfg.ema else None
    target = target_unet.state_dict() if target_unet is not None else None  # views of its parameters
    averages = {"ema": ema, "target": target}
    gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, VAE samples, caption dropout

    # 3. Resume: weights, optimizer, schedule, EMA, generator, step and data position.
    state = {"step": 0, "micro_batches": 0, "skipped": {}, "losses": []}
    resume_from, torch_rng = run.checkpoint, None
    arch = architecture(student, models.recipe["name"] if models.recipe else cfg.student)
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    # Prepared first: the checkpoint's whole weights and optimizer state are then put into each process's shard.
    student, optimizer = accelerator.prepare(student, optimizer)
    S.cast_inputs(accelerator, engine, student)
    if resume_from is not None:
        state, torch_rng = load_checkpoint(
            engine,
            resume_from,
            student,
            optimizer,
            lr_scheduler,
            averages,
            gen,
            arch,
            shapes,
        )
        if run.changes and cfg.allow_config_change:
            apply_optimizer_settings(optimizer, lr_scheduler, cfg)
        accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    # What the next checkpoints record: this run's config, its history of changes, the student it trains.
    state |= {"config": asdict(cfg), "config_changes": run.history, "architecture": arch}
    skipped = Counter(state["skipped"])

    # 4. Data: this process's slice of every global micro-batch, from the saved position on.
    skipped.update({} if resume_from else source.skipped)
    cached = source.kind == "cache"
    if cached and source.info.get("resolution") != resolution:
        raise SlimsdError(
            f"latent cache {cfg.data!r} was made at {source.info.get('resolution')} px; this run "
            f"trains at {resolution} px (set resolution={source.info.get('resolution')})"
        )
    examples = D.Examples(source, resolution, cfg.center_crop, cfg.random_flip, cfg.seed)
    plan = D.BatchPlan(
        len(examples),
        cfg.batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.seed,
        start=state["micro_batches"],
    )
    loader = torch.utils.data.DataLoader(
        examples, batch_sampler=plan, collate_fn=D.collate, num_workers=cfg.num_workers
    )
    batches = iter(loader)  # draws its base seed from the torch RNG
    if torch_rng is not None:  # restored after that draw: the uninterrupted run made it before its checkpoint
        torch.set_rng_state(torch_rng)
    guard = D.ReadGuard(cfg.data, source)
    global_batch = cfg.batch_size * accelerator.num_processes
    empty = (
        {k: v.to(device, weight_dtype) for k, v in encode_text(tp, [""]).items()}
        if cfg.caption_dropout or guided
        else None
    )
    if guided and sdxl and tp.config.get("force_zeros_for_empty_prompt", True):
        empty = {k: torch.zeros_like(v) for k, v in empty.items()}  # SDXL's "no prompt", as its pipeline does

    if log_with and accelerator.is_main_process:
        accelerator.init_trackers(
            "tensorboard",
            config={k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)},
        )
    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        # None: tqdm shows the bar only on a terminal (logs and pipes get the summary lines alone)
        disable=None if cfg.progress and accelerator.is_main_process else True,
        desc=cfg.objective if cfg.objective == "finetune" else "distill",
        dynamic_ncols=True,
    )
    losses: list[dict] = state["losses"]
    images_seen, t0 = 0, time.perf_counter()

    def next_batch() -> dict:
        """The next micro-batch with a readable row (every row unreadable: count them, take the next one)."""
        while True:
            batch = next(batches)
            state["micro_batches"] += 1
            skipped.update(batch["skipped"])
            guard.check(batch, state["step"])  # ends a run whose data yields nothing
            if batch["size"]:
                return batch

    def cast(d, dtype):
        return {"added_cond_kwargs": {k: v.to(dtype) for k, v in d["added_cond_kwargs"].items()}} if d else {}

    def guided_teacher(noisy, t, cond, extra, w) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) of the teacher guided by w: with and without the caption in one batch, ε_c + w·(ε_c − ε_u)."""
        n, kind = noisy.shape[0], noise_scheduler.config.prediction_type
        both = {k: torch.cat([v, empty[k].expand_as(v)]).to(weight_dtype) for k, v in cond.items()}
        extra2 = {}
        if extra:
            ids = extra["added_cond_kwargs"]["time_ids"]
            extra2 = {
                "added_cond_kwargs": {
                    "text_embeds": both["pooled_prompt_embeds"],
                    "time_ids": ids.repeat(2, 1),
                }
            }
        out = tp.unet(
            torch.cat([noisy, noisy]).to(weight_dtype),
            torch.cat([t, t]),
            both["prompt_embeds"],
            **cast(extra2, weight_dtype),
        ).sample
        x0_c, eps_c = C.predicted_x0_eps(out[:n], t, noisy, alphas_cumprod, kind)
        x0_u, eps_u = C.predicted_x0_eps(out[n:], t, noisy, alphas_cumprod, kind)
        wv = w.view(-1, 1, 1, 1)
        return x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)

    def consistency_terms(latents, noise, index, w, cond, extra) -> dict:
        """LCD on one micro-batch (consistency.py; Luo et al. 2023, Algorithm 1)."""
        kind = noise_scheduler.config.prediction_type
        start = ddim_ts[index]  # t_{n+k}
        prev = (start - num_train_timesteps // cfg.solver_steps).clamp(min=0)  # t_n
        noisy = noise_scheduler.add_noise(latents, noise, start)
        w_emb = C.guidance_embedding(w, emb_dim).to(device) if emb_dim else None
        (skip_s, out_s), (skip_p, out_p) = (
            [x.to(device).view(-1, 1, 1, 1) for x in C.boundary_scalings(t, cfg.timestep_scaling)]
            for t in (start, prev)
        )
        pred = student(
            noisy, start, cond["prompt_embeds"].float(), timestep_cond=w_emb, **cast(extra, torch.float32)
        ).sample
        online = skip_s * noisy + out_s * C.predicted_x0_eps(pred, start, noisy, alphas_cumprod, kind)[0]
        with torch.no_grad():  # the guided teacher, then one DDIM step to t_n
            x_prev = C.ddim_step(*guided_teacher(noisy, start, cond, extra, w), prev, alphas_cumprod)
            net = target_unet if target_unet is not None else accelerator.unwrap_model(student)
            t_pred = net(
                x_prev, prev, cond["prompt_embeds"].float(), timestep_cond=w_emb, **cast(extra, torch.float32)
            ).sample
            target = (
                skip_p * x_prev + out_p * C.predicted_x0_eps(t_pred, prev, x_prev, alphas_cumprod, kind)[0]
            )
        loss = C.consistency_distance(online, target, cfg.lcm_loss, cfg.huber_c)
        return {"loss": loss, "lcm": loss}

    def progressive_terms(latents, noise, index, w, cond, extra, rnd: int) -> dict:
        """Guided progressive distillation on one micro-batch (progressive.py): round 0 learns the guided
        teacher's x̂₀; round r learns in one step of its schedule two DDIM steps of the round's teacher."""
        kind = noise_scheduler.config.prediction_type
        t = grids[rnd][index]
        noisy = noise_scheduler.add_noise(latents, noise, t)
        w_emb = C.guidance_embedding(w, emb_dim).to(device)
        text, extra32 = cond["prompt_embeds"].float(), cast(extra, torch.float32)
        with torch.no_grad():
            if rnd == 0:
                target = guided_teacher(noisy, t, cond, extra, w)[0]
            else:
                s, mid = grids[rnd][index + 1], grids[rnd - 1][2 * index + 1]  # t = 2N-schedule[2i]

                def round_teacher(z, at):
                    return target_unet(z, at, text, timestep_cond=w_emb, **extra32).sample

                z2 = P.two_ddim_steps(round_teacher, noisy, t, mid, s, alphas_end, kind)
                target = P.one_step_target(noisy, z2, t, s, alphas_end)
        pred = student(noisy, t, text, timestep_cond=w_emb, **extra32).sample
        x0 = C.predicted_x0_eps(pred, t, noisy, alphas_end, kind)[0]
        loss = P.x0_loss(x0, target, t, alphas_end)
        return {"loss": loss, "progressive": loss}

    def micro_batch_loss(batch) -> dict:
        """The loss terms of one micro-batch on this process."""
        # Randomness for the whole global micro-batch, identical on every process; each takes its rows.
        rows = accelerator.process_index * cfg.batch_size + batch["slot"]
        if cached:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            cond = {
                k: batch[k].to(device, weight_dtype)
                for k in ("prompt_embeds", "pooled_prompt_embeds")
                if k in batch
            }
        else:
            with torch.no_grad():
                mean, std = encode_images(tp.vae, batch["pixels"].to(device))
                cond = encode_text(tp, batch["caption"])
        shape = (global_batch, *mean.shape[1:])
        # kd: a timestep of the T training ones; lcm: a step n of the solver's schedule; progressive: a step i
        # of this round's schedule
        rnd = state["step"] // per_round if progressive else 0
        high = cfg.solver_steps if lcm else cfg.progressive_steps[rnd] if progressive else num_train_timesteps
        timesteps = torch.randint(0, high, (global_batch,), generator=gen)[rows]
        noise = torch.randn(shape, generator=gen)[rows].to(device)
        sample_eps = torch.randn(shape, generator=gen)[rows].to(device)
        drop = (torch.rand(global_batch, generator=gen)[rows] < cfg.caption_dropout).to(device)
        timesteps = timesteps.to(device)
        if guided:  # the teacher's guidance w = scale − 1, one per sample
            span = cfg.guidance_max - cfg.guidance_min
            w = (cfg.guidance_min - 1 + span * torch.rand(global_batch, generator=gen))[rows].to(device)
        latents = (mean.float() + std.float() * sample_eps) * tp.vae.config.scaling_factor
        if empty is not None and drop.any():
            cond = {
                k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), empty[k].expand_as(v), v)
                for k, v in cond.items()
            }
        extra = {}
        if sdxl:
            ids = (
                batch["time_ids"]
                if cached
                else time_ids(batch["original_size"], batch["crop_top_left"], resolution)
            )
            extra = {
                "added_cond_kwargs": {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": ids.to(device)}
            }

        if lcm:
            return consistency_terms(latents, noise, timesteps, w, cond, extra)
        if progressive:
            return progressive_terms(latents, noise, timesteps, w, cond, extra, rnd)
        instances = latents.shape[0]
        if prior is not None:  # finetune's class rows (DreamBooth), after the instance rows
            latents, noise, timesteps, cond, extra = PR.add_class_rows(
                prior,
                gen,
                global_batch,
                rows,
                num_train_timesteps,
                tp.vae.config.scaling_factor,
                (latents, noise, timesteps, cond, extra),
            )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = task_target(noise_scheduler, latents, noise, timesteps)
        teacher_pred = None
        if use_teacher:
            with torch.no_grad():
                if t_taps:
                    t_taps.clear()
                teacher_pred = tp.unet(
                    noisy.to(weight_dtype),
                    timesteps,
                    cond["prompt_embeds"].to(weight_dtype),
                    **cast(extra, weight_dtype),
                ).sample
        if s_taps:
            s_taps.clear()
        student_pred = student(
            noisy, timesteps, cond["prompt_embeds"].float(), **cast(extra, torch.float32)
        ).sample
        if cfg.objective == "finetune":  # the task loss alone, no teacher
            return finetune_loss(student_pred, target, instances, cfg.prior_loss_weight)
        return distill_loss(
            student_pred,
            target,
            teacher_pred,
            s_taps.features if s_taps else {},
            t_taps.features if t_taps else {},
            models.taps,
            cfg.lambda_task,
            cfg.lambda_out,
            cfg.lambda_feat,
            cfg.feat_norm,
        )

    # 5. The loop: one optimizer step per `gradient_accumulation_steps` micro-batches.
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    while state["step"] < end:
        step_terms = []
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next_batch()
            with accelerator.accumulate(student):
                terms = micro_batch_loss(batch)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_terms.append({k: v.detach() for k, v in terms.items() if "/" not in k})
            images_seen += batch["size"] * accelerator.num_processes
        lr_scheduler.step()
        state["step"] += 1
        # the whole weights (gathered under FSDP / ZeRO-3) only when an average needs them
        online = (
            S.full_weights(accelerator, engine, student) if target is not None or ema is not None else None
        )
        if target is not None and lcm:  # LCM's target network trails the student (μ = target_decay)
            update_average(target, online, cfg.target_decay)
        if progressive and state["step"] % per_round == 0:  # a round ends: its student teaches the next one
            with torch.no_grad():
                for k, v in online.items():
                    target[k].copy_(v)
        if ema is not None:
            update_average(ema, online, cfg.ema_decay)

        mean_terms = {k: torch.stack([t[k] for t in step_terms]).mean() for k in step_terms[0]}
        mean_terms = {
            k: accelerator.reduce(v.reshape(1), reduction="mean").item() for k, v in mean_terms.items()
        }
        record = {"step": state["step"], **mean_terms, "lr": lr_scheduler.get_last_lr()[0]}
        if progressive:
            record["round"] = (state["step"] - 1) // per_round
        losses.append(record)
        rate = images_seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(
            **{k: f"{v:.4f}" for k, v in mean_terms.items()},
            img_s=f"{rate:.1f}",
        )
        bar.update(1)
        if log_with and (state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps):
            accelerator.log(
                {f"train/{k}": v for k, v in record.items() if k != "step"} | {"train/images_per_s": rate},
                step=state["step"],
            )

        last = state["step"] == end
        if (cfg.checkpoint_every and (state["step"] + step_offset) % cfg.checkpoint_every == 0) or last:
            state["skipped"] = dict(skipped)
            save_checkpoint(
                accelerator,
                engine,
                output_dir,
                state["step"],
                student,
                optimizer,
                lr_scheduler,
                averages,
                gen,
                state,
                cfg.keep_last,
            )
        if cfg.validation_every and cfg.validation_prompts and state["step"] % cfg.validation_every == 0:
            # a sharded student runs its forward on every process (collectives); the main one writes
            if accelerator.is_main_process or engine in ("fsdp", "deepspeed"):
                grid = save_validation(
                    type(tp),
                    tp,
                    accelerator.unwrap_model(student),
                    cfg,
                    resolution,
                    output_dir / "validation" / f"step-{state['step']:08d}.png",
                    accelerator.autocast,
                    write=accelerator.is_main_process,
                )
                if log_with and accelerator.is_main_process:
                    import numpy as np

                    accelerator.get_tracker("tensorboard").writer.add_image(
                        "validation", np.asarray(grid), state["step"], dataformats="HWC"
                    )
            accelerator.wait_for_everyone()
    bar.close()

    # 6. The final student: a plain diffusers pipeline folder (the EMA weights when EMA is on). A run stopped
    # early (stop_at_step) leaves only its checkpoint: resume=latest finishes it.
    finished = state["step"] >= cfg.max_steps
    state["skipped"] = dict(skipped)
    unet_state = ema
    if ema is None and finished:  # gathered on every process (a collective under FSDP / ZeRO-3)
        unet_state = S.full_weights(accelerator, engine, student)
    if accelerator.is_main_process and finished:
        save_final(models, unet_state, cfg, state, reuse_components=weight_dtype == torch.float32)
    if skipped:
        accelerator.print(f"skipped rows: {D.describe_skipped(skipped)}")
    accelerator.wait_for_everyone()
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()  # the trackers, and the process group
    for t in (s_taps, t_taps):
        if t is not None:
            t.remove()
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    _reset_accelerate_state(num_processes)
    return {
        "final_dir": str(Path(cfg.output_dir) / "final") if finished else None,
        "losses": losses,
        "skipped": dict(skipped),
        "steps": state["step"],
        "num_processes": num_processes,
        "process_index": process_index,
        "engine": engine,
        "taps": models.taps,
        "images_per_second": images_seen / max(time.perf_counter() - t0, 1e-9),
        "resumed_from": str(resume_from) if resume_from else None,
        "student_unet_params": sum(p.numel() for p in models.student.parameters()),
    }


def _reset_accelerate_state(num_processes: int) -> None:
    """Let a later ``train()`` in the same (single) process pick another mixed precision or accumulation."""
    if num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
