"""Schedulers by name: the diffusers class, its options, and the name AUTOMATIC1111 gives the sampler."""

from __future__ import annotations

import copy

from slimsd.errors import unknown

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


def check_scheduler(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise unknown("scheduler", name, SCHEDULERS)


def sampler_name(name: str) -> str:
    """A1111's sampler name for one of ours (other names as they are)."""
    return SCHEDULERS[name][2] if name in SCHEDULERS else name


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
    """Replace the pipeline's scheduler by NAME, built from the model's own noise schedule (betas, timesteps).

    Every named scheduler is built from the scheduler config the model was loaded with (kept by
    :func:`slimsd.load`), so switching back and forth never carries one scheduler's options (e.g. Karras
    sigmas) into another. A loaded model keeps each one it has built (built once: diffusers' ``from_config``
    inspects signatures, milliseconds per image) and gets a fresh copy of it per call.
    """
    info = getattr(pipe, "_slimsd", None)
    if info is None:
        pipe.scheduler = build_scheduler(dict(pipe.scheduler.config), name)
        return
    built = pipe.__dict__.setdefault("_slimsd_schedulers", {})
    base = info["base_scheduler"]
    if name not in built or built[name][0] is not base:
        built[name] = (base, build_scheduler(base, name))
    pipe.scheduler = copy.deepcopy(built[name][1])


def build_scheduler(base: dict, name: str):
    """Scheduler NAME from the scheduler config BASE (a model's own noise schedule)."""
    import diffusers

    check_scheduler(name)
    cls_name, overrides, _ = SCHEDULERS[name]
    base = {k: v for k, v in base.items() if k != "use_karras_sigmas"}
    # DDIM's class default clips x̂₀ to [-1, 1], which suits pixels, not latents: a latent model whose config never
    # says (the toy teacher's PNDM config) sampled to noise with it
    base.setdefault("clip_sample", False)
    return getattr(diffusers, cls_name).from_config(base, **overrides)
