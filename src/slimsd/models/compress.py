"""Teacher + recipe -> a student pipeline folder that plain diffusers loads.

The folder holds the student U-Net (its config.json describes it exactly) beside the teacher's VAE, text
encoder(s), tokenizer(s) and scheduler, all as safetensors, plus ``slimsd.json``: the teacher, the recipe and
the weight map, for the trainer and for anyone who wants to know where each tensor came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slimsd.atomic import atomic_dir, check_output_dir
from slimsd.errors import SlimsdError
from slimsd.models.architecture import Recipe, build_student
from slimsd.models.counting import count_params
from slimsd.models.loading import load, quiet_libraries
from slimsd.version import __version__

# How the student's U-Net starts: the teacher's weights copied by the recipe's map (BK-SDM), or fresh
# random weights of the same architecture (BK-SDM's ablation baseline; no tensor is inherited).
INITS = ("teacher", "random")


@dataclass
class CompressResult:
    path: Path | None
    recipe: Recipe
    weight_map: dict[str, str]
    teacher_unet_params: int
    student_unet_params: int
    pipeline: object  # the student pipeline, in memory
    init: str = "teacher"

    def summary(self) -> dict:
        return {
            "out": str(self.path) if self.path else None,
            "recipe": self.recipe.name,
            "init": self.init,
            "teacher_unet_params": self.teacher_unet_params,
            "student_unet_params": self.student_unet_params,
            "reduction": 1 - self.student_unet_params / self.teacher_unet_params,
            "tensors_inherited": len(self.weight_map),
        }


def compress_pipeline(teacher_pipe, recipe, init: str = "teacher", seed: int = 0) -> CompressResult:
    """Swap the teacher's U-Net for the student built by ``recipe`` (in memory; the teacher is not modified).

    ``init="random"``: the student keeps the architecture but starts from diffusers' default initialisation,
    seeded by ``seed`` (the global torch RNG is left as it was).
    """
    import copy
    import inspect

    import torch

    if init not in INITS:
        raise SlimsdError(f"init {init!r}: allowed {', '.join(INITS)}")
    student_unet, mapping, recipe = build_student(teacher_pipe.unet, recipe)
    if init == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            student_unet = type(student_unet).from_config(student_unet.config)  # fp32, as compress loads
        mapping = {}
    components = dict(teacher_pipe.components)
    components["unet"] = student_unet
    cls = type(teacher_pipe)
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        components["requires_safety_checker"] = teacher_pipe.config.get("requires_safety_checker", False)
    student_pipe = cls(**components)
    student_pipe.register_to_config(
        **{
            k: copy.deepcopy(v)
            for k, v in teacher_pipe.config.items()
            if not k.startswith("_") and k not in components
        }
    )
    return CompressResult(
        None, recipe, mapping, count_params(teacher_pipe.unet), count_params(student_unet), student_pipe, init
    )


def save_student(result: CompressResult, out: str | Path, teacher: str, overwrite: bool = False) -> Path:
    with atomic_dir(out, overwrite) as tmp, quiet_libraries():  # transformers' "Writing model shards" bar
        result.pipeline.save_pretrained(tmp, safe_serialization=True)
        info = {
            "slimsd_version": __version__,
            "teacher": teacher,
            "recipe": result.recipe.to_dict(),
            "teacher_unet_params": result.teacher_unet_params,
            "student_unet_params": result.student_unet_params,
            "init": result.init,
            "weight_map": result.weight_map,
        }
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    result.path = Path(out)
    return result.path


def compress(
    teacher: str,
    recipe,
    out: str | Path | None = None,
    *,
    random_weights: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    init: str = "teacher",
    seed: int = 0,
    prediction_type: str | None = None,
) -> CompressResult:
    """Build the student of ``teacher`` by ``recipe``; write it to ``out`` when given.

    ``teacher``: a preset name, a micro model, a local diffusers folder or a hub id.
    ``recipe``: ``bk-base``, ``bk-small``, ``bk-tiny``, ``ssd-1b``, ``vega``, ``identity``, a YAML path or a mapping.
    ``init``: ``teacher`` (copy the teacher's weights by the recipe's map) or ``random`` (seeded by ``seed``).
    """
    if init not in INITS:
        raise SlimsdError(f"--init {init!r}: allowed {', '.join(INITS)}")
    from slimsd.models.architecture import load_recipe

    if recipe != "identity":
        recipe = load_recipe(recipe)  # a bad recipe fails before the teacher is loaded
    if out is not None:
        check_output_dir(out, overwrite, marker="slimsd.json", command="compress")
    # Weight surgery needs the modules as diffusers builds them (no fused projections), in fp32 on the CPU.
    pipe = load(
        teacher,
        device="cpu",
        dtype="fp32",
        optimize=False,
        random_weights=random_weights,
        allow_pickle=allow_pickle,
        prediction_type=prediction_type,
    )
    result = compress_pipeline(pipe, recipe, init=init, seed=seed)
    if out is not None:
        save_student(result, out, teacher, overwrite)
    return result
