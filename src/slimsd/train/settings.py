"""DistillConfig: every key of a distill / finetune config with its default, and nothing else.

The fields alone, below everything that reads them: the objectives, checkpoints and the class-image sampler take
a config, and config.py (which checks one: ranges, choices, each objective's own rules) imports the objectives'
registry, so the type lives here, where neither needs the other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillConfig:
    teacher: str = "micro-sd"  # preset / micro / toy-sd / folder / hub id
    student: str = "bk-small"  # a `slimsd compress`/`distill` folder or its single-file export, or a recipe
    # kd: BK-SDM's task + output-KD + feature-KD (losses.py). lcm: latent consistency distillation into a
    # guidance-conditioned few-step student; lcm-lora: the same as LoRA adapters, no guidance input
    # (consistency.py). progressive: guided progressive distillation, rounds that halve the DDIM steps of a
    # guidance-conditioned student (progressive.py). finetune: LoRA adapters on the student slot's model trained
    # with the task loss alone, no teacher (`slimsd finetune`, which names the keys below as FINETUNE_NAMES).
    objective: str = "kd"
    data: str = "shapes:64"  # folder, .tar shard(s), parquet, `slimsd cache` folder, or shapes:N
    # rows kept by their metadata, e.g. ["aesthetic >= 7.5", "min(width, height) >= 512"] (train/filters.py)
    data_filter: list[str] | None = None
    output_dir: str = "runs/distill"
    max_steps: int = 100  # optimizer steps
    batch_size: int = 4  # per process; global batch = batch_size x processes x gradient_accumulation_steps
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5  # BK-SDM
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lambda_task: float = 1.0
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    feat_norm: str = "none"  # "teacher": divide each tap's MSE by the teacher feature's mean square
    feature_taps: list | None = (
        None  # [[student_module, teacher_module], ...]; default: the recipe's, else BK-SDM's
    )
    resolution: int | None = None  # default: the teacher's native size
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0  # probability of training on the empty caption (classifier-free guidance)
    checkpoint_every: int = 500  # 0: only at the end
    keep_last: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # start over: remove the run already in output_dir (refused with resume)
    allow_config_change: bool = False  # resume even when keys that change the computation differ (recorded)
    stop_at_step: int | None = (
        None  # end this run early after this step (checkpointed), for time-limited jobs
    )
    mixed_precision: str = "no"
    seed: int = 0
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 0  # 0: no validation images
    validation_steps: int = 25
    log_every: int = 10
    num_workers: int = 0
    # the share of the data's rows that may fail to read (corrupt or missing images, over all processes) before
    # the run ends with one line; 1: train on whatever reads
    max_skipped_fraction: float = 0.05
    tensorboard: bool = True
    progress: bool = True
    allow_pickle: bool = False
    # --- lcm / lcm-lora (Luo et al. 2023; defaults as diffusers' train_lcm_distill_sd_wds.py) ---
    solver_steps: int = 50  # the DDIM solver's schedule: T / solver_steps timesteps per step ("skip 20")
    guidance_min: float = 6.0  # CFG scale range of the teacher, drawn per sample (w = scale - 1: 5..15)
    guidance_max: float = 16.0
    lcm_loss: str = "l2"  # or "huber" (pseudo-Huber)
    huber_c: float = 0.001
    target_decay: float = 0.95  # EMA of the target network (lcm)
    timestep_scaling: float = 10.0  # boundary scalings c_skip / c_out
    cond_proj_dim: int = 256  # the guidance embedding's size (lcm), when the student has none yet
    lora_rank: int = 64  # lcm-lora
    lora_alpha: float | None = None  # default: lora_rank (scale 1)
    lora_targets: list[str] | None = None  # module names (peft target_modules); default: the objective's
    sample_steps: int = (
        4  # what `slimsd generate` uses for the result by default (progressive: its last round)
    )
    # default: guidance_min (lcm, progressive), 1 (lcm-lora: guidance is baked in)
    sample_guidance: float | None = None
    # --- progressive (Meng et al. 2023; Salimans & Ho 2022) ---
    # DDIM steps per round, each half the one before: round 0 (stage 1) learns the guided teacher at the first
    # count's timesteps; each next round learns in one step two steps of the round before.
    progressive_steps: list[int] = field(default_factory=lambda: [32, 16, 8, 4])
    steps_per_round: int | None = None  # optimizer steps per round; default: max_steps / rounds
    # --- finetune: DreamBooth prior preservation (Ruiz et al. 2023), on when class_prompt is set ---
    class_prompt: str | None = None  # e.g. "a photo of a dog": the frozen model's images of the class
    num_class_images: int = 100  # generated once (seeded) into OUTPUT/class_images, reused on resume
    class_steps: int = 25  # sampling steps of each class image
    prior_loss_weight: float = 1.0  # the class images' task loss, added with this weight
    # --- vae-decoder ---
    # sigma of Gaussian noise added to each training latent after its posterior draw, in units of the U-Net
    # latents (the VAE's latents x scaling_factor, whose spread is about 1): the teacher decodes the same noised
    # latents, so the tiny decoder also learns the full decoder off the posterior's manifold (a few-step
    # student's latents); 0: the posterior's latents alone
    latent_noise: float = 0.0
    # --- staged plans (stages.py): [{recipe, max_steps, per-stage overrides...}, ...], each stage shorter ---
    stages: list | None = None


# (low, high, low inclusive, high inclusive) per numeric key; None: unbounded. Keys grouped by their range.
