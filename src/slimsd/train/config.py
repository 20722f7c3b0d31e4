"""The distillation config (the DistillConfig dataclass, train/settings.py), from YAML plus ``key=value``
overrides, validated before any work.

Every key has a type, a range or a closed set of choices; a bad value is one line naming the key, the value and
what is allowed (exit code 2 on the command line).
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict
from pathlib import Path

import yaml

from slimsd.devices import MIXED_PRECISION
from slimsd.errors import SlimsdError
from slimsd.train.filters import normalize as normalize_rules
from slimsd.train.objectives import OBJECTIVES as OBJECTIVE_CLASSES
from slimsd.train.objectives.finetune import FINETUNE_DEFAULTS, FINETUNE_KEYS, FINETUNE_NAMES
from slimsd.train.settings import DistillConfig

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
OBJECTIVES = tuple(OBJECTIVE_CLASSES)  # kd, lcm, lcm-lora, progressive, finetune (objectives/__init__.py)
# Keys a staged plan sets for every stage (a stage may not give them).
PLAN_KEYS = ("stages", "student", "output_dir", "resume", "overwrite", "allow_config_change", "stop_at_step")


AT_LEAST_1 = (1, None, True, True)
AT_LEAST_0 = (0, None, True, True)
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    **dict.fromkeys(
        (
            "max_steps",
            "batch_size",
            "gradient_accumulation_steps",
            "keep_last",
            "validation_steps",
            "log_every",
        ),
        AT_LEAST_1,
    ),
    **dict.fromkeys(("stop_at_step", "steps_per_round"), AT_LEAST_1),
    **dict.fromkeys(("solver_steps", "cond_proj_dim", "lora_rank", "sample_steps"), AT_LEAST_1),
    **dict.fromkeys(("num_class_images", "class_steps"), AT_LEAST_1),
    **dict.fromkeys(("prior_loss_weight", "latent_noise"), AT_LEAST_0),
    **dict.fromkeys(("guidance_min", "guidance_max", "sample_guidance"), (1, 50, True, True)),
    **dict.fromkeys(("huber_c", "timestep_scaling", "lora_alpha"), (0, None, False, True)),
    "target_decay": (0, 1, True, True),
    **dict.fromkeys(
        (
            "weight_decay",
            "max_grad_norm",
            "lr_warmup_steps",
            "checkpoint_every",
            "validation_every",
            "num_workers",
        ),
        AT_LEAST_0,
    ),
    **dict.fromkeys(("lambda_task", "lambda_out", "lambda_feat"), AT_LEAST_0),
    **dict.fromkeys(("learning_rate", "adam_epsilon"), (0, None, False, True)),  # above 0
    **dict.fromkeys(("adam_beta1", "adam_beta2"), (0, 1, True, False)),  # torch's AdamW refuses 1
    **dict.fromkeys(("caption_dropout", "ema_decay", "max_skipped_fraction"), (0, 1, True, True)),
    "resolution": (8, None, True, True),
    "seed": (0, 2**32 - 1, True, True),  # numpy's seed range (accelerate's set_seed seeds numpy too)
}
CHOICES = {
    "mixed_precision": tuple(MIXED_PRECISION),
    "lr_scheduler": LR_SCHEDULERS,
    "feat_norm": ("none", "teacher"),
    "objective": OBJECTIVE_CLASSES.keys(),  # the registry's names as they are now
    "lcm_loss": ("l2", "huber"),
}


class YamlWord:
    """A YAML 1.1 boolean as written (``no``, ``Off``, ``true``...): a bool for a bool key, the word for a
    string key, so that ``mixed_precision: no`` means accelerate's "no" and not False."""

    def __init__(self, text: str, value: bool):
        self.text, self.value = text, value

    def __repr__(self) -> str:
        return repr(self.value)


class _WordLoader(yaml.SafeLoader):
    def construct_yaml_bool(self, node):
        return YamlWord(node.value, super().construct_yaml_bool(node))


_WordLoader.add_constructor("tag:yaml.org,2002:bool", _WordLoader.construct_yaml_bool)


def _words(value, as_text: bool):
    """``value`` with every YamlWord in it replaced by its text (``as_text``) or its boolean."""
    if isinstance(value, YamlWord):
        return value.text if as_text else value.value
    if isinstance(value, list):
        return [_words(v, as_text) for v in value]
    if isinstance(value, dict):
        return {_words(k, as_text): _words(v, as_text) for k, v in value.items()}
    return value


def _coerce(key: str, value, hint):
    """``value`` (from YAML or ``key=value``) as the type the field declares, or a one-line error."""
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = (
        next((a for a in args if a is not type(None)), hint)
        if args and typing.get_origin(hint) is not list
        else hint
    )
    origin = typing.get_origin(base) or base
    # lists here hold strings (prompts, module names); a stage's values are typed by its own keys (stages.py)
    value = _words(value, as_text=origin in (str, list) and key != "stages")
    bad = SlimsdError(f"config key {key!r}: expected {getattr(origin, '__name__', origin)}, got {value!r}")
    if origin is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if not math.isfinite(value):
            raise SlimsdError(f"config key {key!r}: {value!r} is not a finite number")
        return float(value)
    if origin is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise bad
        return str(value)
    if origin is list:
        item = typing.get_args(base)[0] if typing.get_args(base) else None
        if isinstance(value, str) and item is str:
            return [value]
        if not isinstance(value, list):
            raise bad
        if item is str and not all(isinstance(v, str) for v in value):
            raise SlimsdError(f"config key {key!r}: expected a list of strings, got {value!r}")
        if item is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SlimsdError(f"config key {key!r}: expected a list of whole numbers, got {value!r}")
        return value
    return value


def validate(cfg: DistillConfig) -> DistillConfig:
    """Check every key's type (also for a config built in Python), range and choices; one line per problem."""
    hints = typing.get_type_hints(DistillConfig)
    for key, hint in hints.items():
        setattr(cfg, key, _coerce(key, getattr(cfg, key), hint))
    for key, (lo, hi, lo_incl, hi_incl) in RANGES.items():
        v = getattr(cfg, key)
        if v is None:
            continue
        too_low = lo is not None and (v < lo or (v == lo and not lo_incl))
        if too_low or (hi is not None and (v > hi or (v == hi and not hi_incl))):
            lo_s = "" if lo is None else (f">= {lo}" if lo_incl else f"> {lo}")
            hi_s = "" if hi is None else (f"<= {hi}" if hi_incl else f"< {hi}")
            raise SlimsdError(
                f"config key {key!r}: {v} is out of range; allowed: {' and '.join(filter(None, [lo_s, hi_s]))}"
            )
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise SlimsdError(
                f"config key {key!r}: {getattr(cfg, key)!r} is not allowed; allowed: {', '.join(allowed)}"
            )
    if cfg.guidance_max < cfg.guidance_min:
        raise SlimsdError(
            f"config keys guidance_min {cfg.guidance_min:g} > guidance_max {cfg.guidance_max:g}; "
            "the range needs min <= max"
        )
    OBJECTIVE_CLASSES[cfg.objective].check(cfg)  # the objective's own rules (objectives/*.py)
    if cfg.resolution is not None and cfg.resolution % 8:
        raise SlimsdError(f"config key 'resolution': {cfg.resolution} is not a multiple of 8")
    if cfg.lora_targets is not None and not [t for t in cfg.lora_targets if t.strip()]:
        raise SlimsdError(
            "config key 'lora_targets': an empty list is not allowed; allowed: module names such as "
            "[to_q, to_k, to_v, to_out.0]"
        )
    if cfg.class_prompt is not None and cfg.objective != "finetune":
        raise SlimsdError(f"config key 'class_prompt' is for objective finetune, not {cfg.objective!r}")
    if cfg.latent_noise and cfg.objective != "vae-decoder":
        raise SlimsdError(
            f"config key 'latent_noise': {cfg.latent_noise:g} is for objective vae-decoder, not {cfg.objective!r}; "
            "allowed: 0"
        )
    if cfg.feature_taps is not None:
        from slimsd.train.losses import parse_taps

        parse_taps(cfg.feature_taps)
    cfg.data_filter = normalize_rules(cfg.data_filter)  # each rule read (one-line error); no rules: None
    if cfg.stages is not None:
        check_stages(cfg)
    return cfg


def check_stages(cfg: DistillConfig) -> None:
    """A staged plan's shape and every stage's keys (no model is read; stages.py runs it); sets ``max_steps`` to
    the plan's total and ``stages`` to plain, typed values."""
    if not isinstance(cfg.stages, list) or not cfg.stages:
        raise SlimsdError(f"config key 'stages': expected a list of mappings, got {cfg.stages!r}")
    if cfg.objective != "kd":
        raise SlimsdError(f"config key 'stages' needs objective kd; got objective {cfg.objective!r}")
    allowed = ["recipe"] + [k for k in typing.get_type_hints(DistillConfig) if k not in PLAN_KEYS]
    typed = []
    for k, stage in enumerate(cfg.stages, 1):
        if not isinstance(stage, dict) or "recipe" not in stage or "max_steps" not in stage:
            raise SlimsdError(
                f"stage {k}: expected a mapping with at least recipe and max_steps, got {stage!r}"
            )
        bad = [key for key in stage if key not in allowed]
        if bad:
            raise SlimsdError(f"stage {k}: unknown key {str(bad[0])!r}; allowed: {', '.join(allowed)}")
        if k == 1 and stage.get("teacher") == "previous":
            raise SlimsdError(
                "stage 1: teacher 'previous' is not allowed: the first stage has no previous one"
            )
        values = {key: v for key, v in stage.items() if key != "recipe"}
        base = {key: v for key, v in asdict(cfg).items() if key not in ("stages", "student", "max_steps")}
        try:  # the stage's values on top of the plan's, checked together
            one = make_config(base | values | {"student": stage["recipe"]})
        except SlimsdError as e:
            raise SlimsdError(f"stage {k}: {e}") from None
        typed.append({"recipe": one.student} | {key: getattr(one, key) for key in values})
    cfg.stages = typed
    cfg.max_steps = sum(s["max_steps"] for s in typed)


def make_config(values: dict) -> DistillConfig:
    """A validated config from a mapping; unknown keys are an error that lists the allowed ones."""
    hints = typing.get_type_hints(DistillConfig)
    values = {_words(k, as_text=True): v for k, v in values.items()}  # a key spelled `no:` is the word
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise SlimsdError(f"unknown config key {unknown[0]!r}; allowed: {', '.join(hints)}")
    for key in ("student", "max_steps"):
        if values.get("stages") is not None and key in values:
            raise SlimsdError(
                f"config key {key!r} is not allowed beside 'stages': each stage gives its recipe and max_steps"
            )
    return validate(DistillConfig(**values))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DistillConfig:
    """A YAML config file (optional) with ``key=value`` overrides on top; values are parsed as YAML scalars."""
    return make_config(read_values(path, overrides))


def read_values(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The mapping of a YAML config file (optional) with ``key=value`` overrides on top, not yet checked."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SlimsdError(f"config file {str(p)!r} does not exist")
        try:
            values = yaml.load(p.read_bytes().decode("utf-8"), Loader=_WordLoader) or {}
        except UnicodeDecodeError:
            raise SlimsdError(f"config file {str(p)!r} is not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise SlimsdError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise SlimsdError(f"config file {str(p)!r}: expected a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SlimsdError(f"override {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.load(raw, Loader=_WordLoader) if raw.strip() else None
        except yaml.YAMLError:
            values[key.strip()] = raw
    return values


def config_yaml(cfg: DistillConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


# `slimsd finetune`: the same config under the names a fine-tuner expects (objectives/finetune.py: FINETUNE_NAMES,
# FINETUNE_KEYS, FINETUNE_DEFAULTS, finetune_view).


def finetune_config(values: dict) -> DistillConfig:
    """A validated finetune config from a mapping in finetune's key names (``model``, ``rank`` ...)."""
    values = {_words(k, as_text=True): v for k, v in values.items()}
    allowed = [*FINETUNE_NAMES, *FINETUNE_KEYS]
    unknown = [k for k in values if k not in allowed]
    if unknown:
        raise SlimsdError(f"unknown config key {unknown[0]!r}; allowed: {', '.join(allowed)}")
    if values.get("model") is None:
        raise SlimsdError("config key 'model' is required: a preset or micro name, or a model folder")
    mapped = FINETUNE_DEFAULTS | {FINETUNE_NAMES.get(k, k): v for k, v in values.items()}
    mapped["teacher"] = mapped["student"]  # the base model; finetune loads no teacher
    try:
        return make_config(mapped)
    except SlimsdError as e:  # name the key as the user wrote it
        message = str(e)
        for name, key in FINETUNE_NAMES.items():
            message = message.replace(f"config key {key!r}", f"config key {name!r}")
        raise SlimsdError(message) from None
