"""Exported folders (``slimsd export --to onnx|openvino``, ``slimsd quantize``) run by ONNX Runtime or OpenVINO.

The folder has the layout optimum's pipelines read (``model_index.json``, ``scheduler/``, ``tokenizer*/``,
``text_encoder*/``, ``unet/``, ``vae_decoder/``, ``vae_encoder/``, each part ``model.onnx`` or
``openvino_model.xml``/``.bin`` beside its ``config.json``) plus ``slimsd.json`` (``export``: backend, precision,
fixed shapes; a student's ``sampling``). :func:`load_exported` builds the plain diffusers pipeline class of the
model's family around small torch modules that call the runtime's sessions, so that every diffusers code path
slimsd uses (text-to-image, img2img, schedulers, seeds, SDXL's added conditions, LCM's guidance embedding) runs
unchanged: the sessions replace only the networks.

Sessions use torch's thread count (one per core by default; ``OMP_NUM_THREADS=1`` in tests) and print nothing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from slimsd.devices import cpu_default_dtype, dtype_name
from slimsd.errors import SlimsdError

BACKENDS = ("onnx", "openvino")
PART_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
# what each backend needs: (import name, pip name); all in slimsd's `deploy` extra
PACKAGES = {
    "onnx": [("onnx", "onnx"), ("onnxruntime", "onnxruntime")],
    "openvino": [("openvino", "openvino")],
}


def require(module: str, package: str | None = None):
    """Import ``module`` or raise the one line naming the package and the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlimsdError(
            f"{package or module} is not installed; it is needed here: pip install 'slimsd[deploy]' "
            f"(or pip install {package or module})"
        ) from None


def require_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise SlimsdError(f"unknown runtime {backend!r}; allowed: {', '.join(BACKENDS)}")
    for module, package in PACKAGES[backend]:
        require(module, package)


def exported_info(folder: str | Path) -> dict | None:
    """The ``export`` record of an exported folder (None for any other model)."""
    path = Path(folder) / "slimsd.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("export")
    except (ValueError, AttributeError):
        return None


def is_exported(model: str) -> bool:
    return Path(model).is_dir() and exported_info(model) is not None


def check_load_options(loras, compile: bool, device: str) -> None:
    """What an exported model cannot do at load: its weights are fixed in the graph, it runs on the CPU."""
    if loras:
        raise SlimsdError(
            "a LoRA cannot be merged into an exported model; export the model with the LoRA merged"
        )
    if compile:
        raise SlimsdError("--compile applies to torch models; an exported model is compiled by its runtime")
    if device != "cpu":
        raise SlimsdError(f"exported models run on the CPU here; device {device!r} is not supported for them")


# ---------------------------------------------------------------- sessions


def threads() -> int:
    return max(1, torch.get_num_threads())


KERNEL_DTYPES = ("fp32", "bf16")  # what an exported folder's float kernels may run in (OpenVINO's hint)
OV_HINT = {"fp32": "f32", "bf16": "bf16"}


def kernel_dtype(backend: str, precision: str, dtype: str | torch.dtype | None = None) -> str:
    """The dtype an exported folder's float kernels run in: OpenVINO's ``INFERENCE_PRECISION_HINT`` (its CPU
    plugin's own default on bf16 hardware is bf16, on others f32), set by slimsd's policy, not left to it.

    ``dtype`` given (``fp32`` | ``bf16``): that. Else (``None``/``auto``): an fp32 or fp16 export runs fp32 (the
    exact path: the torch image to float rounding), a bf16 export bf16, and an int8 one (``int8`` |
    ``int8-weights``) its non-quantised layers (kept layers, VAE, text encoder) in the CPU's auto dtype, as
    slimsd's torch side does (:func:`slimsd.devices.cpu_default_dtype`: bf16 with native bf16). ONNX Runtime
    runs fp32 only."""
    if dtype is not None and dtype != "auto":
        name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
        allowed = KERNEL_DTYPES if backend == "openvino" else ("fp32",)
        if name not in allowed:
            raise SlimsdError(
                f"dtype {name!r} is not supported for a {backend} export; allowed: {', '.join(allowed)}, auto"
            )
        return name
    if backend != "openvino":
        return "fp32"
    if precision.startswith("int8"):
        return cpu_default_dtype()
    return "bf16" if precision == "bf16" else "fp32"


class Session:
    """One network in a runtime: numpy inputs by name -> numpy outputs by name. ``kernels`` (fp32 | bf16,
    :func:`kernel_dtype`) is read back from the compiled model."""

    def __init__(self, path: Path, backend: str, kernels: str = "fp32"):
        self.backend = backend
        if backend == "openvino":
            ov = require("openvino")
            core = ov.Core()
            model = core.read_model(str(path))
            config = {"INFERENCE_PRECISION_HINT": OV_HINT[kernels], "INFERENCE_NUM_THREADS": threads()}
            config["PERFORMANCE_HINT"] = "LATENCY"
            self._compiled = core.compile_model(model, "CPU", config)
            self._request = self._compiled.create_infer_request()
            self.inputs = {_ov_name(i): _ov_dtype(i) for i in self._compiled.inputs}
            self.outputs = [_ov_name(o) for o in self._compiled.outputs]
            hint = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self.kernels = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(hint, hint)
        else:
            ort = require("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.inputs = {i.name: _ort_dtype(i.type) for i in self._session.get_inputs()}
            self.outputs = [o.name for o in self._session.get_outputs()]
            self.kernels = "fp32"

    def __call__(self, **inputs) -> dict[str, np.ndarray]:
        feed = {
            k: np.ascontiguousarray(_numpy(v), dtype=self.inputs[k])
            for k, v in inputs.items()
            if k in self.inputs
        }
        if self.backend == "openvino":
            # the request reads the inputs in place and its output buffers are copied once (the next call
            # overwrites them); as optimum-intel's parts do (share_inputs)
            result = self._request.infer(feed, share_inputs=True, share_outputs=True)
            return {name: np.array(result[i]) for i, name in enumerate(self.outputs)}
        return dict(zip(self.outputs, self._session.run(None, feed), strict=True))


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value)


def _ov_name(port) -> str:
    """The port's own name: a tensor converted from ONNX can also carry a graph-internal one (``/encoder/...``)."""
    names = sorted(port.get_names(), key=lambda n: (n.startswith("/"), len(n)))
    return names[0] if names else port.get_any_name()


def _ov_dtype(port) -> type:
    name = port.get_element_type().get_type_name()
    return {"i64": np.int64, "i32": np.int32, "f16": np.float16}.get(name, np.float32)


def _ort_dtype(type_name: str) -> type:
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float16)": np.float16}.get(
        type_name, np.float32
    )


# ---------------------------------------------------------------- the parts as diffusers sees them


class Part(torch.nn.Module):
    """A network in a session, standing where diffusers expects a torch module (it asks ``dtype``, ``device``
    and ``config``)."""

    def __init__(self, session: Session, config: dict):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.session = session
        self.config = FrozenDict(config)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def kernels(self) -> str:
        """The dtype its float kernels run in (fp32 | bf16); its inputs and outputs are float32 (``dtype``)."""
        return self.session.kernels

    def to(self, *args, **kwargs):  # the sessions stay where they are (diffusers casts a VAE, moves parts)
        return self


class UNetPart(Part):
    def __init__(self, session: Session, config: dict, shapes: dict):
        super().__init__(session, config)
        self.shapes = shapes  # fixed latent height/width and U-Net batch, when the export fixed them
        # SDXL's pipeline reads the added-embedding width from the module to check its time ids
        width = config.get("projection_class_embeddings_input_dim")
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
        added_cond_kwargs=None,
        return_dict=True,
        **_ignored,
    ):
        self.check_shape(sample)
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1]
        inputs = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        if timestep_cond is not None:
            inputs["timestep_cond"] = timestep_cond
        for key, value in (added_cond_kwargs or {}).items():
            inputs[key] = value
        out = torch.from_numpy(self.session(**inputs)["out_sample"])
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def check_shape(self, sample) -> None:
        want_batch = self.shapes.get("unet_batch")
        f = self.shapes["vae_scale"]
        check_size(self.shapes, sample.shape[-2] * f, sample.shape[-1] * f)
        if want_batch and sample.shape[0] != want_batch:
            raise SlimsdError(
                f"this export has a fixed batch: the U-Net takes {want_batch} latents per call, this run needs "
                f"{sample.shape[0]} (batch size x 2 with guidance); export with another --batch or none"
            )


def check_size(shapes: dict, height: int, width: int) -> None:
    """Refuse (one line) an image size other than the one a static export was fixed to."""
    want_hw = shapes.get("latent_hw")
    f = shapes["vae_scale"]
    if want_hw and (height, width) != (want_hw[0] * f, want_hw[1] * f):
        raise SlimsdError(
            f"this export has fixed shapes: {want_hw[1] * f}x{want_hw[0] * f} px only, {width}x{height} was "
            "asked; export again without --resolution (dynamic) or with this size"
        )


class TextOutput(tuple):
    """What diffusers reads from a text encoder's output: ``[0]`` and ``.hidden_states``."""

    hidden_states: tuple = ()
    last_hidden_state = None


class TextEncoderPart(Part):
    def forward(
        self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **_ignored
    ):
        result = self.session(input_ids=input_ids)
        first = torch.from_numpy(result[self.session.outputs[0]])
        second = torch.from_numpy(result[self.session.outputs[1]]) if len(self.session.outputs) > 1 else None
        out = TextOutput((first,) if second is None else (first, second))
        hidden = [torch.from_numpy(result[n]) for n in self.session.outputs if n.startswith("hidden_states")]
        out.hidden_states = tuple(hidden)
        out.last_hidden_state = torch.from_numpy(result["last_hidden_state"])
        return out


class VaePart(Part):
    """Decoder and (img2img) encoder, as ``AutoencoderKL``'s ``decode`` / ``encode``."""

    def __init__(self, decoder: Session, encoder: Session | None, config: dict, shapes: dict):
        super().__init__(decoder, config)
        self.encoder_session = encoder
        self.shapes = shapes  # an img2img image of another size than a static export's: refused, not run

    def decode(self, z, return_dict=True, **_ignored):
        out = torch.from_numpy(self.session(latent_sample=z)["sample"])
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def encode(self, x, return_dict=True):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder_session is None:
            raise SlimsdError(
                "this export has no VAE encoder (vae_encoder/): img2img needs one (an export with a tiny decoder, "
                "--vae, only decodes: export without --vae for img2img)"
            )
        check_size(self.shapes, x.shape[-2], x.shape[-1])
        params = torch.from_numpy(self.encoder_session(sample=x)["latent_parameters"])
        dist = DiagonalGaussianDistribution(params)
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)

    def forward(self, *args, **kwargs):
        return self.decode(*args, **kwargs)


# ---------------------------------------------------------------- the pipeline


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def part_file(folder: Path, part: str, backend: str) -> Path:
    path = folder / part / PART_FILES[backend]
    if not path.is_file():
        raise SlimsdError(
            f"exported folder {str(folder)!r} has no {part}/{PART_FILES[backend]}: not complete"
        )
    return path


def load_exported(folder: str | Path, dtype: str | torch.dtype | None = None):
    """The diffusers pipeline of an exported folder, its networks run by the folder's backend, their float
    kernels in :func:`kernel_dtype` of ``dtype``."""
    import diffusers
    from transformers import CLIPTokenizer

    folder = Path(folder)
    info = exported_info(folder)
    backend, precision = info["backend"], info["precision"]
    kernels = kernel_dtype(backend, precision, dtype)
    require_backend(backend)
    index = read_json(folder / "model_index.json")
    sdxl = "text_encoder_2" in index and index["text_encoder_2"][0] is not None

    def session(part: str) -> Session:
        return Session(part_file(folder, part, backend), backend, kernels)

    sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    unet_cfg = read_json(folder / "unet" / "config.json")
    vae_cfg = read_json(folder / "vae_decoder" / "config.json")
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    shapes = {"vae_scale": vae_scale, "unet_batch": info.get("unet_batch")}
    if info.get("resolution"):
        w, h = info["resolution"]
        shapes["latent_hw"] = [h // vae_scale, w // vae_scale]
        unet_cfg["sample_size"] = h // vae_scale  # the default size is the fixed one
    encoder = session("vae_encoder") if (folder / "vae_encoder").is_dir() else None
    parts = {
        "unet": UNetPart(session("unet"), unet_cfg, shapes),
        "vae": VaePart(session("vae_decoder"), encoder, vae_cfg, shapes),
        "text_encoder": TextEncoderPart(
            session("text_encoder"), read_json(folder / "text_encoder" / "config.json")
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "scheduler": scheduler,
    }
    if sdxl:
        parts["text_encoder_2"] = TextEncoderPart(
            session("text_encoder_2"), read_json(folder / "text_encoder_2" / "config.json")
        )
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        pipe = diffusers.StableDiffusionXLPipeline(
            **parts, force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True)
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return pipe


def runtime_record(folder: str | Path, pipe) -> dict:
    """The ``runtime`` object of an exported model: backend, the folder's precision, the dtype its float
    kernels run in (``dtype``, as the compiled networks report it), and the shapes it was fixed to."""
    info = exported_info(folder)
    return {
        "optimized": False,
        "backend": info["backend"],
        "precision": info["precision"],
        "device": "cpu",
        "dtype": pipe.unet.kernels,
        "resolution": info.get("resolution"),
        "batch": info.get("batch"),
        "threads": threads(),
    }
