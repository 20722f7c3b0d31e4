"""MODEL -> a folder that ONNX Runtime or OpenVINO runs (``slimsd export --to onnx|openvino``).

Every network is traced once to ONNX (torch's TorchScript exporter, opset 17); for OpenVINO the ONNX graph is
converted with ``openvino.convert_model`` and saved as IR (``openvino_model.xml``/``.bin``). Input and output
names are optimum's, so optimum's pipelines read the folder too: U-Net ``sample``, ``timestep`` (shape [1]),
``encoder_hidden_states`` (+ SDXL's ``text_embeds``, ``time_ids``; + LCM's ``timestep_cond``) -> ``out_sample``;
text encoders ``input_ids`` -> ``last_hidden_state``, ``pooler_output`` (``text_embeds`` first for a projection
encoder), and for SDXL every ``hidden_states.N``; VAE decoder ``latent_sample`` -> ``sample``; VAE encoder
``sample`` -> ``latent_parameters``.

``resolution`` fixes the image size (and ``batch`` the images per call): static shapes, which the runtimes
plan for once (dynamic shapes are several times slower in OpenVINO's published measurements); without them
the shapes are dynamic. The folder is written whole or not at all (:mod:`slimsd.atomic`).

``vae``: a tiny decoder, folder or file (:mod:`slimsd.models.decoders`) exported as ``vae_decoder/`` in
place of the model's VAE decoder (its config.json is the tiny decoder's: ``scaling_factor`` 1.0, the U-Net's
latents decoded as they are); it only decodes, so such an export has no ``vae_encoder/`` (img2img needs the
model's own VAE, as with ``--vae`` in torch). ``slimsd.json`` records it (``export.vae``: path, sha256).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from slimsd.atomic import atomic_dir, check_output_dir
from slimsd.errors import SlimsdError
from slimsd.models.runtimes import BACKENDS, PART_FILES, is_exported, require, require_backend

DTYPES = ("fp32", "fp16", "bf16")
OPSET = 17


def parse_resolution(text: str | None) -> tuple[int, int] | None:
    """``WxH`` (or one number for a square) -> (width, height), multiples of 8."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m:
        raise SlimsdError(f"resolution {text!r} is not WxH (e.g. 512x512) or one number")
    w, h = int(m[1]), int(m[2] or m[1])
    for v in (w, h):
        if v % 8 or not 64 <= v <= 2048:
            raise SlimsdError(
                f"resolution {text!r} is not allowed: width and height must be multiples of 8 from 64 to 2048 "
                "(the VAE works on 8x8-pixel cells)"
            )
    return w, h


def check_options(to: str, dtype: str, batch: int | None) -> None:
    if to not in BACKENDS:
        raise SlimsdError(f"unknown export target {to!r}; allowed: {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise SlimsdError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if to == "onnx" and dtype != "fp32":
        raise SlimsdError(f"--dtype {dtype} with --to onnx is not supported; ONNX exports are fp32")
    if batch is not None and not 1 <= batch <= 64:
        raise SlimsdError(f"batch {batch!r} is out of range; allowed: 1 to 64")


# ---------------------------------------------------------------- traceable wrappers


class UNetGraph(torch.nn.Module):
    def __init__(self, unet, sdxl: bool, cond: bool):
        super().__init__()
        self.unet, self.sdxl, self.cond = unet, sdxl, cond

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        extra = list(extra)
        added = {"text_embeds": extra.pop(0), "time_ids": extra.pop(0)} if self.sdxl else None
        timestep_cond = extra.pop(0) if self.cond else None
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class TextGraph(torch.nn.Module):
    def __init__(self, encoder, hidden: bool):
        super().__init__()
        self.encoder, self.hidden = encoder, hidden

    def forward(self, input_ids):
        out = self.encoder(input_ids, output_hidden_states=self.hidden, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else out[:2]
        return (*first, *(out.hidden_states if self.hidden else ()))


class DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class EncoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


# ---------------------------------------------------------------- export


def _graphs(
    pipe, size: tuple[int, int], batch: int | None, unet_batch: int | None, static: bool, decoder=None
):
    """(name, module, example inputs, input names, output names, dynamic axes) for each part; ``decoder``: a
    tiny decoder exported in place of the VAE's decoder (and no VAE encoder)."""
    from slimsd.models.loading import is_sdxl

    sdxl = is_sdxl(pipe)
    unet = pipe.unet
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    w, h = size
    lh, lw = h // vae_scale, w // vae_scale
    ub, b = unet_batch or 2, batch or 1
    seq = pipe.tokenizer.model_max_length
    ctx = unet.config.cross_attention_dim
    names = ["sample", "timestep", "encoder_hidden_states"]
    example = [
        torch.randn(ub, unet.config.in_channels, lh, lw),
        torch.tensor([500.0]),
        torch.randn(ub, seq, ctx),
    ]
    if sdxl:
        names += ["text_embeds", "time_ids"]
        proj = pipe.text_encoder_2.config.projection_dim
        example += [torch.randn(ub, proj), torch.tensor([[h, w, 0, 0, h, w]] * ub, dtype=torch.float32)]
    cond = unet.config.time_cond_proj_dim is not None
    if cond:
        names.append("timestep_cond")
        example.append(torch.randn(ub, unet.config.time_cond_proj_dim))

    def axes(names_shapes, batch_fixed):
        out = {}
        for name, dims in names_shapes.items():
            d = {k: v for k, v in dims.items() if not (static and v in ("height", "width"))}
            if batch_fixed:
                d.pop(0, None)
            if d:
                out[name] = d
        return out

    unet_axes = {n: {0: "batch"} for n in names if n != "timestep"}
    unet_axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    unet_axes["out_sample"] = {0: "batch", 2: "height", 3: "width"}
    graphs = [
        (
            "unet",
            UNetGraph(unet, sdxl, cond),
            tuple(example),
            names,
            ["out_sample"],
            axes(unet_axes, unet_batch),
        ),
    ]
    ids = torch.zeros(b, seq, dtype=torch.int64)
    for part in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
        enc = getattr(pipe, part)
        n_layers = enc.config.num_hidden_layers
        first = (
            ["text_embeds", "last_hidden_state"]
            if part == "text_encoder_2"
            else ["last_hidden_state", "pooler_output"]
        )
        outs = first + ([f"hidden_states.{i}" for i in range(n_layers + 1)] if sdxl else [])
        graphs.append(
            (
                part,
                TextGraph(enc, sdxl),
                (ids,),
                ["input_ids"],
                outs,
                axes({n: {0: "batch"} for n in ["input_ids", *outs]}, batch),
            )
        )
    lat = torch.randn(b, pipe.vae.config.latent_channels, lh, lw)
    img = torch.randn(b, 3, h, w)
    spatial = {0: "batch", 2: "height", 3: "width"}
    graphs.append(
        (
            "vae_decoder",
            DecoderGraph(pipe.vae if decoder is None else decoder),
            (lat,),
            ["latent_sample"],
            ["sample"],
            axes({"latent_sample": spatial, "sample": spatial}, batch),
        )
    )
    if decoder is not None:
        return graphs
    graphs.append(
        (
            "vae_encoder",
            EncoderGraph(pipe.vae),
            (img,),
            ["sample"],
            ["latent_parameters"],
            axes({"sample": spatial, "latent_parameters": spatial}, batch),
        )
    )
    return graphs


def to_onnx(module, example, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Trace MODULE to ONNX at PATH (fp32, eval, no autograd); the exporter's warnings are its own business."""
    require("onnx")
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def onnx_to_openvino(onnx_path: Path, xml_path: Path, compress_to_fp16: bool) -> None:
    ov = require("openvino")
    model = ov.convert_model(str(onnx_path))
    own_names_only(model)
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)


def own_names_only(model) -> None:
    """Each input and output keeps only its own names: conversion can merge a graph-internal tensor into an input
    (with static batch 1 the U-Net's ``timestep`` is also ``/unet/Expand_output_0``), and optimum-intel reads
    ``get_any_name()``, which may then return the internal one (its static reshape fails on it)."""
    for port in (*model.inputs, *model.outputs):
        own = {n for n in port.get_names() if not n.startswith("/")}
        if own and own != port.get_names():
            port.get_tensor().set_names(own)


def write_part(tmp: Path, name: str, graph, to: str, dtype: str) -> None:
    _, module, example, inputs, outputs, axes = graph
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    if to == "onnx":
        to_onnx(module, example, folder / PART_FILES["onnx"], inputs, outputs, axes)
        return
    scratch = tmp / f".{name}.onnx"
    to_onnx(module, example, scratch, inputs, outputs, axes)
    onnx_to_openvino(scratch, folder / PART_FILES["openvino"], compress_to_fp16=dtype != "fp32")
    scratch.unlink()


def write_configs(pipe, tmp: Path, sdxl: bool, decoder=None) -> None:
    """Scheduler, tokenizers and each part's config.json, as optimum's exporter writes them (``decoder``: the
    tiny decoder's config for vae_decoder/, and no vae_encoder/)."""
    pipe.scheduler.save_pretrained(tmp / "scheduler")
    pipe.tokenizer.save_pretrained(tmp / "tokenizer")
    pipe.unet.save_config(tmp / "unet")
    if decoder is None:
        for part in ("vae_decoder", "vae_encoder"):
            pipe.vae.save_config(tmp / part)
    else:
        decoder.save_config(tmp / "vae_decoder")
    pipe.text_encoder.config.save_pretrained(tmp / "text_encoder")
    if sdxl:
        pipe.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        pipe.text_encoder_2.config.save_pretrained(tmp / "text_encoder_2")
    index = {
        k: v
        for k, v in dict(pipe.config).items()
        if k not in ("safety_checker", "feature_extractor", "image_encoder")
    }
    index = {k: list(v) if isinstance(v, tuple) else v for k, v in index.items()}
    index["_class_name"] = type(pipe).__name__
    (tmp / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")


def check_family(pipe) -> str:
    """sd (1.x/2.x) or sdxl; anything else is refused with one line."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    if not isinstance(pipe.unet, UNet2DConditionModel):
        raise SlimsdError(
            f"cannot export a {type(pipe.unet).__name__}: the exporter knows SD 1.x/2.x and SDXL U-Nets"
        )
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    if isinstance(pipe, StableDiffusionPipeline):
        return "sd"
    raise SlimsdError(
        f"cannot export a {type(pipe).__name__}: the exporter knows SD 1.x/2.x and SDXL pipelines"
    )


def export_runtime(
    model: str,
    out: str | Path,
    to: str,
    *,
    resolution: str | None = None,
    batch: int | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    vae: str | None = None,
    pipe=None,
    on_phase=None,
) -> dict:
    """Export MODEL (anything :func:`slimsd.load` takes, LoRAs and a student's sampling included) to OUT for
    ``to`` (onnx | openvino). Returns the folder's ``export`` record. ``pipe``: an already-loaded plain fp32
    pipeline of MODEL (quantize passes its own); ``vae``: a tiny decoder folder in place of the VAE (module
    docstring)."""
    from slimsd import __version__
    from slimsd.models import decoders
    from slimsd.models.loading import load, model_sampling, model_source, read_slimsd_info

    check_options(to, dtype, batch)
    size = parse_resolution(resolution)
    require_backend(to)
    check_output_dir(out, overwrite)
    if Path(model).is_dir() and is_exported(model):
        raise SlimsdError(f"{model!r} is already an exported folder; export the model it came from")
    if vae is not None:
        decoders.check_decoder(vae)
    say = on_phase or (lambda _m: None)
    if pipe is None:
        say(f"loading {model}")
        pipe = load(
            model,
            device="cpu",
            dtype="fp32",
            optimize=False,
            allow_pickle=allow_pickle,
            prediction_type=prediction_type,
        )
    family = check_family(pipe)
    sdxl = family == "sdxl"
    decoder = None
    if vae is not None:
        decoder = decoders.load_decoder(vae)
        decoders.check_fits(decoder, dict(pipe.vae.config), str(vae))
    # an LCM-LoRA student's adapters are merged by load(): the export has them in its weights
    sampling = {k: v for k, v in (model_sampling(model) or {}).items() if k != "lora"}
    own_guidance = float(sampling.get("guidance", 7.5))
    uses_cfg = pipe.unet.config.time_cond_proj_dim is None and own_guidance > 1
    unet_batch = None if batch is None else batch * (2 if uses_cfg else 1)
    from slimsd.models.loading import native_resolution

    trace_size = size or (native_resolution(pipe),) * 2
    record = {
        "backend": to,
        "precision": dtype,
        "family": family,
        "resolution": list(size) if size else None,
        "batch": batch,
        "unet_batch": unet_batch,
        "source": model_source(model),
        "opset": OPSET,
        "slimsd_version": __version__,
    }
    if decoder is not None:  # vae_decoder/ is this tiny decoder; there is no vae_encoder/
        record["vae"] = {"kind": "tiny-decoder", **decoders.decoder_record(vae)}
    provenance = {
        k: v for k, v in (read_slimsd_info(model) or {}).items() if k not in ("weight_map", "export")
    }
    if sampling:
        provenance["sampling"] = sampling
    with atomic_dir(out, overwrite) as tmp:
        write_configs(pipe, tmp, sdxl, decoder)
        for graph in _graphs(pipe, trace_size, batch, unet_batch, static=size is not None, decoder=decoder):
            say(f"exporting {graph[0]} to {to}")
            write_part(tmp, graph[0], graph, to, dtype)
        (tmp / "slimsd.json").write_text(json.dumps({**provenance, "export": record}, indent=1) + "\n")
    return record
