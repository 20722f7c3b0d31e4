"""Recipe -> student U-Net config, and the explicit teacher -> student weight map.

A recipe (``recipes/*.yaml`` or a user's file) says, per teacher stage, which residual(/attention) layers the
student keeps, how many transformer layers each kept attention keeps, and what becomes of the mid block:

    down:                 # one entry per teacher down stage, outermost first; "drop" removes the stage
      - keep: [0]         # teacher layer indices kept, in order
      - keep: [0, 1]
        transformers: [2, 2]          # per kept layer: transformer layers kept (default: all of the teacher's)
        transformer_sources: [[0, 5], [0, 1]]   # optional: which teacher transformer layers (default: the first)
        attention: false              # optional: drop the attentions of this stage altogether
    mid: keep | drop | resnet         # resnet: a single residual block (SSD-1B, Vega)
    up: [...]                         # one entry per teacher up stage, innermost first

The student config is a plain diffusers ``UNet2DConditionModel`` config that describes the student exactly, so
``UNet2DConditionModel.from_pretrained`` rebuilds it with no code of ours. Every student tensor is copied from
one named teacher tensor; the map is returned, printed by ``slimsd compress --show-map`` and saved beside the
checkpoint.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from slimsd.errors import SlimsdError, unknown
from slimsd.models.presets import RECIPES

RECIPE_DIR = Path(__file__).parent / "recipes"

# Config keys that hold one value per stage (in down order) when they are lists.
PER_STAGE_KEYS = (
    "block_out_channels",
    "attention_head_dim",
    "num_attention_heads",
    "only_cross_attention",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "layers_per_block",
)


@dataclass
class Stage:
    keep: list[int] | None  # None: the stage is dropped
    transformers: list[int] | None = None
    transformer_sources: list[list[int]] | None = None
    attention: bool = True


@dataclass
class Recipe:
    name: str
    down: list[Stage]
    up: list[Stage]
    mid: str = "keep"
    family: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)  # anything else (e.g. feature taps), kept for the trainer

    def to_dict(self) -> dict:
        def stage(s: Stage):
            if s.keep is None:
                return "drop"
            d: dict = {"keep": s.keep}
            if s.transformers is not None:
                d["transformers"] = s.transformers
            if s.transformer_sources is not None:
                d["transformer_sources"] = s.transformer_sources
            if not s.attention:
                d["attention"] = False
            return d

        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "down": [stage(s) for s in self.down],
            "mid": self.mid,
            "up": [stage(s) for s in self.up],
            **self.extra,
        }


def _int_list(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise SlimsdError(f"recipe {where}: expected a list of integers, got {value!r}")
    return value


def _parse_stage(raw, where: str) -> Stage:
    if raw == "drop" or raw is None:
        return Stage(keep=None)
    if not isinstance(raw, dict) or "keep" not in raw:
        raise SlimsdError(f"recipe {where}: expected 'drop' or a mapping with 'keep', got {raw!r}")
    allowed = {"keep", "transformers", "transformer_sources", "attention"}
    if set(raw) - allowed:
        raise SlimsdError(
            f"recipe {where}: unknown keys {sorted(set(raw) - allowed)}; allowed: {sorted(allowed)}"
        )
    keep = _int_list(raw["keep"], f"{where}.keep")
    if not keep or keep != sorted(set(keep)) or keep[0] < 0:
        raise SlimsdError(f"recipe {where}.keep: indices must be distinct, increasing and >= 0, got {keep}")
    transformers = raw.get("transformers")
    if transformers is not None:
        transformers = _int_list(transformers, f"{where}.transformers")
        if len(transformers) != len(keep):
            raise SlimsdError(
                f"recipe {where}.transformers: one count per kept layer ({len(keep)}), got {transformers}"
            )
    sources = raw.get("transformer_sources")
    if sources is not None:
        if not isinstance(sources, list) or len(sources) != len(keep):
            raise SlimsdError(f"recipe {where}.transformer_sources: one list per kept layer, got {sources!r}")
        sources = [_int_list(s, f"{where}.transformer_sources") for s in sources]
    return Stage(
        keep=keep,
        transformers=transformers,
        transformer_sources=sources,
        attention=bool(raw.get("attention", True)),
    )


def parse_recipe(data: dict, name: str | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise SlimsdError(f"recipe {name!r}: expected a mapping at the top level")
    for key in ("down", "up"):
        if not isinstance(data.get(key), list):
            raise SlimsdError(f"recipe {name!r}: '{key}' must be a list with one entry per teacher stage")
    mid = data.get("mid", "keep")
    if mid not in ("keep", "drop", "resnet"):
        raise SlimsdError(f"recipe {name!r}: mid must be one of keep, drop, resnet; got {mid!r}")
    known = {"name", "family", "description", "down", "up", "mid"}
    return Recipe(
        name=str(data.get("name") or name or "custom"),
        family=data.get("family"),
        description=str(data.get("description", "")),
        down=[_parse_stage(s, f"down[{i}]") for i, s in enumerate(data["down"])],
        up=[_parse_stage(s, f"up[{i}]") for i, s in enumerate(data["up"])],
        mid=mid,
        extra={k: v for k, v in data.items() if k not in known},
    )


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A recipe by name (``bk-base`` ...), by YAML path, or as a mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe)
    text = str(recipe)
    if text in RECIPES:
        return parse_recipe(yaml.safe_load((RECIPE_DIR / f"{text}.yaml").read_text()), text)
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise SlimsdError(f"recipe file {text!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SlimsdError(f"recipe file {text!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        return parse_recipe(data, path.stem)
    raise unknown("recipe", text, [*RECIPES, "identity", "<path to a recipe .yaml>"])


def identity_recipe(teacher: dict) -> Recipe:
    """Keep everything: the student is the teacher (a check on the whole compress path)."""
    n = len(teacher["down_block_types"])
    lpb = _expand(teacher["layers_per_block"], n)
    return Recipe(
        name="identity",
        down=[Stage(keep=list(range(lpb[i]))) for i in range(n)],
        up=[Stage(keep=list(range(lpb[n - 1 - j] + 1))) for j in range(n)],
        mid="keep",
    )


def _expand(value, n: int) -> list:
    """A per-stage (or per-layer) config value as a list of length n."""
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise SlimsdError(f"config value {value!r} does not have {n} entries")
        return list(value)
    return [value] * n


def _teacher_transformers(teacher: dict) -> tuple[list[list[int]], list[list[int]]]:
    """Transformer layers per layer, for each down stage and each up stage of the teacher."""
    n = len(teacher["down_block_types"])
    lpb = _expand(teacher["layers_per_block"], n)
    tl = _expand(teacher.get("transformer_layers_per_block", 1), n)
    down = [_expand(tl[i], lpb[i]) for i in range(n)]
    rev = teacher.get("reverse_transformer_layers_per_block")
    up_src = (
        list(rev)
        if rev is not None
        else [tl[n - 1 - j] if not isinstance(tl[n - 1 - j], list) else tl[n - 1 - j][0] for j in range(n)]
    )
    up = [_expand(up_src[j], lpb[n - 1 - j] + 1) for j in range(n)]
    return down, up


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


@dataclass
class Plan:
    """A recipe resolved against one teacher: which teacher stage/layer/transformer each student part comes from."""

    down_stages: list[int]  # student down stage -> teacher down stage
    up_stages: list[int]  # student up stage -> teacher up stage
    down: list[Stage]
    up: list[Stage]
    down_sources: list[list[list[int]]]  # [student stage][kept layer] -> teacher transformer indices
    up_sources: list[list[list[int]]]
    mid: str


def plan(teacher: dict, recipe: Recipe) -> tuple[dict, Plan]:
    """The student config for ``teacher`` under ``recipe``, and the plan that maps its parts to the teacher's."""
    n = len(teacher["down_block_types"])
    where = f"recipe {recipe.name!r}"
    if len(recipe.down) != n or len(recipe.up) != n:
        fam = f" (it is for {recipe.family} teachers)" if recipe.family else ""
        raise SlimsdError(
            f"{where} does not fit this teacher{fam}: it describes {len(recipe.down)} down / {len(recipe.up)} up "
            f"stages, the teacher has {n}"
        )
    kept_down = [i for i, s in enumerate(recipe.down) if s.keep is not None]
    kept_up = [j for j, s in enumerate(recipe.up) if s.keep is not None]
    k = len(kept_down)
    if k == 0 or kept_down != list(range(k)) or kept_up != list(range(n - k, n)):
        raise SlimsdError(
            f"{where}: only the innermost stages can be dropped, the same number in down and up "
            f"(down keeps {kept_down}, up keeps {kept_up})"
        )
    lpb = _expand(teacher["layers_per_block"], n)
    t_down_tl, t_up_tl = _teacher_transformers(teacher)

    def resolve(
        stage: Stage, t_layers: int, t_tl: list[int], attn: bool, label: str
    ) -> tuple[list[int], list]:
        if stage.keep[-1] >= t_layers:
            raise SlimsdError(
                f"{where} {label}: keeps layer {stage.keep[-1]} but the teacher has {t_layers} layers"
            )
        if not attn or not stage.attention:
            return [], [[] for _ in stage.keep]
        counts = stage.transformers or [t_tl[i] for i in stage.keep]
        sources = stage.transformer_sources or [list(range(c)) for c in counts]
        for layer, c, src in zip(stage.keep, counts, sources, strict=True):
            if len(src) != c or c < 1:
                raise SlimsdError(
                    f"{where} {label}: layer {layer} keeps {c} transformers but names sources {src}"
                )
            if max(src) >= t_tl[layer] or min(src) < 0 or len(set(src)) != len(src):
                raise SlimsdError(
                    f"{where} {label}: layer {layer} takes transformer layers {src}; the teacher has {t_tl[layer]}"
                )
        return counts, sources

    cfg = copy.deepcopy(teacher)
    for key in PER_STAGE_KEYS:
        if isinstance(teacher.get(key), list | tuple) and len(teacher[key]) == n:
            cfg[key] = [teacher[key][i] for i in kept_down]

    down_types, down_counts, down_sources, layers = [], [], [], []
    for i in kept_down:
        st = recipe.down[i]
        btype = teacher["down_block_types"][i]
        if not st.attention and _has_attention(btype):
            btype = btype.replace("CrossAttn", "")
        counts, sources = resolve(st, lpb[i], t_down_tl[i], _has_attention(btype), f"down[{i}]")
        down_types.append(btype)
        down_counts.append(counts or [t_down_tl[i][0]] * len(st.keep))
        down_sources.append(sources)
        layers.append(len(st.keep))

    up_types, up_counts, up_sources = [], [], []
    for s, j in enumerate(kept_up):
        st = recipe.up[j]
        mirror = k - 1 - s  # the student down stage whose skips this up stage consumes
        if len(st.keep) != layers[mirror] + 1:
            raise SlimsdError(
                f"{where} up[{j}]: keeps {len(st.keep)} layers; diffusers needs one more than its down stage "
                f"keeps ({layers[mirror]} + 1 = {layers[mirror] + 1})"
            )
        btype = teacher["up_block_types"][j]
        if not st.attention and _has_attention(btype):
            btype = btype.replace("CrossAttn", "")
        counts, sources = resolve(st, lpb[n - 1 - j] + 1, t_up_tl[j], _has_attention(btype), f"up[{j}]")
        up_types.append(btype)
        up_counts.append(counts or [t_up_tl[j][0]] * len(st.keep))
        up_sources.append(sources)

    cfg["down_block_types"] = down_types
    cfg["up_block_types"] = up_types
    cfg["layers_per_block"] = layers[0] if len(set(layers)) == 1 else layers
    cfg["mid_block_type"] = {
        "keep": teacher.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
        "drop": None,
        "resnet": "UNetMidBlock2D",
    }[recipe.mid]

    def compact(counts: list[int]):
        return counts[0] if len(set(counts)) == 1 else counts

    down_tl = [compact(c) for c in down_counts]
    up_tl = [compact(c) for c in up_counts]
    default_up = [down_tl[k - 1 - s] if not isinstance(down_tl[k - 1 - s], list) else None for s in range(k)]
    changed = down_tl != [compact(c) for c in (t_down_tl[i] for i in kept_down)] or up_tl != default_up
    if isinstance(teacher.get("transformer_layers_per_block"), list) or changed:
        cfg["transformer_layers_per_block"] = down_tl
        if up_tl != default_up or teacher.get("reverse_transformer_layers_per_block") is not None:
            cfg["reverse_transformer_layers_per_block"] = [
                _expand(c, len(recipe.up[j].keep)) for c, j in zip(up_tl, kept_up, strict=True)
            ]
    elif "transformer_layers_per_block" in cfg and not changed:
        cfg["transformer_layers_per_block"] = teacher["transformer_layers_per_block"]

    return cfg, Plan(
        down_stages=kept_down,
        up_stages=kept_up,
        down=[recipe.down[i] for i in kept_down],
        up=[recipe.up[j] for j in kept_up],
        down_sources=down_sources,
        up_sources=up_sources,
        mid=recipe.mid,
    )


def student_config(teacher: dict, recipe: Recipe) -> dict:
    return plan(teacher, recipe)[0]


_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$"
)
_TRANSFORMER_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.*)$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def map_key(key: str, p: Plan) -> str:
    """The teacher tensor a student tensor is copied from."""
    m = _BLOCK_RE.match(key)
    if m:
        blocks, si, part, li, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        down = blocks == "down_blocks"
        ti = (p.down_stages if down else p.up_stages)[si]
        if part in ("downsamplers", "upsamplers"):
            return f"{blocks}.{ti}.{part}.{li}.{rest}"
        stage = (p.down if down else p.up)[si]
        tl = stage.keep[li]
        t = _TRANSFORMER_RE.match(rest) if part == "attentions" else None
        if t:
            src = (p.down_sources if down else p.up_sources)[si][li][int(t.group(1))]
            rest = f"transformer_blocks.{src}.{t.group(2)}"
        return f"{blocks}.{ti}.{part}.{tl}.{rest}"
    return key  # conv_in, time and added-condition embeddings, mid block (kept or its first resnet), conv_out


def weight_map(student_keys, p: Plan) -> dict[str, str]:
    return {k: map_key(k, p) for k in student_keys}


def check_map(mapping: dict[str, str], student_shapes: dict, teacher_shapes: dict, recipe_name: str) -> None:
    for s, t in mapping.items():
        if t not in teacher_shapes:
            raise SlimsdError(
                f"recipe {recipe_name!r} does not fit this teacher: {s} would come from {t}, "
                "which the teacher does not have"
            )
        if tuple(student_shapes[s]) != tuple(teacher_shapes[t]):
            raise SlimsdError(
                f"recipe {recipe_name!r} does not fit this teacher: {s} {tuple(student_shapes[s])} cannot be "
                f"copied from {t} {tuple(teacher_shapes[t])}"
            )


def build_student(teacher_unet, recipe: str | Path | dict | Recipe):
    """The student U-Net (weights copied from ``teacher_unet``) and its weight map {student key: teacher key}."""
    import torch
    from diffusers import UNet2DConditionModel

    recipe = identity_recipe(dict(teacher_unet.config)) if recipe == "identity" else load_recipe(recipe)
    teacher_cfg = {k: v for k, v in dict(teacher_unet.config).items() if not k.startswith("_")}
    cfg, p = plan(teacher_cfg, recipe)
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(cfg)
    student_shapes = {k: v.shape for k, v in student.state_dict().items()}
    teacher_sd = teacher_unet.state_dict()
    mapping = weight_map(student_shapes, p)
    check_map(mapping, student_shapes, {k: v.shape for k, v in teacher_sd.items()}, recipe.name)
    if next(iter(teacher_sd.values())).device.type != "meta":
        student.load_state_dict({s: teacher_sd[t].detach().clone() for s, t in mapping.items()}, assign=True)
    return student, mapping, recipe
