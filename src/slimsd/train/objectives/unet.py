"""What the U-Net objectives (kd, lcm, lcm-lora, progressive, finetune) share: a frozen teacher pipeline and a
compressed student U-Net, a micro-batch as noisy latents with their conditions, the guided teacher, and final/
as a plain diffusers pipeline folder with slimsd.json provenance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from slimsd.train.objectives.base import Models, Objective, Run, write_provenance


@dataclass
class Inputs:
    """One micro-batch on this process, as the U-Net objectives train on it."""

    latents: torch.Tensor  # VAE latents (scaled), fp32
    noise: torch.Tensor
    timesteps: torch.Tensor  # indices below the objective's count (kd: training timesteps)
    cond: dict[str, torch.Tensor]  # prompt_embeds (+ pooled_prompt_embeds), in the compute dtype
    extra: dict  # SDXL: {"added_cond_kwargs": {...}}; else {}
    w: torch.Tensor | None  # the teacher's guidance w = scale - 1 per sample (guided objectives)
    rows: torch.Tensor  # this process's rows of the global micro-batch


def cast(extra: dict, dtype: torch.dtype) -> dict:
    """SDXL's added conditions in DTYPE (empty for SD 1.x/2.x)."""
    return (
        {"added_cond_kwargs": {k: v.to(dtype) for k, v in extra["added_cond_kwargs"].items()}}
        if extra
        else {}
    )


def init_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def freeze(pipe, student) -> list:
    """The pipeline's networks (U-Net, VAE, text encoder(s)) frozen: eval, no gradients; the student excepted
    (finetune: the model's own U-Net is the one trained)."""
    from slimsd.models.loading import is_sdxl

    parts = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl(pipe) else [])
    frozen = [m for m in parts if m is not student]
    for m in frozen:
        m.requires_grad_(False).eval()
    return frozen


class UNetObjective(Objective):
    """A student U-Net trained on noisy latents of the data; subclasses say how a micro-batch becomes terms."""

    guided: ClassVar[bool] = False  # the teacher guided by a w drawn per sample (needs the empty caption)

    def adapt(self, student: torch.nn.Module) -> torch.nn.Module:
        """The compressed student as this objective trains it (a guidance input, adapters...)."""
        return student.requires_grad_(True)

    def load(self, device, weight_dtype: torch.dtype) -> Models:
        """The teacher pipeline (frozen, in the compute dtype) and the student U-Net (fp32): from a
        `slimsd compress` folder, or compressed here by a recipe."""
        from slimsd.models.architecture import load_recipe, parse_recipe, plan
        from slimsd.models.compress import compress_pipeline
        from slimsd.models.loading import load
        from slimsd.models.single_file import is_single_file
        from slimsd.models.sources import resolve_model
        from slimsd.train.losses import default_taps, parse_taps

        cfg = self.cfg
        student_is_folder = Path(cfg.student).is_dir() or is_single_file(cfg.student)
        if not student_is_folder:
            recipe_obj = load_recipe(cfg.student)  # a bad recipe fails before the teacher is loaded
        # No fast runtime in training: the taps, the weight map and exact resumption need the modules as they are.
        teacher_pipe = load(
            cfg.teacher, device=device, dtype=weight_dtype, optimize=False, allow_pickle=cfg.allow_pickle
        )
        if student_is_folder:
            ref = resolve_model(cfg.student)  # read once: the loader and the provenance take it
            student = load(
                ref, device="cpu", dtype="fp32", optimize=False, allow_pickle=cfg.allow_pickle
            ).unet
            info = ref.info or {}
            recipe_obj = parse_recipe(info["recipe"]) if info.get("recipe") else None
            weight_map, source = info.get("weight_map"), cfg.student
        else:
            result = compress_pipeline(teacher_pipe, recipe_obj)
            student, weight_map, source = result.pipeline.unet, result.weight_map, None
        student = self.adapt(student.float())
        s_cfg = dict(student.config)
        t_cfg = {k: v for k, v in dict(teacher_pipe.unet.config).items() if not k.startswith("_")}
        if cfg.feature_taps is not None:
            taps = parse_taps(cfg.feature_taps)
        elif recipe_obj is not None and "feature_taps" in recipe_obj.extra:
            taps = parse_taps(recipe_obj.extra["feature_taps"])
        else:
            taps = default_taps(s_cfg, t_cfg, plan(t_cfg, recipe_obj)[1] if recipe_obj is not None else None)
        recipe = recipe_obj.to_dict() if recipe_obj else None
        frozen = freeze(teacher_pipe, student)
        return Models(teacher_pipe, student, frozen, recipe, weight_map, taps, source)

    def prepare(self, run: Run) -> None:
        """The noise schedule of the teacher, and the empty caption's embeddings (caption dropout, guidance)."""
        from diffusers import DDPMScheduler

        from slimsd.models.loading import is_sdxl
        from slimsd.train.encoders import encode_text

        tp = run.models.pipe
        self.sdxl = is_sdxl(tp)
        self.noise_scheduler = DDPMScheduler.from_config(tp.scheduler.config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(run.device)
        self.empty = None
        if self.cfg.caption_dropout or self.guided:
            self.empty = {k: v.to(run.device, run.weight_dtype) for k, v in encode_text(tp, [""]).items()}
        if self.guided and self.sdxl and tp.config.get("force_zeros_for_empty_prompt", True):
            self.empty = {k: torch.zeros_like(v) for k, v in self.empty.items()}  # SDXL's "no prompt"

    def inputs(self, run: Run, batch: dict, high: int) -> Inputs:
        """The micro-batch's latents, noise, timesteps in [0, HIGH), conditions (with caption dropout) and,
        for a guided objective, w. The draws are made for the whole global micro-batch, identical on every
        process, and each process takes its rows: P processes compute what one process with P x the batch does."""
        from slimsd.train.encoders import encode_images, encode_text, time_ids

        cfg, device, gen, tp = self.cfg, run.device, run.gen, run.models.pipe
        rows = run.accelerator.process_index * cfg.batch_size + batch["slot"]
        if run.cached:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            keys = ("prompt_embeds", "pooled_prompt_embeds")
            cond = {k: batch[k].to(device, run.weight_dtype) for k in keys if k in batch}
        else:
            with torch.no_grad():
                mean, std = encode_images(tp.vae, batch["pixels"].to(device))
                cond = encode_text(tp, batch["caption"])
        n = run.global_batch
        shape = (n, *mean.shape[1:])
        timesteps = torch.randint(0, high, (n,), generator=gen)[rows]
        noise = torch.randn(shape, generator=gen)[rows].to(device)
        sample_eps = torch.randn(shape, generator=gen)[rows].to(device)
        drop = (torch.rand(n, generator=gen)[rows] < cfg.caption_dropout).to(device)
        timesteps = timesteps.to(device)
        w = None
        if self.guided:  # the teacher's guidance w = scale − 1, one per sample
            span = cfg.guidance_max - cfg.guidance_min
            w = (cfg.guidance_min - 1 + span * torch.rand(n, generator=gen))[rows].to(device)
        latents = (mean.float() + std.float() * sample_eps) * tp.vae.config.scaling_factor
        if self.empty is not None and drop.any():
            cond = {
                k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), self.empty[k].expand_as(v), v)
                for k, v in cond.items()
            }
        extra = {}
        if self.sdxl:
            if run.cached:
                ids = batch["time_ids"]
            else:
                ids = time_ids(batch["original_size"], batch["crop_top_left"], run.resolution)
            extra = {
                "added_cond_kwargs": {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": ids.to(device)}
            }
        return Inputs(latents, noise, timesteps, cond, extra, w, rows)

    def predict(self, net, noisy, t, cond, extra, w_emb=None) -> torch.Tensor:
        """A trained (fp32) U-Net's output: the student, or a target network of it."""
        kwargs = {"timestep_cond": w_emb} if w_emb is not None else {}
        return net(noisy, t, cond["prompt_embeds"].float(), **kwargs, **cast(extra, torch.float32)).sample

    def guided_teacher(self, run: Run, noisy, t, cond, extra, w) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) of the teacher guided by w: with and without the caption in one batch, ε_c + w·(ε_c − ε_u)."""
        from slimsd.train import consistency as C

        dtype, tp = run.weight_dtype, run.models.pipe
        n, kind = noisy.shape[0], self.noise_scheduler.config.prediction_type
        both = {k: torch.cat([v, self.empty[k].expand_as(v)]).to(dtype) for k, v in cond.items()}
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
            torch.cat([noisy, noisy]).to(dtype),
            torch.cat([t, t]),
            both["prompt_embeds"],
            **cast(extra2, dtype),
        ).sample
        x0_c, eps_c = C.predicted_x0_eps(out[:n], t, noisy, self.alphas_cumprod, kind)
        x0_u, eps_u = C.predicted_x0_eps(out[n:], t, noisy, self.alphas_cumprod, kind)
        wv = w.view(-1, 1, 1, 1)
        return x0_c + wv * (x0_c - x0_u), eps_c + wv * (eps_c - eps_u)

    def architecture(self, student, models: Models) -> str:
        from slimsd.train.checkpoints import architecture

        return architecture(student, models.recipe["name"] if models.recipe else self.cfg.student)

    # --- validation images -----------------------------------------------------------------------------

    def validation(self, run: Run, step: int, log_with) -> None:
        """The validation grid of STEP: the fixed prompts from the current student, same seeds every time. A
        sharded student runs its forward on every process (collectives); the main one writes the grid (and logs
        it to TensorBoard)."""
        import io

        from slimsd.atomic import atomic_write_bytes
        from slimsd.images import make_grid

        cfg, accelerator, tp = self.cfg, run.accelerator, run.models.pipe
        if accelerator.is_main_process or run.engine in ("fsdp", "deepspeed"):
            student = accelerator.unwrap_model(run.student)
            pipe = type(tp)(**(dict(tp.components) | {"unet": student}))
            pipe.set_progress_bar_config(disable=True)
            was_training = student.training
            student.eval()
            images = []
            for i, prompt in enumerate(cfg.validation_prompts):
                g = torch.Generator().manual_seed(cfg.seed + i)
                size = {"height": run.resolution, "width": run.resolution}
                with (
                    torch.no_grad(),
                    accelerator.autocast(),
                ):  # fp32 student, frozen parts in the compute dtype
                    images.append(
                        pipe(prompt, num_inference_steps=cfg.validation_steps, generator=g, **size).images[0]
                    )
            student.train(was_training)
            grid = make_grid(images, cols=len(images))
            if accelerator.is_main_process:
                buf = io.BytesIO()
                grid.save(buf, format="PNG")
                atomic_write_bytes(run.output_dir / "validation" / f"step-{step:08d}.png", buf.getvalue())
                if log_with:
                    import numpy as np

                    writer = accelerator.get_tracker("tensorboard").writer
                    writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        accelerator.wait_for_everyone()

    # --- final/ --------------------------------------------------------------------------------------------

    def final_unet_state(self, weights: dict) -> dict:
        """The U-Net weights final/unet holds."""
        return weights

    def final_scheduler(self, teacher_config: dict):
        """final/'s scheduler when the result samples otherwise than its teacher (None: the teacher's)."""
        return None

    def write_extra(self, run: Run, folder: Path, pipe_cls, weights: dict) -> None:
        """Files final/ holds beside the pipeline."""

    def save_final(self, run: Run, weights: dict, state: dict) -> Path:
        """The trained student as a plain diffusers pipeline folder (fp32), with slimsd.json provenance."""
        from diffusers import UNet2DConditionModel

        from slimsd.atomic import atomic_dir
        from slimsd.models.loading import load
        from slimsd.models.sources import quiet_libraries

        cfg, models = self.cfg, run.models
        unet = UNet2DConditionModel.from_config(models.student.config)
        unet.load_state_dict({k: v.float() for k, v in self.final_unet_state(weights).items()})
        if run.weight_dtype == torch.float32:
            base = models.pipe
        else:  # the frozen parts were cast to the compute dtype for training: save fp32 copies
            source = models.student_source or cfg.teacher
            base = load(source, device="cpu", dtype="fp32", optimize=False, allow_pickle=cfg.allow_pickle)
        components = dict(base.components) | {"unet": unet}
        scheduler = self.final_scheduler(base.scheduler.config)
        if scheduler is not None:  # a few-step student samples with its own scheduler, in plain diffusers too
            components["scheduler"] = scheduler
        for part in components.values():
            # A fast tokenizer keeps the padding and truncation of its last call in its backend, and saves them:
            # clear them, so that final/ is the same whether this process encoded captions or not (a cached run,
            # or a run resumed at its last step); the pipelines set both on every call anyway.
            backend = getattr(part, "backend_tokenizer", None)
            if backend is not None:
                backend.no_truncation()
                backend.no_padding()
        if "requires_safety_checker" in init_params(type(base)):
            pipe = type(base)(**components, requires_safety_checker=False)
        else:
            pipe = type(base)(**components)
        out = Path(cfg.output_dir) / "final"
        # quiet: transformers' "Writing model shards" bar and the libraries' notes stay off the user's terminal
        with atomic_dir(out, overwrite=True) as tmp, quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)
            self.write_extra(run, tmp, type(base), weights)
            fields = {
                "teacher": cfg.teacher,
                "recipe": models.recipe,
                "weight_map": models.weight_map,
                "distill": asdict(cfg),
                "feature_taps": models.taps,
            }
            sampling = self.sampling()
            write_provenance(tmp, state, fields, {"sampling": sampling} if sampling else None)
        return out
