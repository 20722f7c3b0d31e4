"""One ``.safetensors`` file in the original layout <-> a diffusers pipeline (import and export).

A1111, ComfyUI, Fooocus and SD.Next take a whole model as one file with the original key names: CompVis LDM
for SD 1.x/2.x (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``) and Stability
SGM for SDXL (the same U-Net and VAE names, text encoders under ``conditioner.embedders.0/1``). The key
mapping is written here from the layouts (no converter is called), and it is built from the U-Net's own
architecture, so it holds for any slimsd student: fewer layers per block, blocks without attention, other
transformer depths per layer (SSD-1B, Vega), no mid block (BK-SDM small/tiny) or a mid block of one resnet.

Import reads the architecture from the tensor names and shapes. What no tensor shape holds (attention heads,
group-norm groups, text-encoder activation and token ids, sample size, scheduler) comes from the header
metadata slimsd writes on export (``slimsd.*``), else from the family's published configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimsd.errors import SlimsdError
from slimsd.models.sources import SINGLE_FILE_SUFFIXES as SUFFIXES
from slimsd.models.sources import hub_error_reason, native_resolution

PREDICTION_TYPES = ("epsilon", "v_prediction")
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# what a text encoder's config says of its architecture (its parameters follow from these; single files too)
TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "projection_dim",
)
UNET = "model.diffusion_model."
VAE = "first_stage_model."
# family -> the file prefix of each text encoder and its layout ("clip": OpenAI CLIP with transformers' own
# names under text_model.; "openclip": OpenCLIP's resblocks)
TEXT = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("conditioner.embedders.0.transformer.", "clip"),
        ("conditioner.embedders.1.model.", "openclip"),
    ],
}
HUB_FAMILY = {"sd1": "sd-v1.5", "sd2": "sd-v2.1-base", "sdxl": "sdxl-base-1.0"}  # tokenizers, schedulers
EXPECTED = (
    "expected a Stable Diffusion checkpoint in the original layout: model.diffusion_model.* and "
    "first_stage_model.* with cond_stage_model.* (SD 1.x/2.x) or conditioner.embedders.0/1 (SDXL)"
)


def is_single_file(model: str) -> bool:
    return Path(model).suffix.lower() in SUFFIXES and Path(model).is_file()


# --- the U-Net ------------------------------------------------------------------------------------------------

UNET_TOP = {  # diffusers module -> LDM module
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "time_embedding.cond_proj": "time_embed.cond_proj",  # LCM students: slimsd's own name (no LDM original)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _per_stage(value, n: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def unet_modules(cfg: dict) -> list[tuple[str, str, dict]]:
    """(diffusers module, LDM module, renames of the names inside it) for every module of a U-Net config."""
    n = len(cfg["block_out_channels"])
    lpb = _per_stage(cfg["layers_per_block"], n)
    out = [(d, ldm, {}) for d, ldm in UNET_TOP.items()]
    idx = 1
    for i, btype in enumerate(cfg["down_block_types"]):
        for j in range(lpb[i]):
            out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", UNET_RESNET))
            if "CrossAttn" in btype:
                out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1", {}))
            idx += 1
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{idx}.0.op", {}))
            idx += 1
    mid = cfg.get("mid_block_type")
    if mid is not None:
        out.append(("mid_block.resnets.0", "middle_block.0", UNET_RESNET))
    if mid == "UNetMidBlock2DCrossAttn":
        out.append(("mid_block.attentions.0", "middle_block.1", {}))
        out.append(("mid_block.resnets.1", "middle_block.2", UNET_RESNET))
    idx = 0
    for i, btype in enumerate(cfg["up_block_types"]):
        layers = lpb[n - 1 - i] + 1  # an up block has one layer more than the down block it mirrors
        attn = "CrossAttn" in btype
        for j in range(layers):
            out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", UNET_RESNET))
            if attn:
                out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1", {}))
            if j == layers - 1 and i < n - 1:
                out.append(
                    (f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{2 if attn else 1}.conv", {})
                )
            idx += 1
    return out


def _rename(state: dict, modules: list[tuple[str, str, dict]], forward: bool, what: str) -> dict:
    """Rename every key of ``state`` by ``modules`` (diffusers -> original when ``forward``, else back); a key
    no module claims is an error (a layout this mapping does not describe)."""
    table = {}
    for d, o, inner in modules:
        src, dst = (d, o) if forward else (o, d)
        table[src] = (dst, inner if forward else {v: k for k, v in inner.items()})
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:cut]))
            if hit is None:
                continue
            rest = parts[cut:]
            for k in range(len(rest) - 1, 0, -1):  # a renamed name inside the module (e.g. in_layers.0)
                head = ".".join(rest[:k])
                if head in hit[1]:
                    rest = [hit[1][head], *rest[k:]]
                    break
            out[".".join([hit[0], *rest])] = value
            break
        else:
            raise SlimsdError(
                f"{what}: tensor {key!r} has no place in the {'original' if forward else 'diffusers'} layout"
            )
    return out


def _ids(keys, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)})


def _depth(keys, module: str) -> int:
    """Transformer layers in an LDM attention module (0: the module is not an attention)."""
    return len(_ids(keys, f"{module}.transformer_blocks."))


def read_unet_config(shapes: dict[str, tuple], what: str) -> dict:
    """The architecture of an LDM U-Net, read from its tensor names and shapes (diffusers config fields)."""
    keys = set(shapes)
    stages, cur = [], []
    for i in _ids(keys, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            stages.append(cur)
            cur = []
        else:
            cur.append(
                (shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0], _depth(keys, f"input_blocks.{i}.1"))
            )
    stages.append(cur)
    n = len(stages)
    if any(not s or len({d > 0 for _, d in s}) > 1 for s in stages):
        raise SlimsdError(f"{what}: a down stage with no layers, or with attention in some layers only")
    up, idx = [], 0
    for i in range(n):
        up.append([_depth(keys, f"output_blocks.{idx + j}.1") for j in range(len(stages[n - 1 - i]) + 1)])
        idx += len(up[-1])
    if idx != len(_ids(keys, "output_blocks.")) or any(len({d > 0 for d in s}) > 1 for s in up):
        raise SlimsdError(f"{what}: the up stages do not mirror the down stages")
    attn = [k for k in sorted(keys) if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in sorted(keys) if k.endswith(".proj_in.weight")]
    cfg = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "block_out_channels": [s[0][0] for s in stages],
        "layers_per_block": [len(s) for s in stages],
        "down_block_types": ["CrossAttnDownBlock2D" if s[0][1] else "DownBlock2D" for s in stages],
        "up_block_types": ["CrossAttnUpBlock2D" if s[0] else "UpBlock2D" for s in up],
        "cross_attention_dim": shapes[attn[0]][1] if attn else 1280,
        "use_linear_projection": bool(proj_in) and len(shapes[proj_in[0]]) == 2,
    }
    if len(set(cfg["layers_per_block"])) == 1:
        cfg["layers_per_block"] = cfg["layers_per_block"][0]
    mid = _ids(keys, "middle_block.")
    mid_depth = _depth(keys, "middle_block.1")
    cfg["mid_block_type"] = {(): None, (0,): "UNetMidBlock2D", (0, 1, 2): "UNetMidBlock2DCrossAttn"}.get(
        tuple(mid), "?"
    )
    down_tl = [max(d, 1) for d in (s[0][1] for s in stages)]
    if cfg["mid_block_type"] == "?" or (mid_depth and mid_depth != down_tl[-1]):
        raise SlimsdError(f"{what}: a mid block diffusers cannot build (blocks {mid}, depth {mid_depth})")
    if any(len({d for _, d in s}) > 1 for s in stages):
        raise SlimsdError(f"{what}: transformer depths that differ inside a down stage")
    up_tl = [[max(d, 1) for d in s] for s in up]
    if any(d != 1 for d in down_tl):
        cfg["transformer_layers_per_block"] = down_tl
    if up_tl != [[down_tl[n - 1 - i]] * len(s) for i, s in enumerate(up_tl)]:
        cfg["transformer_layers_per_block"] = down_tl
        cfg["reverse_transformer_layers_per_block"] = up_tl
    if "label_emb.0.0.weight" in keys:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = shapes["label_emb.0.0.weight"][1]
    if "time_embed.cond_proj.weight" in keys:
        cfg["time_cond_proj_dim"] = shapes["time_embed.cond_proj.weight"][1]
    return cfg


# --- the VAE --------------------------------------------------------------------------------------------------

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_modules(cfg: dict) -> list[tuple[str, str, dict]]:
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    out = [(m, m, {}) for m in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {})]
        out.append((f"{part}.conv_norm_out", f"{part}.norm_out", {}))
        out.append((f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION))
        out += [(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}", VAE_RESNET) for j in (0, 1)]
    for i in range(n):
        out += [
            (f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
            for j in range(lpb)
        ]
        o = n - 1 - i  # the original decoder numbers its stages from the latent side's far end
        out += [
            (f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{o}.block.{j}", VAE_RESNET)
            for j in range(lpb + 1)
        ]
        if i < n - 1:
            out.append(
                (f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", {})
            )
            out.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{o}.upsample.conv", {}))
    return out


def _vae_attention_shapes(state: dict, to_conv: bool) -> dict:
    """The original VAE attention uses 1x1 convolutions where diffusers uses linear layers: same numbers."""
    out = {}
    for k, v in state.items():
        if ".mid.attn_1." in k and k.endswith(".weight") and k.split(".")[-2] in ("q", "k", "v", "proj_out"):
            v = v[:, :, None, None] if to_conv else v[:, :, 0, 0]
        out[k] = v
    return out


def read_vae_config(shapes: dict[str, tuple]) -> dict:
    n = len(_ids(shapes, "encoder.down."))
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["post_quant_conv.weight"][0],
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n)],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": len(_ids(shapes, "encoder.down.0.block.")),
    }


# --- the text encoders ----------------------------------------------------------------------------------------

OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
IGNORED = ("position_ids", "logit_scale", "attn_mask")  # buffers and training-only values of the originals
# what original training checkpoints also hold: EMA copies and the noise schedule's buffers (not weights)
TRAINING_ONLY = ("model_ema.", "alphas_cumprod", "betas", "posterior_", "sqrt_", "log_one_minus")
V_PRED = "v_pred"  # an empty tensor that marks a v-prediction file (what A1111 and ComfyUI look for)


def _bare(model) -> dict:
    """A CLIP text model's tensors under transformers' names without the ``text_model.`` wrapper (which
    CLIPTextModel lost in transformers 5.6; CLIPTextModelWithProjection keeps it), plus text_projection."""
    return {
        k.removeprefix("text_model."): v
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }


def _dress(model, bare: dict) -> dict:
    wrapped = hasattr(model, "text_model")
    return {
        k if (k == "text_projection.weight" or not wrapped) else f"text_model.{k}": v for k, v in bare.items()
    }


def text_to_original(bare: dict, layout: str, extra_layer: bool = False) -> dict:
    if layout == "clip":
        return {f"text_model.{k}": v for k, v in bare.items()}
    out = {OPENCLIP_TOP[k]: v for k, v in bare.items() if k in OPENCLIP_TOP}
    if "text_projection.weight" in bare:
        out["text_projection"] = bare["text_projection.weight"].T.contiguous()  # OpenCLIP multiplies x @ P
    n = len(_ids(bare, "encoder.layers."))
    for i in range(n):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            qkv = [bare[f"{p}self_attn.{x}_proj.{part}"] for x in "qkv"]
            out[f"{q}attn.in_proj_{part}"] = torch.cat(qkv)
            for d, o in OPENCLIP_LAYER.items():
                out[f"{q}{o}.{part}"] = bare[f"{p}{d}.{part}"]
    if extra_layer:
        # SD 2.x files hold all 24 OpenCLIP layers and the tools run the penultimate one; diffusers keeps 23.
        # A 24th layer whose residual branches are zero passes its input through unchanged.
        last = f"transformer.resblocks.{n - 1}."
        for k in [k for k in out if k.startswith(last)]:
            v = out[k]
            keep = ".ln_" in k
            out[k.replace(last, f"transformer.resblocks.{n}.")] = v.clone() if keep else torch.zeros_like(v)
    return out


def text_from_original(state: dict, layout: str, drop_last: bool = False) -> dict:
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED)}
    if layout == "clip":
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {d: state.pop(o) for d, o in OPENCLIP_TOP.items()}
    if "text_projection" in state:
        out["text_projection.weight"] = state.pop("text_projection").T.contiguous()
    n = len(_ids(state, "transformer.resblocks."))
    for i in range(n):
        p, q = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        if drop_last and i == n - 1:
            for k in [k for k in state if k.startswith(q)]:
                state.pop(k)
            break
        for part in ("weight", "bias"):
            for x, v in zip("qkv", state.pop(f"{q}attn.in_proj_{part}").chunk(3), strict=True):
                out[f"{p}self_attn.{x}_proj.{part}"] = v
            for d, o in OPENCLIP_LAYER.items():
                out[f"{p}{d}.{part}"] = state.pop(f"{q}{o}.{part}")
    if state:
        raise SlimsdError(f"text encoder tensor {next(iter(state))!r} has no place in the diffusers layout")
    return out


def read_text_config(bare: dict, layout: str) -> dict:
    """A CLIPTextConfig's shape fields; heads and activation by the published encoders' convention."""
    width = bare["embeddings.token_embedding.weight"].shape[1]
    cfg = {
        "vocab_size": bare["embeddings.token_embedding.weight"].shape[0],
        "hidden_size": width,
        "intermediate_size": bare["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "num_hidden_layers": len(_ids(bare, "encoder.layers.")),
        "num_attention_heads": max(width // 64, 1),  # CLIP-L, OpenCLIP-H and bigG all use 64 per head
        "max_position_embeddings": bare["embeddings.position_embedding.weight"].shape[0],
        "hidden_act": "quick_gelu" if layout == "clip" else "gelu",
    }
    if "text_projection.weight" in bare:
        cfg["projection_dim"] = bare["text_projection.weight"].shape[0]
    return cfg


# --- the file -------------------------------------------------------------------------------------------------


def read_file(path: str | Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(tensors, header metadata) of a single-file checkpoint; ``.ckpt`` (pickle) only with ``allow_pickle``,
    and then through torch.load(weights_only=True), which refuses arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"model file {str(path)!r} does not exist")
    if path.suffix.lower() == ".ckpt":
        if not allow_pickle:
            raise SlimsdError(
                f"{str(path)!r} is a pickle file (.ckpt); pickle can run code when loaded: pass --allow-pickle "
                "to load it anyway, or use a .safetensors copy"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure: a bad file
            raise SlimsdError(f"{str(path)!r} is not a readable checkpoint: {type(e).__name__}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # safe_open is not a dict: no `in f`
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise SlimsdError(
            f"{str(path)!r} is not a readable safetensors file: {str(e).splitlines()[0]}"
        ) from None


def file_architecture(path: str, allow_pickle: bool = False) -> tuple[dict, list[dict], dict, int]:
    """(unet config, text encoder configs, vae config, native resolution) of a single file, as
    :mod:`slimsd.models.counting` wants them."""
    pipe = load_single_file(path, allow_pickle, prediction_type="epsilon")  # the scheduler is not counted
    encoders = []
    for model in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if model is not None:
            cfg = {k: getattr(model.config, k) for k in TEXT_FIELDS}
            encoders.append({**cfg, "with_projection": hasattr(model, "text_projection")})
    return dict(pipe.unet.config), encoders, dict(pipe.vae.config), native_resolution(pipe)


def detect_family(keys) -> str | None:
    """sd1 | sd2 | sdxl from the text encoders' names, or None for a layout that is not one of them."""
    keys = set(keys)
    if f"{UNET}input_blocks.0.0.weight" not in keys or f"{VAE}post_quant_conv.weight" not in keys:
        return None
    for family, encoders in (("sdxl", TEXT["sdxl"]), ("sd2", TEXT["sd2"]), ("sd1", TEXT["sd1"])):
        probe = [
            p
            + ("text_model.embeddings.token_embedding.weight" if kind == "clip" else "token_embedding.weight")
            for p, kind in encoders
        ]
        if all(k in keys for k in probe):
            return family
    return None


def _section(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _meta_json(meta: dict, name: str) -> dict:
    raw = meta.get(f"slimsd.{name}")
    return json.loads(raw) if raw else {}


def load_single_file(path: str, allow_pickle: bool = False, prediction_type: str | None = None):
    """The diffusers pipeline of a single-file checkpoint (weights in the file's dtype; tokenizers from the
    offline fixture when the vocabulary is its size, else from the family's hub repository)."""
    state, meta = read_file(path, allow_pickle)
    family = detect_family(state)
    if family is None:
        raise SlimsdError(f"{path!r}: layout not recognised; {EXPECTED}")
    try:
        return _build(path, family, state, meta, prediction_type)
    except (KeyError, IndexError, RuntimeError, json.JSONDecodeError) as e:  # a tensor missing or misshapen
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SlimsdError(f"{path!r}: an incomplete or inconsistent {family} checkpoint ({first})") from None


def _build(path: str, family: str, state: dict, meta: dict, prediction_type: str | None):
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from slimsd.models.presets import get_preset

    what = f"{path!r}"
    used = {UNET, VAE}
    preset = get_preset(HUB_FAMILY[family])
    encoders = []
    for i, (prefix, layout) in enumerate(TEXT[family]):
        used.add(prefix)
        part = _section(state, prefix)
        if family == "sd2":  # diffusers' SD 2.x encoder has no projection (the hidden states are used)
            part.pop("text_projection", None)
        bare = text_from_original(part, layout, drop_last=family == "sd2")
        cfg = read_text_config(bare, layout) | _meta_json(meta, f"text_encoder{'_2' if i else ''}_config")
        cls = CLIPTextModelWithProjection if "text_projection.weight" in bare else CLIPTextModel
        known = set(CLIPTextConfig().to_dict()) - {"dtype", "architectures", "transformers_version"}
        model = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if k in known}))
        model.load_state_dict(_dress(model, bare), strict=True)
        encoders.append(model)
    unused = [
        k for k in state if not k.startswith((*used, *TRAINING_ONLY)) and not k.endswith((*IGNORED, V_PRED))
    ]
    if unused:
        raise SlimsdError(f"{what}: tensor {unused[0]!r} belongs to no part; {EXPECTED}")

    ldm_unet = _section(state, UNET)
    unet_cfg = read_unet_config({k: tuple(v.shape) for k, v in ldm_unet.items()}, what)
    unet_cfg = {**_unet_defaults(family, unet_cfg, encoders), **_meta_json(meta, "unet_config"), **unet_cfg}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.load_state_dict(_rename(ldm_unet, unet_modules(unet_cfg), False, what), strict=True, assign=True)

    ldm_vae = _vae_attention_shapes(_section(state, VAE), to_conv=False)
    vae_cfg = read_vae_config({k: tuple(v.shape) for k, v in ldm_vae.items()})
    defaults = {
        k: v
        for k, v in preset.vae.items()
        if k in ("norm_num_groups", "scaling_factor", "sample_size", "force_upcast")
    }
    vae_cfg = {**defaults, **_meta_json(meta, "vae_config"), **vae_cfg}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_cfg)
    vae.load_state_dict(_rename(ldm_vae, vae_modules(vae_cfg), False, what), strict=True, assign=True)

    sched_cfg = _meta_json(meta, "scheduler_config") or dict(preset.scheduler)
    sched_cfg["prediction_type"] = _prediction_type(path, family, meta, state, prediction_type)
    scheduler = getattr(diffusers, sched_cfg.pop("_class_name")).from_config(sched_cfg)
    tokenizers = [_tokenizer(preset.hub_id, i, m.config.vocab_size) for i, m in enumerate(encoders)]
    for module in (unet, vae, *encoders):
        module.eval()  # as from_pretrained leaves them (training mode changes some kernels' numerics)
    return _pipeline(family, unet, vae, encoders, tokenizers, scheduler)


def _unet_defaults(family: str, cfg: dict, encoders: list) -> dict:
    """The published families' values of what no U-Net tensor shape holds."""
    channels = cfg["block_out_channels"]
    out = {"norm_num_groups": 32, "sample_size": 128 if family == "sdxl" else 64}
    out["attention_head_dim"] = 8 if family == "sd1" else [max(c // 64, 1) for c in channels]
    if cfg.get("addition_embed_type") == "text_time":
        pooled = encoders[-1].config.projection_dim
        out["addition_time_embed_dim"] = (cfg["projection_class_embeddings_input_dim"] - pooled) // 6
    return out


def _prediction_type(path: str, family: str, meta: dict, state: dict, given: str | None) -> str:
    """The option wins; else what slimsd wrote; SD 1.x and SDXL default to epsilon; an SD 2.x file without
    metadata must be told: 2.x-base is epsilon, the 768 px models are v_prediction, and no tensor differs."""
    value = given or meta.get("slimsd.prediction_type") or ("v_prediction" if V_PRED in state else None)
    if value is None and family == "sd2":
        raise SlimsdError(
            f"{path!r} is an SD 2.x checkpoint whose prediction type the file does not say: pass "
            "--prediction-type epsilon (2.x-base, 512 px) or v_prediction (2.x 768 px)"
        )
    return check_prediction_type(value or "epsilon")


def check_prediction_type(value: str) -> str:
    if value not in PREDICTION_TYPES:
        raise SlimsdError(f"prediction type {value!r}: allowed {', '.join(PREDICTION_TYPES)}")
    return value


def _tokenizer(hub_id: str, index: int, vocab_size: int):
    from slimsd.models.micro import load_tokenizer

    tok = load_tokenizer()
    if len(tok) == vocab_size:  # the micro models' offline tokenizer
        return tok
    from transformers import CLIPTokenizer

    sub = "tokenizer_2" if index else "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(hub_id, subfolder=sub)
    except OSError as e:
        raise SlimsdError(
            f"the tokenizer for this checkpoint comes from {hub_id}/{sub}: {hub_error_reason(e)}"
        ) from None


def _pipeline(family: str, unet, vae, encoders: list, tokenizers: list, scheduler):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# --- export ---------------------------------------------------------------------------------------------------


def pipeline_family(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    # OpenAI's CLIP (SD 1.x) uses quick_gelu; OpenCLIP (SD 2.x) uses gelu
    return "sd1" if pipe.text_encoder.config.hidden_act == "quick_gelu" else "sd2"


def original_state(pipe) -> tuple[dict, str]:
    """Every tensor of PIPE under its original single-file name, and the family."""
    family = pipeline_family(pipe)
    unet_cfg = dict(pipe.unet.config)
    out = {
        UNET + k: v for k, v in _rename(pipe.unet.state_dict(), unet_modules(unet_cfg), True, "U-Net").items()
    }
    vae = _rename(pipe.vae.state_dict(), vae_modules(dict(pipe.vae.config)), True, "VAE")
    out |= {VAE + k: v for k, v in _vae_attention_shapes(vae, to_conv=True).items()}
    models = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)][: len(TEXT[family])]
    for model, (prefix, layout) in zip(models, TEXT[family], strict=True):
        bare = _bare(model)
        if family == "sd2":  # what the tools expect of an OpenCLIP-H file; unused by SD 2.x itself
            bare["text_projection.weight"] = torch.eye(model.config.hidden_size, dtype=model.dtype)
        out |= {prefix + k: v for k, v in text_to_original(bare, layout, extra_layer=family == "sd2").items()}
    return out, family


def export_metadata(pipe, family: str, info: dict | None) -> dict[str, str]:
    """The header: what import needs beyond the shapes, and the student's provenance (strings only)."""
    from slimsd.version import __version__

    def config(module) -> str:
        cfg = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        return json.dumps(
            {
                k: v
                for k, v in cfg.items()
                if not k.startswith("_")
                and k not in ("architectures", "transformers_version", "id2label", "label2id")
            }
        )

    meta = {
        "slimsd.version": __version__,
        "slimsd.family": family,
        "slimsd.prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "slimsd.unet_config": config(pipe.unet),
        "slimsd.vae_config": config(pipe.vae),
        "slimsd.text_encoder_config": config(pipe.text_encoder),
        "slimsd.scheduler_config": json.dumps(
            {
                "_class_name": type(pipe.scheduler).__name__,
                **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
            }
        ),
    }
    if getattr(pipe, "text_encoder_2", None) is not None:
        meta["slimsd.text_encoder_2_config"] = config(pipe.text_encoder_2)
    if info:
        meta["slimsd.teacher"] = str(info.get("teacher", ""))
        meta["slimsd.recipe"] = json.dumps(info.get("recipe"))
        meta["slimsd.weight_map"] = json.dumps(info.get("weight_map") or {})
    return meta
