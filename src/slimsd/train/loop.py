"""The training loop, top to bottom, for every objective (objectives/): it knows nothing of which one runs.

    data → micro-batch → objective.loss → backward → optimizer → objective.after_step (averages) → log →
    checkpoint → validation → objective.save_final

One ``train_run(cfg)`` that runs unchanged on one CPU, one GPU or many under ``accelerate launch``:

- the student is trainable and stays fp32 (mixed precision autocasts its forward; the loss scaler then
  unscales fp32 gradients, so there is no "Attempting to unscale FP16 gradients" error); the frozen parts are in
  the compute dtype, under ``torch.no_grad``;
- the data order, the noise, the timesteps and the VAE samples are drawn from (seed, step) for the *global*
  batch, and each process takes its slice: P processes with batch B compute what one process with batch P·B
  computes, and a resumed run computes what an uninterrupted one does (checkpoints hold the student, the
  optimizer, the LR schedule, the averages, the generator state and the step);
- hooks on the student (feature taps) are attached by the objective before ``accelerator.prepare`` (robust to
  DDP/FSDP wrapping and torch.compile, see losses.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.train import data as D
from slimsd.train import sharding as S
from slimsd.train.checkpoints import apply_optimizer_settings, load_checkpoint, save_checkpoint
from slimsd.train.config import DistillConfig
from slimsd.train.objectives import OBJECTIVES
from slimsd.train.objectives.base import Run
from slimsd.train.runs import begin_run, plan_run


def train_run(cfg: DistillConfig, step_offset: int = 0, keep_process_group: bool = False) -> dict:
    """One run of ``cfg.objective`` (a validated config, no stages). Returns {"final_dir", "losses", ...}."""
    from accelerate.utils import set_seed

    from slimsd.devices import DTYPES, MIXED_PRECISION

    output_dir = Path(cfg.output_dir)
    # 0. The output folder (one run per folder; a resume with a changed config is checked; runs.py), read only.
    folder = plan_run(cfg)
    accelerator, engine, log_with = start_accelerator(cfg, folder)
    if folder.finished:
        accelerator.print(
            f"{output_dir} already finished: step {folder.step} of {cfg.max_steps}; the student is in "
            f"{output_dir / 'final'}"
        )
        return {"final_dir": str(output_dir / "final"), "steps": folder.step, "already_finished": True}
    # Rows dropped when the data is indexed end the run here, before the folder is touched or a model loads.
    source = D.open_source(cfg.data, cfg.seed, cfg.data_filter)  # each rule's removals counted in skipped
    D.check_rows(source, cfg.data, cfg.batch_size * accelerator.num_processes)
    accelerator.wait_for_everyone()  # every process has read the folder before the main one writes it
    if accelerator.is_main_process:
        begin_run(folder, cfg)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    weight_dtype = DTYPES[MIXED_PRECISION[cfg.mixed_precision]]
    device = accelerator.device

    # 1. Models: what the objective trains (fp32) and trains with (frozen, in the compute dtype).
    objective = OBJECTIVES[cfg.objective](cfg)
    models = objective.load(device, weight_dtype)
    student = models.student.to(device)
    student.train()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(cfg.seed)  # noise, timesteps, VAE samples, caption dropout
    resolution, cached = objective.resolution(models), source.kind == "cache"
    run = Run(cfg, accelerator, engine, device, weight_dtype, models, resolution, output_dir, cached, gen)
    objective.prepare(run)  # taps, target networks, schedules, class images: before accelerate wraps

    # 2. Optimizer, LR schedule (stepped once per optimizer step, never per process), the averages it keeps.
    optimizer, lr_scheduler = make_optimizer(cfg, student)
    averages = objective.averages(student)
    # 3. Resume: weights, optimizer, schedule, averages, generator, step and data position.
    arch = objective.architecture(student, models)  # names the student when a checkpoint does not fit
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    # Prepared first: the checkpoint's whole weights and optimizer state are then put into each process's shard.
    student, optimizer = accelerator.prepare(student, optimizer)
    run.student = student
    S.cast_inputs(accelerator, engine, student)
    state, torch_rng = {"step": 0, "micro_batches": 0, "skipped": {}, "losses": []}, None
    if folder.checkpoint is not None:
        state, torch_rng = load_checkpoint(
            engine, folder.checkpoint, student, optimizer, lr_scheduler, averages, gen, arch, shapes
        )
        if folder.changes and cfg.allow_config_change:
            apply_optimizer_settings(optimizer, lr_scheduler, cfg)
        accelerator.print(f"resumed from {folder.checkpoint} at step {state['step']}")
    # What the next checkpoints record: this run's config, its history of changes, the student it trains.
    state |= {"config": asdict(cfg), "config_changes": folder.history, "architecture": arch}
    skipped = own_skipped(accelerator, state, source, resumed=folder.checkpoint is not None)

    # 4. Data: this process's slice of every global micro-batch, from the saved position on.
    unreadable = Unreadable(run, len(source))  # ends a run on mostly unreadable data (max_skipped_fraction)
    next_batch = batches(run, source, state, skipped, torch_rng, unreadable)
    if log_with and accelerator.is_main_process:
        config = {k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}
        accelerator.init_trackers("tensorboard", config=config)
    bar = progress_bar(cfg, accelerator, objective.label, state["step"])
    losses: list[dict] = state["losses"]
    images_seen, t0 = 0, time.perf_counter()

    # 5. The loop: one optimizer step per `gradient_accumulation_steps` micro-batches.
    end = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
    while state["step"] < end:
        step_terms = []
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next_batch()
            with accelerator.accumulate(student):
                terms = objective.loss(run, batch, state["step"])
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_terms.append({k: v.detach() for k, v in terms.items() if "/" not in k})
            images_seen += batch["size"] * accelerator.num_processes
        lr_scheduler.step()
        state["step"] += 1
        step = state["step"]
        # the whole weights (gathered under FSDP / ZeRO-3) only when an average needs them
        kept = any(v is not None for v in averages.values())
        objective.after_step(run, step, S.full_weights(accelerator, engine, student) if kept else None)
        unreadable.check(step)

        mean_terms = {k: torch.stack([t[k] for t in step_terms]).mean() for k in step_terms[0]}
        mean_terms = {
            k: accelerator.reduce(v.reshape(1), reduction="mean").item() for k, v in mean_terms.items()
        }
        record = {"step": step, **mean_terms, "lr": lr_scheduler.get_last_lr()[0], **objective.record(step)}
        losses.append(record)
        rate = images_seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(**{k: f"{v:.4f}" for k, v in mean_terms.items()}, img_s=f"{rate:.1f}")
        bar.update(1)
        if log_with and (step % cfg.log_every == 0 or step == cfg.max_steps):
            logged = {f"train/{k}": v for k, v in record.items() if k != "step"}
            accelerator.log(logged | {"train/images_per_s": rate}, step=step)

        if (cfg.checkpoint_every and (step + step_offset) % cfg.checkpoint_every == 0) or step == end:
            state |= skipped_totals(accelerator, skipped)  # (a collective: every process is here)
            opt = (optimizer, lr_scheduler)
            save_checkpoint(
                accelerator, engine, output_dir, step, student, *opt, averages, gen, state, cfg.keep_last
            )
        if cfg.validation_every and cfg.validation_prompts and step % cfg.validation_every == 0:
            objective.validation(run, step, log_with)
    bar.close()

    # 6. final/: what the objective leaves (the average it keeps for that, else the trained weights). A run
    # stopped early (stop_at_step) leaves only its checkpoint: resume=latest finishes it.
    finished = state["step"] >= cfg.max_steps
    state |= skipped_totals(accelerator, skipped)
    weights = objective.final_average()
    if weights is None and finished:  # gathered on every process (a collective under FSDP / ZeRO-3)
        weights = S.full_weights(accelerator, engine, student)
    if accelerator.is_main_process and finished:
        objective.save_final(run, weights, state)
    if state["skipped"]:
        accelerator.print(f"skipped rows: {D.describe_skipped(state['skipped'])}")
    accelerator.wait_for_everyone()
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()  # the trackers, and the process group
    objective.close()
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    _reset_accelerate_state(num_processes)
    return {
        "final_dir": str(output_dir / "final") if finished else None,
        "losses": losses,
        "skipped": state["skipped"],
        "steps": state["step"],
        "num_processes": num_processes,
        "process_index": process_index,
        "engine": engine,
        "taps": models.taps,
        "images_per_second": images_seen / max(time.perf_counter() - t0, 1e-9),
        "resumed_from": str(folder.checkpoint) if folder.checkpoint else None,
        "student_unet_params": sum(p.numel() for p in models.student.parameters()),
    }


# --- the pieces the loop calls --------------------------------------------------------------------------------


def start_accelerator(cfg: DistillConfig, folder) -> tuple:
    """(accelerator, engine, log_with): the processes' group and the engine (sharding.py), checked."""
    from accelerate import Accelerator

    from slimsd.devices import quiet_deepspeed

    quiet_deepspeed()
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
        project_dir=cfg.output_dir,
        **S.accelerator_kwargs(world_size),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise SlimsdError(
            f"launched as {world_size} processes but accelerate sees {accelerator.num_processes}: "
            "start them with `accelerate launch --multi_gpu --num_processes N` or torchrun"
        )
    engine = S.setup(accelerator, cfg.batch_size)  # single, ddp, fsdp or deepspeed (sharding.py)
    for line in folder.notes:
        accelerator.print(line)
    if cfg.tensorboard and not has_tensorboard and accelerator.is_main_process and not folder.finished:
        print(
            "slimsd: warning: the tensorboard package is not installed, so this run writes no TensorBoard "
            "logs (pip install tensorboard, or set tensorboard=false)",
            file=sys.stderr,
        )
    return accelerator, engine, log_with


def make_optimizer(cfg: DistillConfig, student) -> tuple:
    """AdamW (optionally 8-bit) over the trainable parameters, and its LR schedule."""
    from diffusers.optimization import get_scheduler

    params = [p for p in student.parameters() if p.requires_grad]
    kwargs = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.weight_decay,
        "eps": cfg.adam_epsilon,
    }
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(params, **kwargs)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    return optimizer, lr_scheduler


def own_skipped(accelerator, state: dict, source, resumed: bool) -> Counter:
    """This process's count of skipped rows by reason: the rows dropped at indexing once (on the main process:
    every process indexes the same), and on a resume this process's own count from the checkpoint."""
    if not resumed:
        return Counter(source.skipped) if accelerator.is_main_process else Counter()
    by_process = state.get("skipped_by_process")
    if by_process and len(by_process) == accelerator.num_processes:
        return Counter(by_process[accelerator.process_index])
    # an older checkpoint, or another number of processes: the run's total, kept on the main process
    return Counter(state["skipped"]) if accelerator.is_main_process else Counter()


def skipped_totals(accelerator, skipped: Counter) -> dict:
    """{"skipped": the run's count over all processes, "skipped_by_process": each process's own} (a collective:
    every process calls it). Each process reads its own rows, so the run's count is the sum."""
    from accelerate.utils import gather_object

    by_process = gather_object([dict(skipped)])
    total = sum((Counter(c) for c in by_process), Counter())
    return {"skipped": dict(sorted(total.items())), "skipped_by_process": by_process}


class Unreadable:
    """The distinct rows that failed to read, over all processes. When they are more than max_skipped_fraction
    of the data's rows the run ends with one line, on every process at the same step, instead of training to the
    end on what is left. Rows dropped at indexing (check_rows) are not counted: they are known before training."""

    def __init__(self, run: Run, rows: int):
        self.accelerator, self.cfg, self.rows = run.accelerator, run.cfg, rows
        self.own: set[int] = set()  # this process's failed rows
        self.known: set[int] = set()  # every process's, as of the last check

    def check(self, step: int) -> None:
        """After each optimizer step, on every process (a collective; the rows themselves only when new)."""
        from accelerate.utils import gather_object

        new = torch.tensor([len(self.own - self.known)], device=self.accelerator.device)
        if self.accelerator.reduce(new, reduction="sum").item() == 0:
            return
        for rows in gather_object([sorted(self.own)]):
            self.known.update(rows)
        limit = self.cfg.max_skipped_fraction
        if len(self.known) > limit * self.rows:
            raise SlimsdError(
                f"data {self.cfg.data!r}: {len(self.known)} of its {self.rows} rows could not be read by step "
                f"{step}, more than max_skipped_fraction {limit:g} allows; fix or remove them, or raise "
                "max_skipped_fraction (1: train on whatever reads)"
            )


def batches(run: Run, source, state: dict, skipped: Counter, torch_rng, unreadable: Unreadable):
    """``next_batch()``: this process's next micro-batch, from the position STATE saved. Unreadable rows are
    counted and replaced (data.Examples), so it is full unless no row of the data reads (ReadGuard ends that)."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.cached and source.info.get("resolution") != run.resolution:
        raise SlimsdError(
            f"latent cache {cfg.data!r} was made at {source.info.get('resolution')} px; this run "
            f"trains at {run.resolution} px (set resolution={source.info.get('resolution')})"
        )
    examples = D.Examples(source, run.resolution, cfg.center_crop, cfg.random_flip, cfg.seed)
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
    it = iter(loader)  # draws its base seed from the torch RNG
    if torch_rng is not None:  # restored after that draw: the uninterrupted run made it before its checkpoint
        torch.set_rng_state(torch_rng)
    guard = D.ReadGuard(cfg.data, source)

    def next_batch() -> dict:
        while True:
            batch = next(it)
            state["micro_batches"] += 1
            skipped.update(batch["skipped"])
            unreadable.own.update(batch["bad_index"])
            guard.check(batch, state["step"])  # ends a run whose data yields nothing
            if batch["size"]:
                return batch

    return next_batch


def progress_bar(cfg: DistillConfig, accelerator, label: str, initial: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=cfg.max_steps,
        initial=initial,
        # None: tqdm shows the bar only on a terminal (logs and pipes get the summary lines alone)
        disable=None if cfg.progress and accelerator.is_main_process else True,
        desc=label,
        dynamic_ncols=True,
    )


def _reset_accelerate_state(num_processes: int) -> None:
    """Let a later ``train()`` in the same (single) process pick another mixed precision or accumulation."""
    if num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
