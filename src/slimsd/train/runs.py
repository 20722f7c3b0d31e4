"""One run per output folder: what a distillation run may do with the folder it writes into.

``OUTPUT/run.json`` records the run (a run id, the resolved config, the config changes made on resumes); each
checkpoint's ``state.json`` holds the config that wrote it. Before any work:

- a start without a checkpoint to resume refuses a folder that holds another run's checkpoints or final student
  (``resume=latest``, ``overwrite=true`` or another ``output_dir``); ``overwrite=true`` removes the old run in
  one rename (never a mix of old and new checkpoints), and only a folder that holds nothing but a run; it is
  refused beside any ``resume`` (``latest`` included);
- a resume prints every key that differs from the checkpoint's config, and refuses keys that change the
  computation (the run would no longer equal an uninterrupted one) unless ``allow_config_change=true``, which
  is then recorded with its step;
- a checkpoint at or past ``max_steps`` whose final student is written is a finished run: nothing to do.

``plan_run`` only reads (every process of a launch runs it and reaches the same decision), but for putting back a
``final/`` whose replacement was killed (atomic.restore_set_aside: one rename, whichever process wins);
``begin_run`` writes, on the main process only.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimsd.atomic import atomic_write_text, clean_leftovers, is_leftover, remove_dir, restore_set_aside
from slimsd.errors import SlimsdError
from slimsd.train.checkpoints import list_checkpoints, read_state, resolve_resume
from slimsd.train.config import DistillConfig

RUN_FILE = "run.json"
RUN_ENTRIES = {
    RUN_FILE,
    "checkpoints",
    "final",
    "validation",
    "tensorboard",
    "class_images",  # finetune's prior preservation (train/prior.py)
}  # what a run writes in its folder
# Keys that only say how this invocation starts, not what the run computes: never compared.
INVOCATION_KEYS = {"resume", "overwrite", "allow_config_change"}
# Keys whose change leaves the remaining steps computing exactly what an uninterrupted run computes (speed,
# memory, bookkeeping, output). Every other key is taken to change the computation. gradient_checkpointing
# recomputes the same forward pass (bit-identical on CPU in fp32 and bf16, tested); max_steps is safe unless
# the LR schedule decays over it.
SAFE_KEYS = {
    "max_steps",
    "stop_at_step",
    "checkpoint_every",
    "keep_last",
    "validation_prompts",
    "validation_every",
    "validation_steps",
    "log_every",
    "sample_steps",  # only what final/slimsd.json tells generate
    "sample_guidance",
    "tensorboard",
    "progress",
    "num_workers",
    "output_dir",
    "gradient_checkpointing",
    "allow_pickle",
}
SCHEDULES_OVER_MAX_STEPS = ("linear", "cosine")  # get_scheduler(num_training_steps=max_steps)


@dataclass
class RunPlan:
    output_dir: Path
    checkpoint: Path | None = None  # the checkpoint to resume from
    step: int = 0  # its step
    changes: dict = field(default_factory=dict)  # key -> [checkpoint's value, this config's value]
    history: list = field(default_factory=list)  # config changes recorded so far, this resume's included
    finished: bool = False  # the checkpoint is at or past max_steps and final/ holds it: nothing to do
    start_over: bool = False  # remove what is in output_dir first
    notes: list = field(default_factory=list)  # lines for the user, printed by the main process


def _plain(cfg: DistillConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # as it reads back from JSON (tuples as lists, ...)


def _show(value) -> str:
    return json.dumps(value)


def _final_step(out: Path) -> int | None:
    try:
        return json.loads((out / "final" / "slimsd.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def _start_fresh(cfg: DistillConfig, out: Path) -> tuple[bool, list[str]]:
    """Whether a new run may start in ``out`` (refused with one line otherwise) and must first clear it."""
    names = {p.name for p in out.iterdir() if not is_leftover(p.name)} if out.is_dir() else set()
    if not names:
        return False, []
    foreign = sorted(names - RUN_ENTRIES)
    if foreign and not names & {RUN_FILE, "checkpoints", "final"}:
        raise SlimsdError(
            f"output_dir {str(out)!r} is not empty and holds no slimsd run (it holds {foreign[0]!r}); "
            "choose another output_dir"
        )
    checkpoints = list_checkpoints(out)
    saved = [f"checkpoints up to step {int(checkpoints[-1].name.split('-')[1])}"] if checkpoints else []
    saved += ["a final student"] if (out / "final").exists() else []
    if saved and not cfg.overwrite:
        choices = "resume=latest to continue it, " if checkpoints else ""
        raise SlimsdError(
            f"output_dir {str(out)!r} holds another run ({' and '.join(saved)}); choose {choices}"
            "overwrite=true to start over, or another output_dir"
        )
    if foreign:
        raise SlimsdError(
            f"output_dir {str(out)!r} holds files that are not the run's ({foreign[0]!r}); starting over "
            "removes only a run folder: move them, or choose another output_dir"
        )
    if saved:
        return True, [f"overwrite=true: removing the earlier run in {out} ({' and '.join(saved)})"]
    return True, [f"starting over in {out}: the earlier run there saved no checkpoint"]


def _breaking(changes: dict, cfg: DistillConfig) -> list[str]:
    keys = [k for k in changes if k not in SAFE_KEYS]
    if "max_steps" in changes and (
        cfg.lr_scheduler in SCHEDULES_OVER_MAX_STEPS or cfg.objective == "progressive"
    ):
        keys.append("max_steps")
    return keys


def refuse_overwrite_with_resume(cfg: DistillConfig) -> None:
    """Both keys at once is refused, ``resume=latest`` included: a restart script that carries both would
    otherwise delete the run, checkpoints included, on every restart."""
    if cfg.overwrite and cfg.resume is not None:
        raise SlimsdError(
            f"overwrite=true starts a new run (it removes the one in output_dir); it cannot resume from "
            f"{cfg.resume!r}: drop one of the two (resume=null clears a config file's resume)"
        )


def plan_run(cfg: DistillConfig) -> RunPlan:
    """Decide how this run uses ``cfg.output_dir`` (reads only; refusals are one-line errors)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise SlimsdError(f"output_dir {str(out)!r} exists and is not a folder")
    refuse_overwrite_with_resume(cfg)
    # A final/ whose replacement was killed between its set-aside and the rename is put back before anything is
    # read (the one write here: every process may try it, one rename wins, all then see the same folder).
    restore_set_aside(out / "final")
    checkpoint = None if cfg.overwrite else resolve_resume(cfg)
    plan = RunPlan(out, checkpoint)
    own = checkpoint is not None and checkpoint.parent.parent.resolve() == out.resolve()
    if not own:  # a new run, or one continued from another folder's checkpoint: the folder must be free
        plan.start_over, plan.notes = _start_fresh(cfg, out)
    if checkpoint is None:
        return plan

    state = read_state(checkpoint)
    plan.step = int(state["step"])
    old = state.get("config")
    if old is None:
        plan.notes.append(
            f"checkpoint {checkpoint} does not record its config (an older slimsd): changes are not checked"
        )
        old = _plain(cfg)
    new, defaults = _plain(cfg), _plain(DistillConfig())
    plan.changes = {
        k: [old.get(k, defaults[k]), v]
        for k, v in new.items()
        if k not in INVOCATION_KEYS and old.get(k, defaults[k]) != v
    }
    plan.notes += [
        f"config change since step {plan.step}: {k}: {_show(a)} -> {_show(b)}"
        for k, (a, b) in plan.changes.items()
    ]
    plan.finished = plan.step >= cfg.max_steps and _final_step(out) == plan.step
    breaking = _breaking(plan.changes, cfg)
    if breaking and not plan.finished and not cfg.allow_config_change:
        why = ""
        if "max_steps" in breaking:
            why = (
                " (the rounds of progressive_steps split max_steps)"
                if cfg.objective == "progressive"
                else f" (lr_scheduler={cfg.lr_scheduler} decays over max_steps)"
            )
        changed = ", ".join(
            f"{k} {_show(plan.changes[k][0])} -> {_show(plan.changes[k][1])}" for k in breaking
        )
        raise SlimsdError(
            f"resuming {str(checkpoint)!r} at step {plan.step} with changed {changed}{why}: that "
            "changes the computation, so the run would no longer equal an uninterrupted one; set "
            "allow_config_change=true to continue anyway (it is recorded), or start over with overwrite=true "
            "or another output_dir"
        )
    plan.history = list(state.get("config_changes", []))
    if plan.changes:
        plan.history.append({"step": plan.step, "changed": plan.changes, "exact": not breaking})
    return plan


def begin_run(plan: RunPlan, cfg: DistillConfig) -> None:
    """Main process, before any work: clear the folder when starting over, remove a killed run's temporary
    files, and write ``run.json``."""
    out = plan.output_dir
    if plan.start_over:
        remove_dir(out)  # one rename, then the delete: never a mix of the old run and the new one
    # a start-over killed between its rename and its delete: the run folder is only ever set aside to be deleted
    clean_leftovers(out.parent, out.name, restore=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlimsdError(f"output_dir {str(out)!r} cannot be created: {e.strerror}") from None
    for folder in (out, out / "checkpoints", out / "validation"):
        clean_leftovers(
            folder
        )  # .step-N.tmp-* of a killed run removed, a .final.old-* without final/ restored
    record = {}
    if plan.checkpoint is not None:
        try:
            record = json.loads((out / RUN_FILE).read_text())
        except (OSError, ValueError):  # a folder from an older slimsd: the run gets its record now
            record = {}
    record = {"run_id": uuid.uuid4().hex[:12], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | record
    if plan.checkpoint is not None and plan.checkpoint.parent.parent.resolve() != out.resolve():
        record["resumed_from"] = str(plan.checkpoint)
    record |= {"config": _plain(cfg), "config_changes": plan.history}
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1) + "\n")
