"""How the student is spread over the processes, and its whole weights and optimizer state read from (or put
back into) whichever engine holds them, so that checkpoints keep one layout whatever the launch.

Engines: ``single`` (one process), ``ddp``, ``fsdp`` (accelerate's FSDP2: FULL_SHARD or SHARD_GRAD_OP, see
configs/accelerate/fsdp*.yaml) and ``deepspeed`` (ZeRO-2/3). For all but DeepSpeed the optimizer state is
gathered whole (torch.distributed.checkpoint's full state dicts, keyed by parameter name) and scattered back on
resume, so a run may resume under another engine or process count. DeepSpeed keeps its fp32 master weights
and optimizer partitions in its own engine checkpoint (``engine/``), which only a DeepSpeed run of the same
world size reads back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from slimsd.errors import SlimsdError

ENGINE_TAG = "engine"  # the DeepSpeed checkpoint's tag (a folder of that name inside engine/)


def setup(accelerator, batch_size: int) -> str:
    """The engine of this launch, after one fix-up: accelerate selects FSDP only with an accelerator, so on a
    CPU-only machine an FSDP launch (gloo) gets the plugin here, exactly as accelerate's GPU branch sets it."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants = lambda name: os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"  # noqa: E731
    kind = accelerator.distributed_type
    if wants("DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise SlimsdError(
            "DeepSpeed was asked for but accelerate did not start it: accelerate runs DeepSpeed only on CUDA "
            "devices (this machine has none); use configs/accelerate/fsdp.yaml on CPUs"
        )
    if wants("FSDP") and kind == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise SlimsdError(
                "FSDP on CPUs needs fsdp_version: 2 (torch's FSDP1 crashes with gloo); see "
                "configs/accelerate/fsdp.yaml"
            )
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        kind = DistributedType.FSDP
    if kind == DistributedType.DEEPSPEED:
        # the trainer feeds its own batches (no DataLoader goes through prepare), so DeepSpeed is told the size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def _zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage


def full_weights(accelerator, engine: str, model) -> dict[str, torch.Tensor]:
    """The student's whole state dict on every process (a collective under FSDP and ZeRO-3: call it on all)."""
    if engine == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_options())
    if engine == "deepspeed":
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module, zero3 = model.module, _zero_stage(accelerator) == 3
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero3):
            out = {k: v.detach().clone() for k, v in module.state_dict().items()}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)  # the fp32 master copy (the module holds the compute dtype)
            if full is not None:
                out[name] = full.detach().clone()
        return out
    return accelerator.unwrap_model(model).state_dict()


def full_optimizer(engine: str, model, optimizer) -> dict | None:
    """The whole optimizer state, keyed by parameter name, on the main process (a collective under FSDP);
    None under DeepSpeed (its engine checkpoint holds it)."""
    if engine == "deepspeed":
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _raw(optimizer), options=_options(cpu_offload=engine == "fsdp"))


def load_weights(engine: str, model, weights: dict[str, torch.Tensor]) -> None:
    """Whole weights into the (prepared) student: each process keeps its shard (DeepSpeed: see load_engine)."""
    if engine == "deepspeed":
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_options())


def load_optimizer(engine: str, model, optimizer, saved: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if engine in ("single", "ddp") and all(isinstance(p, int) for p in saved["param_groups"][0]["params"]):
        _raw(optimizer).load_state_dict(saved)  # written by slimsd before sharding: keyed by position
        return
    raw = _raw(optimizer)
    set_optimizer_state_dict(model, raw, saved, options=_options())
    for (
        group
    ) in raw.param_groups:  # it hands tuples (AdamW's betas) back as lists; checkpoints stay byte-equal
        for k, v in raw.defaults.items():
            if isinstance(v, tuple) and isinstance(group.get(k), list):
                group[k] = tuple(group[k])


def save_engine(model, folder: Path) -> None:
    """DeepSpeed's own checkpoint (fp32 master weights and optimizer partitions), every process its part."""
    model.save_checkpoint(str(folder), tag=ENGINE_TAG)


def load_engine(model, folder: Path) -> None:
    if not (folder / ENGINE_TAG).is_dir():
        raise SlimsdError(
            f"checkpoint {str(folder.parent)!r} was not written by a DeepSpeed run (no engine/ folder); "
            "resume it with the engine that wrote it"
        )
    path, _ = model.load_checkpoint(
        str(folder), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise SlimsdError(f"checkpoint {str(folder.parent)!r}: DeepSpeed could not read its engine state")


def _raw(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(world_size: int) -> dict:
    """How the Accelerator, and accelerate's process state it shares, is made on this machine. Under a launcher
    (WORLD_SIZE > 1) without CUDA, accelerate joins the processes into one gloo group only when told to use the
    CPU (otherwise each process would train alone on the whole data set and all of them would write the same
    output_dir), so `accelerate launch --multi_gpu` works on CPUs unchanged. DeepSpeed on CPUs
    (DS_ACCELERATOR=cpu): accelerate would start no process group without CUDA; gloo."""
    from accelerate.utils import InitProcessGroupKwargs

    no_cuda = world_size > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if no_cuda and deepspeed_requested() else []
    return {"cpu": no_cuda and not deepspeed_requested(), "kwargs_handlers": handlers}


def wait_for_everyone() -> None:
    """A barrier of the launched processes, also before any Accelerator exists (a staged plan's folder work):
    accelerate's process state is made as train()'s Accelerator will make it, which then shares it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        kw = accelerator_kwargs(int(os.environ["WORLD_SIZE"]))
        group = {k: v for h in kw["kwargs_handlers"] for k, v in h.to_kwargs().items()}
        PartialState(cpu=kw["cpu"], **group).wait_for_everyone()


def end_process_group() -> None:
    """What accelerator.end_training() does to the launched processes' group, for a staged plan, whose stages
    keep it (train(keep_process_group=True))."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().destroy_process_group()


def cast_inputs(accelerator, engine: str, model) -> None:
    """DeepSpeed holds the student in the compute dtype (bf16 / fp16; its fp32 master copy lives in the
    optimizer), where the other engines keep it fp32 under autocast: the trainer's fp32 inputs are cast to it."""
    if engine != "deepspeed":
        return
    module = accelerator.unwrap_model(model)
    dtype = next(module.parameters()).dtype
    if dtype == torch.float32:
        return

    def cast(x):
        if isinstance(x, torch.Tensor):
            return x.to(dtype) if x.is_floating_point() else x
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(cast(v) for v in x)
        return x

    module.register_forward_pre_hook(lambda _m, args, kwargs: (cast(args), cast(kwargs)), with_kwargs=True)
