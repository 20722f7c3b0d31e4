"""Post-training int8 (``slimsd quantize``): an exported folder whose U-Net runs int8 weights and activations.

Calibration follows Q-Diffusion's lesson: the U-Net's inputs are collected from the model's *own* sampling
trajectory (its scheduler, steps and guidance, as :func:`slimsd.run.generate.generate` samples it, so every
timestep it samples at, and the conditional and unconditional halves of the batch when it uses guidance), over
the calibration prompts. The layers that published recipes keep in higher precision (NVIDIA ModelOpt's default
filter, OpenVINO's VegaRT recipe, SVDQuant) are kept by default: ``conv_in``, ``conv_out``, the time embedding and
``time_emb_proj``, SDXL's ``add_embedding``, shortcut convolutions; norms are never quantised by either tool.

- OpenVINO: NNCF's ``quantize`` (int8 weights and activations; ``IgnoredScope`` patterns for the kept layers) or
  ``compress_weights`` (``int8-weights``: weight-only, activations stay float);
- ONNX Runtime: ``quantize_static`` (QDQ, int8 weights per channel, uint8 activations; ``nodes_to_exclude``) or
  ``quantize_dynamic`` (``int8-weights``: int8 weights, activations quantised on the fly).

Every folder gets ``sensitivity.json``: for each quantisable layer of the torch U-Net, the relative error of the
U-Net's output when only that layer is fake-quantised (int8 per-channel weights, uint8 per-tensor activations
over the calibration range), on calibration inputs: which layers the int8 error comes from.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from slimsd.atomic import atomic_dir, check_output_dir
from slimsd.errors import SlimsdError
from slimsd.models.decoders import check_decoder
from slimsd.models.runtimes import BACKENDS, PART_FILES, require

METHODS = ("int8", "int8-weights")
KEEP = ("conv_in", "conv_out", "time_embedding", "time_emb_proj", "add_embedding", "conv_shortcut", "norm")
WEIGHT_ONLY_PARTS = ("text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder")
# Generic captions (COCO-like) for a model that is given none; a model of another world should get its own.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a wooden table",
    "a red car parked on a city street at night",
    "a bowl of fruit on a kitchen counter",
    "a mountain lake at sunrise with mist",
    "a portrait of an old man with a beard",
    "a plate of pasta with tomato sauce",
    "a dog running on a sandy beach",
    "a modern living room with large windows",
    "a small boat on a calm river",
    "a bicycle leaning against a brick wall",
    "a vase of sunflowers on a windowsill",
    "a snowy forest under a blue sky",
    "a cup of coffee next to an open book",
    "a lighthouse on a rocky coast",
    "a child flying a kite in a park",
    "a bowl of ramen with an egg",
)


def read_prompts(path: str | Path | None, count: int | None) -> list[str]:
    """The calibration prompts: one per non-empty line of a UTF-8 file (else the built-in set), the first
    ``count`` of them, repeated in order when there are fewer."""
    if count is not None and not 1 <= count <= 10_000:
        raise SlimsdError(f"calibration-prompts {count!r} is out of range; allowed: 1 to 10000")
    if path is None:
        prompts = list(DEFAULT_PROMPTS)
    else:
        p = Path(path)
        if not p.is_file():
            raise SlimsdError(f"prompt file {str(p)!r} does not exist")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlimsdError(
                f"prompt file {str(p)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
            ) from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise SlimsdError(f"prompt file {str(p)!r} holds no prompt; give one prompt per line")
    count = count or min(len(prompts), 32)
    return [prompts[i % len(prompts)] for i in range(count)]


def check_keep(patterns) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise SlimsdError(f"--keep {p!r} is not a regular expression: {e}") from None
    return list(patterns)


# ---------------------------------------------------------------- calibration on the model's own trajectory


def collect_unet_inputs(
    pipe, prompts: list[str], width: int, height: int, seed: int = 0, first_only: bool = False
):
    """The U-Net's inputs (numpy, export input names) at every call while ``generate`` samples PROMPTS at the
    model's own steps, guidance and scheduler; ``first_only``: only the first call of each image (naive
    calibration, one timestep). Returns (inputs, sampling record)."""
    from slimsd.run.generate import generate, sampling_defaults

    calls: list[dict] = []
    seen = {"image": 0, "t": [], "used": []}  # every call's timestep; those calibrated on

    def grab(_module, args, kwargs):
        names = ("sample", "timestep", "encoder_hidden_states")
        values = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
        t = torch.as_tensor(values["timestep"], dtype=torch.float32).reshape(-1)[:1]
        seen["t"].append(float(t))
        if first_only and len(seen["t"]) > 1 + seen["image"]:
            return
        seen["used"].append(float(t))
        item = {
            "sample": values["sample"],
            "timestep": t,
            "encoder_hidden_states": values["encoder_hidden_states"],
        }
        if kwargs.get("timestep_cond") is not None:
            item["timestep_cond"] = kwargs["timestep_cond"]
        item.update(kwargs.get("added_cond_kwargs") or {})
        calls.append({k: v.detach().float().numpy().copy() for k, v in item.items()})

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            seen["image"] = len(seen["t"])
            generate(pipe, prompt, seed=seed + i, width=width, height=height)
    finally:
        handle.remove()
    own = sampling_defaults(pipe._slimsd.get("sampling"))
    record = {
        "steps": own["steps"],
        "guidance": own["guidance"],
        "scheduler": pipe._slimsd["default_scheduler"],
        # the timesteps the inputs were taken at (naive: the first only), not every one the model sampled at
        "timesteps": sorted(set(seen["used"]), reverse=True),
        "sampled_timesteps": len(set(seen["t"])),
        "unet_inputs": len(calls),
        "batch_per_call": int(calls[0]["sample"].shape[0]) if calls else 0,
        "seeds": [seed, seed + len(prompts) - 1],
        "resolution": [width, height],
    }
    return calls, record


# ---------------------------------------------------------------- the runtimes' quantisers


@contextlib.contextmanager
def quiet_tools():
    """NNCF and ONNX Runtime log and draw progress bars on stdout/stderr: nothing of theirs reaches the user."""
    loggers = [logging.getLogger(n) for n in ("nncf", "onnxruntime", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def keep_regex(patterns) -> str | None:
    return "|".join(f"(?:{p})" for p in patterns) if patterns else None


def quantize_openvino(xml: Path, calls: list[dict], keep: list[str], method: str, naive: bool) -> None:
    nncf = require("nncf")
    ov = require("openvino")
    model = ov.Core().read_model(str(xml))
    scope = nncf.IgnoredScope(patterns=[f".*(?:{keep_regex(keep)}).*"], validate=False) if keep else None
    with quiet_tools():
        if method == "int8-weights":
            out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=scope)
        else:
            advanced = None
            if naive:  # plain min-max ranges, no bias correction: the textbook baseline
                from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
                from nncf.quantization.range_estimator import RangeEstimatorParametersSet

                advanced = AdvancedQuantizationParameters(
                    activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX
                )
            out = nncf.quantize(
                model,
                nncf.Dataset(calls),
                subset_size=len(calls),
                model_type=nncf.ModelType.TRANSFORMER,
                ignored_scope=scope,
                fast_bias_correction=True,
                advanced_parameters=advanced,
            )
    tmp = xml.with_name("q_" + xml.name)
    kept_weights_fp16(out)
    ov.save_model(out, str(tmp), compress_to_fp16=False)
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))


def kept_weights_fp16(model, min_elements: int = 4096) -> int:
    """Store the float weights that stayed out of int8 (the kept layers) as fp16 constants converted to f32 at
    load: computed in f32, still far finer than int8. On a bk-sdm-tiny U-Net they are 80 MB of a 384 MB int8
    file in fp32 (benchmarks/results/fullsize_int8_disk.json). ``save_model(compress_to_fp16=True)`` leaves
    them in fp32 in an NNCF-quantised model (measured), hence by hand. Returns how many were converted."""
    ops = require("openvino.opset13", "openvino")
    count = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() != "f32":
            continue
        if int(np.prod(op.get_output_shape(0))) < min_elements:  # scales, biases, shapes: as they are
            continue
        half = ops.constant(op.get_data().astype(np.float16))
        back = ops.convert(half, "f32")
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
        count += 1
    model.validate_nodes_and_infer_types()
    return count


def quantize_onnx(path: Path, calls: list[dict], keep: list[str], method: str) -> None:
    require("onnx")
    ort_q = require("onnxruntime.quantization", "onnxruntime")
    import onnx

    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    rx = keep_regex(keep)
    exclude = [n for n in names if rx and re.search(rx, n)]
    out = path.with_name("q_" + path.name)
    with quiet_tools():
        if method == "int8-weights":
            ort_q.quantize_dynamic(
                str(path), str(out), weight_type=ort_q.QuantType.QInt8, nodes_to_exclude=exclude
            )
        else:

            class Reader(ort_q.CalibrationDataReader):
                def __init__(self):
                    self.items = iter(calls)

                def get_next(self):
                    return next(self.items, None)

            ort_q.quantize_static(
                str(path),
                str(out),
                Reader(),
                quant_format=ort_q.QuantFormat.QDQ,
                activation_type=ort_q.QuantType.QUInt8,
                weight_type=ort_q.QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                nodes_to_exclude=exclude,
            )
    out.replace(path)


def weights_only(folder: Path, part: str, backend: str) -> None:
    path = folder / part / PART_FILES[backend]
    if backend == "openvino":
        quantize_openvino(path, [], [], "int8-weights", naive=False)
    else:
        quantize_onnx(path, [], [], "int8-weights")


# ---------------------------------------------------------------- sensitivity


def quantisable_layers(unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}


def _fake_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (what both tools do for weights)."""
    scale = w.abs().flatten(1).amax(1).clamp(min=1e-12) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    return (w / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape)


def _fake_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Asymmetric uint8 per tensor over the calibration range [lo, hi]."""
    scale = max(hi - lo, 1e-12) / 255
    zero = round(-lo / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def sensitivity(
    unet, calls: list[dict], keep: list[str], limit: int | None = None, samples: int = 4
) -> list[dict]:
    """Per layer: relative L2 error of the U-Net output when only that layer runs int8 (fake-quantised), mean
    over ``samples`` calibration inputs spread over the trajectory; sorted worst first. ``limit``: the layers
    with the most weights only (full-size U-Nets have ~700)."""
    layers = quantisable_layers(unet)
    if limit:
        layers = dict(sorted(layers.items(), key=lambda kv: -kv[1].weight.numel())[:limit])
    picks = [calls[i] for i in np.linspace(0, len(calls) - 1, min(samples, len(calls))).round().astype(int)]
    inputs = [_torch_inputs(c) for c in picks]
    ranges = {n: [np.inf, -np.inf] for n in layers}

    def observe(name):
        def hook(_m, args):
            ranges[name][0] = min(ranges[name][0], float(args[0].min()))
            ranges[name][1] = max(ranges[name][1], float(args[0].max()))

        return hook

    with torch.no_grad():
        handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers.items()]
        refs = [unet(**x).sample for x in inputs]
        for h in handles:
            h.remove()
        rx = keep_regex(keep)
        rows = []
        for name, module in layers.items():
            lo, hi = ranges[name]
            original = module.weight.data.clone()
            module.weight.data = _fake_weight(original)
            handle = module.register_forward_pre_hook(
                lambda _m, a, lo=lo, hi=hi: (_fake_act(a[0], lo, hi), *a[1:])
            )
            try:
                errors = [
                    float((unet(**x).sample - r).norm() / r.norm().clamp(min=1e-12))
                    for x, r in zip(inputs, refs, strict=True)
                ]
            finally:
                handle.remove()
                module.weight.data = original
            rows.append(
                {
                    "layer": name,
                    "params": module.weight.numel(),
                    "rel_error": float(np.mean(errors)),
                    "kept": bool(rx and re.search(rx, name)),
                }
            )
    return sorted(rows, key=lambda r: -r["rel_error"])


def _torch_inputs(call: dict) -> dict:
    x = {k: torch.from_numpy(v) for k, v in call.items()}
    out = {
        "sample": x.pop("sample"),
        "timestep": x.pop("timestep"),
        "encoder_hidden_states": x.pop("encoder_hidden_states"),
    }
    if "timestep_cond" in x:
        out["timestep_cond"] = x.pop("timestep_cond")
    if x:
        out["added_cond_kwargs"] = x
    return out


# ---------------------------------------------------------------- the command


def quantize(
    model: str,
    out: str | Path,
    *,
    to: str = "openvino",
    prompts_file: str | None = None,
    calibration_prompts: int | None = None,
    keep: tuple[str, ...] | None = None,
    method: str = "int8",
    weight_only: tuple[str, ...] = (),
    resolution: str | None = None,
    batch: int | None = None,
    sensitivity_layers: int | None = None,
    naive: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    seed: int = 0,
    vae: str | None = None,
    on_phase=None,
) -> dict:
    """Export MODEL to ``to`` and quantise its U-Net (see the module docstring); returns the folder's
    ``export`` record. ``naive``: the ablation baseline (min-max ranges, the first timestep only); ``vae``: a
    tiny decoder exported as vae_decoder/ (:func:`slimsd.models.exporting.export_runtime`; the U-Net's
    calibration inputs do not depend on the decoder)."""
    from slimsd.models.exporting import export_runtime, parse_resolution
    from slimsd.models.loading import load, native_resolution
    from slimsd.models.runtimes import require_backend

    if to not in BACKENDS:
        raise SlimsdError(f"unknown quantisation target {to!r}; allowed: {', '.join(BACKENDS)}")
    if method not in METHODS:
        raise SlimsdError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    for part in weight_only:
        if part not in WEIGHT_ONLY_PARTS:
            raise SlimsdError(
                f"unknown part {part!r} for --weight-only; allowed: {', '.join(WEIGHT_ONLY_PARTS)}"
            )
    keep = check_keep(KEEP if keep is None else keep)
    prompts = read_prompts(prompts_file, calibration_prompts)
    size = parse_resolution(resolution)
    require_backend(to)
    require("nncf") if to == "openvino" else require("onnxruntime.quantization", "onnxruntime")
    if vae is not None:  # a wrong folder is one line before minutes of calibration
        check_decoder(vae)
    check_output_dir(out, overwrite)
    say = on_phase or (lambda _m: None)
    say(f"loading {model}")
    pipe = load(model, device="cpu", dtype="fp32", optimize=False, allow_pickle=allow_pickle)
    width, height = size or (native_resolution(pipe),) * 2
    say(f"calibrating on {len(prompts)} prompts along the model's own sampling trajectory")
    calls, calibration = collect_unet_inputs(pipe, prompts, width, height, seed, first_only=naive)
    with atomic_dir(out, overwrite) as tmp:
        stage = tmp / "fp32"
        record = export_runtime(
            model, stage, to, resolution=resolution, batch=batch, vae=vae, pipe=pipe, on_phase=say
        )
        for entry in stage.iterdir():
            shutil.move(str(entry), str(tmp / entry.name))
        stage.rmdir()
        unet_file = tmp / "unet" / PART_FILES[to]
        fp32_bytes = _part_bytes(tmp / "unet")
        say(f"quantising the U-Net ({method}, {to})")
        if to == "openvino":
            quantize_openvino(unet_file, calls, keep, method, naive)
        else:
            quantize_onnx(unet_file, calls, keep, method)
        for part in weight_only:
            if (tmp / part).is_dir():
                say(f"int8 weights for {part}")
                weights_only(tmp, part, to)
        say("measuring per-layer sensitivity")
        table = sensitivity(pipe.unet, calls, keep, sensitivity_layers)
        (tmp / "sensitivity.json").write_text(
            json.dumps(
                {
                    "metric": "relative L2 error of the U-Net output, only this layer int8 (fake-quantised)",
                    "layers": table,
                },
                indent=1,
            )
            + "\n"
        )
        rx = keep_regex(keep)
        kept = sorted(n for n in quantisable_layers(pipe.unet) if rx and re.search(rx, n))
        record = {**record, "precision": method}
        record["quantization"] = {
            "method": method,
            "tool": f"nncf {require('nncf').__version__}"
            if to == "openvino"
            else f"onnxruntime {require('onnxruntime').__version__}",
            "calibration": {
                "kind": "naive: min-max, first timestep" if naive else "trajectory",
                "prompts": prompts,
                "count": len(prompts),
                **calibration,
            },
            "keep_patterns": keep,
            "kept_layers": kept,
            "weight_only_parts": list(weight_only),
            "unet_bytes_fp32": fp32_bytes,
            "unet_bytes": _part_bytes(tmp / "unet"),
        }
        info = json.loads((tmp / "slimsd.json").read_text())
        info["export"] = record
        (tmp / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    return record


def _part_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".bin", ".data"))
