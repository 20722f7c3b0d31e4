"""objective progressive: guided progressive distillation (Meng et al. 2023; Salimans & Ho 2022; the maths in
train/progressive.py). Rounds halve the DDIM steps of a student that takes the guidance w as an input: round 0
learns the guided teacher's x̂₀ at the first count's timesteps; round r learns in one step of its schedule two
DDIM steps of the round's teacher, the student as the round before ended.

Averages: the round teacher (checkpointed as ``target``), copied from the student when a round ends; no EMA (an
average over rounds mixes step counts). final/: the student as a pipeline with DDIM on trailing timesteps."""

from __future__ import annotations

import copy
import itertools

import torch

from slimsd.errors import SlimsdError
from slimsd.train import consistency as C
from slimsd.train import progressive as P
from slimsd.train.objectives.base import Run
from slimsd.train.objectives.lcm import check_sample_guidance
from slimsd.train.objectives.unet import UNetObjective, init_params


def check_rounds(cfg) -> None:
    """A schedule that halves at each round, and max_steps that splits into its rounds."""
    counts, rounds = cfg.progressive_steps, len(cfg.progressive_steps)
    if not counts or any(n < 1 for n in counts):
        raise SlimsdError(
            f"config key 'progressive_steps': {counts} is not allowed; allowed: DDIM step counts >= 1, "
            "e.g. [32, 16, 8, 4]"
        )
    for a, b in itertools.pairwise(counts):
        if a != 2 * b:
            raise SlimsdError(
                f"config key 'progressive_steps': {counts} does not halve at each round ({a} -> {b}); "
                "allowed: each count half the one before, e.g. [32, 16, 8, 4]"
            )
    if cfg.ema:
        raise SlimsdError(
            "config key 'ema': true is not allowed with objective progressive: each round's student starts "
            "from the last one and learns other steps, so an average over rounds mixes step counts"
        )
    per_round = cfg.steps_per_round
    if per_round is None and cfg.max_steps % rounds:
        raise SlimsdError(
            f"config key 'max_steps': {cfg.max_steps} does not split into the {rounds} rounds of "
            f"progressive_steps {counts}; allowed: a multiple of {rounds}, or set steps_per_round"
        )
    if per_round is not None and cfg.max_steps != rounds * per_round:
        raise SlimsdError(
            f"config key 'max_steps': {cfg.max_steps} is not {rounds} rounds (progressive_steps {counts}) x "
            f"steps_per_round {per_round}; allowed: max_steps={rounds * per_round}"
        )


def round_length(cfg) -> int:
    """Optimizer steps per progressive round."""
    return cfg.steps_per_round or cfg.max_steps // len(cfg.progressive_steps)


class Progressive(UNetObjective):
    name = "progressive"
    guided = True

    @staticmethod
    def check(cfg) -> None:
        check_sample_guidance(cfg)
        check_rounds(cfg)

    def adapt(self, student):
        return C.with_guidance_embedding(student, self.cfg.cond_proj_dim).requires_grad_(True)

    def prepare(self, run: Run) -> None:
        """Each round's DDIM schedule, ᾱ with the clean end, the round teacher."""
        super().prepare(run)
        cfg, T = self.cfg, self.num_train_timesteps
        if T % cfg.progressive_steps[-1] or cfg.progressive_steps[0] > T:
            raise SlimsdError(
                f"config key 'progressive_steps': {cfg.progressive_steps} does not fit a teacher with "
                f"{T} timesteps; allowed: counts up to {T}, the last one a "
                f"divisor of {T} (DDIM then samples the timesteps it was trained on)"
            )
        self.grids = [P.schedule(T, n).to(run.device) for n in cfg.progressive_steps]
        self.alphas_end = P.alphas_with_end(self.alphas_cumprod)
        self.per_round = round_length(cfg)
        self.emb_dim = run.models.student.config.time_cond_proj_dim
        self.target_unet = copy.deepcopy(run.models.student).requires_grad_(False)

    def averages(self, student) -> dict[str, dict | None]:
        return super().averages(student) | {"target": self.target_unet.state_dict()}

    def loss(self, run: Run, batch: dict, step: int) -> dict[str, torch.Tensor]:
        cfg, kind = self.cfg, self.noise_scheduler.config.prediction_type
        rnd = step // self.per_round
        x = self.inputs(run, batch, cfg.progressive_steps[rnd])
        grid, alphas = self.grids[rnd], self.alphas_end
        t = grid[x.timesteps]
        noisy = self.noise_scheduler.add_noise(x.latents, x.noise, t)
        w_emb = C.guidance_embedding(x.w, self.emb_dim).to(run.device)
        with torch.no_grad():
            if rnd == 0:
                target = self.guided_teacher(run, noisy, t, x.cond, x.extra, x.w)[0]
            else:
                s, mid = (
                    grid[x.timesteps + 1],
                    self.grids[rnd - 1][2 * x.timesteps + 1],
                )  # t = 2N-schedule[2i]

                def round_teacher(z, at):
                    return self.predict(self.target_unet, z, at, x.cond, x.extra, w_emb)

                z2 = P.two_ddim_steps(round_teacher, noisy, t, mid, s, alphas, kind)
                target = P.one_step_target(noisy, z2, t, s, alphas)
        pred = self.predict(run.student, noisy, t, x.cond, x.extra, w_emb)
        x0 = C.predicted_x0_eps(pred, t, noisy, alphas, kind)[0]
        loss = P.x0_loss(x0, target, t, alphas)
        return {"loss": loss, "progressive": loss}

    def after_step(self, run: Run, step: int, online: dict | None) -> None:
        if step % self.per_round == 0:  # a round ends: its student teaches the next one
            with torch.no_grad():
                target = self.target_unet.state_dict()
                for k, v in online.items():
                    target[k].copy_(v)
        super().after_step(run, step, online)

    def record(self, step: int) -> dict:
        return {"round": (step - 1) // self.per_round}

    def final_scheduler(self, teacher_config: dict):
        """DDIM with trailing spacing that ends at ᾱ = 1, i.e. on the timesteps the last round trained;
        clip_sample off: DDIM's default clips x̂₀ to [-1, 1], which suits pixels, not latents."""
        from diffusers import DDIMScheduler

        own = init_params(DDIMScheduler)  # the teacher's scheduler may have options this one has not
        return DDIMScheduler.from_config(
            {k: v for k, v in teacher_config.items() if k in own},
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            clip_sample=False,
        )

    def sampling(self) -> dict:
        cfg = self.cfg
        return {
            "kind": self.name,
            "scheduler": "ddim",
            "steps": cfg.progressive_steps[-1],
            "guidance": cfg.sample_guidance or cfg.guidance_min,
            "guidance_range": [cfg.guidance_min, cfg.guidance_max],
            "progressive_steps": cfg.progressive_steps,
        }
