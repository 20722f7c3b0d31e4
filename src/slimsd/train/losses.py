"""The distillation objective: task loss + output-KD + feature-KD, and the feature taps that feed it.

BK-SDM (Kim et al., 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", eq. 1-3):

    L = λ_task · ||ε − ε_S(z_t, y, t)||²                       (task: the plain denoising loss)
      + λ_out  · ||ε_T(z_t, y, t) − ε_S(z_t, y, t)||²          (output-KD)
      + λ_feat · Σ_l ||f_T^l(z_t, y, t) − f_S^l(z_t, y, t)||²   (feature-KD over the tapped blocks)

each ||·||² a mean over elements. The target ε becomes the velocity v when the scheduler predicts v.

Taps are pairs (student module path, teacher module path). Hooks are registered on the *module objects*, found
on the unwrapped U-Nets once, before any DDP/FSDP wrapping or torch.compile: the hooks then fire whatever
wraps the model, and no code keys on wrapped names such as ``module.up_blocks.0`` (the crash of BK-SDM#10 and
distill-sd#10).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from slimsd.errors import SlimsdError

FEAT_NORMS = ("none", "teacher")


def default_taps(student_config: dict, teacher_config: dict, plan=None) -> list[tuple[str, str]]:
    """BK-SDM's taps: the output of every student stage (down blocks, mid when both keep one, up blocks),
    paired with the teacher stage it came from. With a plan (``slimsd.models.architecture.plan``) the pairing
    follows the recipe, which gives BK-SDM-Tiny's shifted mapping (student up i <- teacher up i+1)."""
    n_s = len(student_config["down_block_types"])
    n_t = len(teacher_config["down_block_types"])
    down = plan.down_stages if plan is not None else list(range(n_s))
    up = plan.up_stages if plan is not None else list(range(n_t - n_s, n_t))
    taps = [(f"down_blocks.{i}", f"down_blocks.{down[i]}") for i in range(n_s)]
    if n_s < n_t:
        # The student's last down stage lost the downsampler it had in the teacher (BK-SDM-Tiny): compare the
        # stage's last layer (attention if it has one, else residual), before any down-sampling.
        i, ti = n_s - 1, down[-1]
        attn = student_config["down_block_types"][i].startswith("CrossAttn")
        part = "attentions" if attn else "resnets"
        s_last = _per_stage(student_config["layers_per_block"], n_s)[i] - 1
        t_last = _per_stage(teacher_config["layers_per_block"], n_t)[ti] - 1
        taps[i] = (f"down_blocks.{i}.{part}.{s_last}", f"down_blocks.{ti}.{part}.{t_last}")
    s_mid, t_mid = (
        student_config.get("mid_block_type"),
        teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
    )
    if s_mid and t_mid and s_mid == t_mid:
        taps.append(("mid_block", "mid_block"))
    taps += [(f"up_blocks.{i}", f"up_blocks.{up[i]}") for i in range(n_s)]
    return taps


def _per_stage(value, n: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def parse_taps(raw) -> list[tuple[str, str]]:
    """``feature_taps`` from a recipe or config: a list of [student, teacher] pairs, or of one name for both."""
    if not isinstance(raw, list):
        raise SlimsdError(
            f"feature_taps must be a list of [student_module, teacher_module] pairs, got {raw!r}"
        )
    taps = []
    for item in raw:
        if isinstance(item, str):
            taps.append((item, item))
        elif isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(s, str) for s in item):
            taps.append((item[0], item[1]))
        else:
            raise SlimsdError(
                f"feature_taps entry {item!r}: expected 'module' or [student_module, teacher_module]"
            )
    return taps


def _feature(output) -> torch.Tensor:
    """The hidden states a block returns: a tensor, the first item of a tuple (down blocks return
    (hidden, skips)), or ``.sample`` of a diffusers output object."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        return _feature(output[0])
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"cannot take a feature from a {type(output).__name__}")


@dataclass
class Taps:
    """Forward hooks on one model's tapped modules; ``features`` holds the last forward's outputs by tap name."""

    names: list[str]
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    handles: list = field(default_factory=list)

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach_taps(model: torch.nn.Module, names: list[str]) -> Taps:
    """Hook ``names`` (module paths in the *unwrapped* model) and record their outputs on every forward."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = sorted({n.split(".")[0] for n in modules if n})
        raise SlimsdError(
            f"feature tap {missing[0]!r} is not a module of the model; top-level modules: {top}"
        )
    taps = Taps(list(names))

    def hook_for(name: str):
        def hook(_module, _inputs, output):
            taps.features[name] = _feature(output)

        return hook

    for name in names:
        taps.handles.append(modules[name].register_forward_hook(hook_for(name)))
    return taps


@contextmanager
def tapped(model: torch.nn.Module, names: list[str]) -> Iterator[Taps]:
    """``attach_taps`` for the duration of a ``with`` block."""
    taps = attach_taps(model, names)
    try:
        yield taps
    finally:
        taps.remove()


def task_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the U-Net should predict: ε, or v = α_t·ε − σ_t·x₀ (Salimans & Ho, 2022) for v-prediction."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise SlimsdError(f"unsupported prediction_type {kind!r}; allowed: epsilon, v_prediction")


def feature_term(student: torch.Tensor, teacher: torch.Tensor, norm: str = "none") -> torch.Tensor:
    """One tap's feature-KD: MSE in fp32; with ``norm='teacher'`` divided by the teacher feature's mean square
    (detached), so that a tap with large activations cannot swamp the others (BK-SDM#21)."""
    s, t = student.float(), teacher.detach().float()
    if s.shape != t.shape:
        raise SlimsdError(f"feature tap shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    mse = F.mse_loss(s, t)
    if norm == "teacher":
        return mse / t.pow(2).mean().clamp_min(1e-8)
    return mse


def distill_loss(
    student_pred: torch.Tensor,
    target: torch.Tensor,
    teacher_pred: torch.Tensor | None,
    student_feats: dict[str, torch.Tensor],
    teacher_feats: dict[str, torch.Tensor],
    taps: list[tuple[str, str]],
    lambda_task: float = 1.0,
    lambda_out: float = 1.0,
    lambda_feat: float = 1.0,
    feat_norm: str = "none",
) -> dict[str, torch.Tensor]:
    """The weighted total and each term on its own: {"loss", "task", "out", "feat", "feat/<student tap>"}.

    Terms whose weight is 0 are still reported when they can be computed (for logging), but add nothing.
    Feature-KD sums over taps, as BK-SDM does.
    """
    pred = student_pred.float()
    zero = pred.new_zeros(())
    terms: dict[str, torch.Tensor] = {"task": F.mse_loss(pred, target.float())}
    terms["out"] = F.mse_loss(pred, teacher_pred.detach().float()) if teacher_pred is not None else zero
    feat = zero
    for s_name, t_name in taps:
        if s_name in student_feats and t_name in teacher_feats:
            term = feature_term(student_feats[s_name], teacher_feats[t_name], feat_norm)
            terms[f"feat/{s_name}"] = term
            feat = feat + term
    terms["feat"] = feat
    loss = lambda_task * terms["task"]
    if lambda_out:
        loss = loss + lambda_out * terms["out"]
    if lambda_feat:
        loss = loss + lambda_feat * terms["feat"]
    terms["loss"] = loss
    return terms


def finetune_loss(
    pred: torch.Tensor, target: torch.Tensor, instances: int, prior_weight: float = 1.0
) -> dict[str, torch.Tensor]:
    """objective=finetune: the task loss of the first ``instances`` rows (the training data), plus, when the
    batch holds more rows (DreamBooth's class images, Ruiz et al. 2023), ``prior_weight`` times theirs.

        L = ||ε − ε_θ||²(instance rows) + w_prior · ||ε − ε_θ||²(class rows)
    """
    pred, target = pred.float(), target.float()
    task = F.mse_loss(pred[:instances], target[:instances])
    terms = {"loss": task, "task": task}
    if pred.shape[0] > instances:
        terms["prior"] = F.mse_loss(pred[instances:], target[instances:])
        terms["loss"] = task + prior_weight * terms["prior"]
    return terms
