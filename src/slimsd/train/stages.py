"""Staged plans: a student made shorter stage by stage, each stage a normal distillation run (SSD-1B's recipe).

    stages:
      - {recipe: bk-small, max_steps: 150}
      - {recipe: bk-tiny, max_steps: 150, teacher: previous}

Every recipe is written against the original teacher and keeps a subset of the layers of the one before. The
student of stage k is compressed from stage k-1's *trained* student through the composed weight map: a student
tensor s of stage k comes from teacher tensor map_k[s], which stage k-1 holds as inverse(map_{k-1})[map_k[s]].
Every slimsd.json keeps the map teacher -> that student, so a teacher LoRA still maps onto the final one.

A stage's teacher: the original one (default), ``previous`` (stage k-1's trained student), or any model of the
original teacher's U-Net architecture (a sequence of expert teachers).

Folder layout (each stage folder is a normal run folder of runs.py):

    OUTPUT/plan.json        the stages, as first started (a resume refuses another plan)
    OUTPUT/stage-1/         run.json, checkpoints/, final/
    OUTPUT/stage-2-init/    stage 2's student before training (a `slimsd compress` folder; stage 1 has one
                            only when another model than the original teacher teaches it)
    OUTPUT/stage-2/ ...
    OUTPUT/final/           the last stage's final student; slimsd.json also lists the stages

Each stage draws its data order and noise with seed + k - 1 (unless it gives its own seed). Steps count across
the plan: stage k's step s is global step offset_k + s. ``stop_at_step`` and
``checkpoint_every`` are global; ``resume=latest`` skips finished stages and resumes the current one, so a plan
stopped anywhere and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from slimsd.errors import SlimsdError
from slimsd.train.config import DistillConfig, validate
from slimsd.train.loop import train_run
from slimsd.train.runs import refuse_overwrite_with_resume
from slimsd.train.sharding import end_process_group, wait_for_everyone

PLAN_FILE = "plan.json"


def stage_configs(cfg: DistillConfig) -> list[tuple[DistillConfig, int]]:
    """Each stage's run config and its global step offset."""
    out, offset = [], 0
    base = {k: v for k, v in asdict(cfg).items() if k not in ("stages", "student")}
    root = Path(cfg.output_dir)
    for k, stage in enumerate(cfg.stages, 1):
        over = {key: v for key, v in stage.items() if key != "recipe"}
        if over.get("teacher") == "previous":
            over["teacher"] = str(root / f"stage-{k - 1}" / "final")
        # Each stage draws its own data order and noise (a stage would otherwise replay the one before's).
        over.setdefault("seed", (cfg.seed + k - 1) % 2**32)
        # Stage 1 compresses the original teacher (in memory, or into stage-1-init when another model teaches).
        own_init = k > 1 or over.get("teacher", cfg.teacher) != cfg.teacher
        student = str(root / f"stage-{k}-init") if own_init else stage["recipe"]
        stop = None if cfg.stop_at_step is None else max(cfg.stop_at_step - offset, 0)
        one = DistillConfig(**(base | over | {"student": student, "output_dir": str(root / f"stage-{k}")}))
        one.stop_at_step = None if stop is None or stop >= one.max_steps else stop
        one.resume = "latest" if cfg.resume else None
        one.overwrite = False
        out.append((one, offset))
        offset += one.max_steps
    return out


# --- the layers of each stage ---------------------------------------------------------------------------------


def _layer(key: str) -> str:
    """The layer a tensor belongs to (``down_blocks.2.attentions.1``), to name it in a message."""
    parts = key.split(".")
    return ".".join(parts[:4]) if parts[0] in ("down_blocks", "up_blocks") else ".".join(parts[:3])


def compose(new_map: dict[str, str], previous_map: dict[str, str], where: str) -> dict[str, str]:
    """{stage-k student key: stage-(k-1) student key}: each new tensor through the teacher tensor it comes from
    to the previous student's copy of it. A teacher tensor the previous student dropped is an error."""
    held = {t: s for s, t in previous_map.items()}
    out = {}
    for s, t in new_map.items():
        if t not in held:
            raise SlimsdError(
                f"{where} keeps teacher layer {_layer(t)}, which the stage before dropped; each stage's recipe "
                "must keep a subset of the layers of the one before"
            )
        out[s] = held[t]
    return out


def plan_layers(cfg: DistillConfig) -> list[dict]:
    """Per stage, from configs alone: the recipe, the student U-Net config, its map and plan against the
    original teacher, params and MACs. Checks every recipe against the teacher, every recipe against the one
    before, and every stage teacher's architecture."""
    from slimsd.models.architecture import build_student, load_recipe, plan
    from slimsd.models.counting import model_architecture, unet_counts

    teacher_cfg, _, vae_cfg, native = model_architecture(cfg.teacher)
    teacher_cfg = {k: v for k, v in teacher_cfg.items() if not k.startswith("_")}
    teacher_meta, teacher_params, teacher_macs = unet_counts(teacher_cfg, vae_cfg, cfg.resolution or native)
    rows = []
    for k, (one, _) in enumerate(stage_configs(cfg), 1):
        recipe = cfg.stages[k - 1]["recipe"]
        where = f"stage {k} ({recipe})"
        try:
            student, mapping, rec = build_student(teacher_meta, load_recipe(recipe))
        except SlimsdError as e:
            raise SlimsdError(f"{where}: {e}") from None
        s_cfg = {k2: v for k2, v in dict(student.config).items() if not k2.startswith("_")}
        if rows:
            compose(mapping, rows[-1]["weight_map"], where)
        teacher = cfg.stages[k - 1].get("teacher", cfg.teacher)
        other = teacher not in ("previous", cfg.teacher)
        if other and _architecture(model_architecture(teacher)[0]) != _architecture(teacher_cfg):
            raise SlimsdError(
                f"{where}: teacher {teacher!r} is not of the original teacher's U-Net architecture "
                f"({cfg.teacher!r}); allowed: 'previous' or a model of that architecture"
            )
        _, params, macs = unet_counts(s_cfg, vae_cfg, one.resolution or native)
        rows.append(
            {
                "stage": k,
                "recipe": rec.name,
                "teacher": teacher,
                "max_steps": one.max_steps,
                "unet_params": params,
                "unet_macs": macs,
                "unet_config": s_cfg,
                "weight_map": mapping,
                "plan": plan(teacher_cfg, rec)[1],
            }
        )
    for row in rows:
        row["teacher_unet_params"], row["teacher_unet_macs"] = teacher_params, teacher_macs
    return rows


def _architecture(unet_cfg: dict) -> dict:
    """A U-Net config as diffusers completes it (defaults filled in, lists as JSON has them), to compare two."""
    from slimsd.models.counting import build_unet_meta

    full = dict(build_unet_meta(unet_cfg).config)
    return json.loads(json.dumps({k: v for k, v in full.items() if not k.startswith("_")}))


def previous_taps(row: dict, before: dict) -> list[list[str]]:
    """Feature taps for a stage taught by the previous stage's student: BK-SDM's stage outputs (default_taps),
    paired through both plans (student stage -> teacher stage -> previous student stage)."""
    from slimsd.train.losses import default_taps

    p, q = row["plan"], before["plan"]
    composed = SimpleNamespace(
        down_stages=[q.down_stages.index(t) for t in p.down_stages],
        up_stages=[q.up_stages.index(t) for t in p.up_stages],
    )
    return [list(t) for t in default_taps(row["unet_config"], before["unet_config"], composed)]


def describe(cfg: DistillConfig) -> str:
    """What ``slimsd distill --dry-run`` prints about a plan: one line per stage."""
    rows = plan_layers(cfg)
    lines = [
        f"teacher {cfg.teacher}: U-Net {rows[0]['teacher_unet_params']:,} params, "
        f"{rows[0]['teacher_unet_macs']:,} MACs"
    ]
    for r in rows:
        lines.append(
            f"stage {r['stage']}: recipe {r['recipe']}, teacher {r['teacher']}, {r['max_steps']} steps, "
            f"U-Net {r['unet_params']:,} params, {r['unet_macs']:,} MACs"
        )
    return "\n".join(lines) + "\n"


# --- running a plan -------------------------------------------------------------------------------------------


def build_stage_student(teacher: str, recipe: str, previous: Path, out: Path, allow_pickle: bool) -> Path:
    """Stage k's student before training: its recipe's U-Net filled from stage k-1's trained student through
    the composed map, beside that student's other parts; slimsd.json maps the original teacher to it."""
    from slimsd.models.architecture import build_student, load_recipe
    from slimsd.models.compress import CompressResult, save_student
    from slimsd.models.counting import build_unet_meta, count_params, model_architecture
    from slimsd.models.loading import load, read_slimsd_info

    teacher_meta = build_unet_meta(model_architecture(teacher)[0])
    student, mapping, rec = build_student(teacher_meta, load_recipe(recipe))
    pipe = load(str(previous), device="cpu", dtype="fp32", optimize=False, allow_pickle=allow_pickle)
    source = compose(mapping, read_slimsd_info(previous)["weight_map"], f"recipe {rec.name}")
    weights = pipe.unet.state_dict()
    student.load_state_dict({s: weights[p].detach().clone() for s, p in source.items()}, assign=True)
    pipe.register_modules(unet=student)
    result = CompressResult(None, rec, mapping, count_params(teacher_meta), count_params(student), pipe)
    return save_student(result, out, teacher, overwrite=True)


def _check_folder(cfg: DistillConfig, root: Path) -> None:
    """One plan per folder: a new plan needs a free folder (or overwrite=true, which removes only a plan's
    folder), a resume needs the same stages."""
    from slimsd.atomic import is_leftover, remove_dir

    names = {p.name for p in root.iterdir() if not is_leftover(p.name)} if root.is_dir() else set()
    ours = {PLAN_FILE, "final"} | {f"stage-{k}" for k in range(1, len(cfg.stages) + 1)}
    ours |= {f"stage-{k}-init" for k in range(1, len(cfg.stages) + 1)}
    if names and PLAN_FILE not in names:
        raise SlimsdError(f"output_dir {str(root)!r} is not empty and holds no staged plan; choose another")
    if names and cfg.overwrite:
        foreign = sorted(n for n in names if n not in ours and not n.startswith("stage-"))
        if foreign:
            raise SlimsdError(
                f"output_dir {str(root)!r} holds files that are not the plan's ({foreign[0]!r}); move them, "
                "or choose another output_dir"
            )
        print(f"overwrite=true: removing the earlier plan in {root}")
        remove_dir(root)
        return
    if names and not cfg.resume:
        raise SlimsdError(
            f"output_dir {str(root)!r} holds another plan; choose resume=latest to continue it, overwrite=true "
            "to start over, or another output_dir"
        )
    if names:
        saved = json.loads((root / PLAN_FILE).read_text())["stages"]
        if saved != json.loads(json.dumps(cfg.stages)):
            raise SlimsdError(
                f"output_dir {str(root)!r} holds a plan with other stages ({saved}); resume it with the same "
                "stages, or start over with overwrite=true or another output_dir"
            )


def train_plan(cfg: DistillConfig) -> dict:
    """Run the stages in order, each through the distillation loop; returns train()'s summary, in global steps."""
    from slimsd.atomic import atomic_dir, atomic_write_text

    root = Path(cfg.output_dir)
    refuse_overwrite_with_resume(cfg)
    if cfg.resume not in (None, "latest"):
        raise SlimsdError(f"resume {cfg.resume!r}: a staged plan resumes with resume=latest")
    rows = plan_layers(cfg)  # every stage checked before any work
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        _check_folder(cfg, root)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            root / PLAN_FILE, json.dumps({"teacher": cfg.teacher, "stages": cfg.stages}, indent=1)
        )
    wait_for_everyone()  # the other processes wait for the main one's folder work
    summary = {"losses": [], "skipped": {}, "stages": [], "resumed_from": None, "already_finished": True}
    result = {}
    for k, (one, offset) in enumerate(stage_configs(cfg), 1):
        if cfg.stop_at_step is not None and cfg.stop_at_step <= offset:
            break
        init = Path(one.student)
        if main and k == 1 and init.name == "stage-1-init" and not (init / "slimsd.json").is_file():
            from slimsd.models.compress import compress

            compress(
                cfg.teacher, cfg.stages[0]["recipe"], init, overwrite=True, allow_pickle=cfg.allow_pickle
            )
        if k > 1:
            if main and not (init / "slimsd.json").is_file():
                build_stage_student(
                    cfg.teacher,
                    cfg.stages[k - 1]["recipe"],
                    root / f"stage-{k - 1}" / "final",
                    init,
                    cfg.allow_pickle,
                )
            wait_for_everyone()
            stage = cfg.stages[k - 1]
            if stage.get("teacher") == "previous" and "feature_taps" not in stage:
                one.feature_taps = previous_taps(rows[k - 1], rows[k - 2])
        if main:
            print(
                f"stage {k}/{len(rows)}: {rows[k - 1]['recipe']}, teacher {rows[k - 1]['teacher']}, "
                f"global steps {offset + 1}-{offset + one.max_steps}"
            )
        result = train_run(validate(one), step_offset=offset, keep_process_group=True)
        summary["already_finished"] &= bool(result.get("already_finished"))
        summary["losses"] += [r | {"step": r["step"] + offset} for r in result.get("losses", [])]
        for name, n in result.get("skipped", {}).items():
            summary["skipped"][name] = summary["skipped"].get(name, 0) + n
        summary["resumed_from"] = summary["resumed_from"] or result.get("resumed_from")
        summary["stages"].append(
            {"stage": k, "final_dir": result["final_dir"], "steps": offset + result["steps"]}
        )
        summary["steps"] = offset + result["steps"]
        if result["final_dir"] is None:
            break
    finished = len(summary["stages"]) == len(rows) and summary["stages"][-1]["final_dir"] is not None
    if main and finished and not (summary["already_finished"] and (root / "final").is_dir()):
        last = root / f"stage-{len(rows)}" / "final"
        with atomic_dir(root / "final", overwrite=True) as tmp:
            shutil.copytree(last, tmp, dirs_exist_ok=True)
            info = json.loads((last / "slimsd.json").read_text())
            info |= {"teacher": cfg.teacher, "stage_teacher": info["teacher"], "stages": cfg.stages}
            (tmp / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    wait_for_everyone()
    end_process_group()
    return summary | {
        "final_dir": str(root / "final") if finished else None,
        "num_processes": result.get("num_processes", 1),
        "engine": result.get("engine", "single"),
        "process_index": result.get("process_index", 0),
        "images_per_second": result.get("images_per_second", 0.0),
    }
