"""PNG info: the parameters every image carries, written and read back.

Every PNG slimsd writes carries the AUTOMATIC1111 ``parameters`` text chunk ("PNG info": prompt,
``Negative prompt:``, ``Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …``), which A1111 and
other readers parse, and a ``slimsd`` JSON chunk with every setting, so :func:`settings_from_png` can
regenerate the image from the file alone (``slimsd generate --from-png``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from slimsd.devices import dtype_name, resolve_device, resolve_dtype
from slimsd.errors import SlimsdError
from slimsd.models.schedulers import SAMPLER_TO_SCHEDULER, sampler_name

PNG_JSON_KEY = "slimsd"


@dataclass
class Settings:
    """Everything that decides the pixels (plus the model), as stored in the PNG's JSON chunk."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = 0
    scheduler: str = "pndm"
    model: str = ""
    model_source: str | None = None
    batch_size: int = 1
    deep_cache: int = 1  # a full U-Net pass every N steps (slimsd.run.deepcache); 1: every step
    dtype: str = "fp32"
    device: str = "cpu"
    slimsd_version: str = ""
    time_s: float = 0.0  # this image's share of its batch's wall time
    loras: list = field(default_factory=list)  # LoRAs merged into the model (slimsd.models.lora records)
    vae: dict | None = None  # the tiny decoder used in place of the model's VAE: {"path", "sha256"}
    # img2img / inpainting: how far the init image is noised (A1111's "Denoising strength"), and the init image
    # and mask as slimsd.images.InputImage records (name, path, sha256); None for text-to-image
    strength: float | None = None
    init_image: dict | None = None
    mask: dict | None = None
    # {"path", "name", "scale", "image": InputImage record} of the ControlNet the image was made with
    controlnet: dict | None = None
    extra: dict = field(default_factory=dict)

    def a1111_parameters(self) -> str:
        """The AUTOMATIC1111 ``parameters`` chunk: prompt, negative prompt line, settings line."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        deep_cache = f"Deep cache: {self.deep_cache}, " if self.deep_cache > 1 else ""
        # A1111 writes the strength right after the model, its extras (LoRA, ControlNet) after that
        strength = f"Denoising strength: {_num(self.strength)}, " if self.strength is not None else ""
        controlnet = (
            "ControlNet 0: "
            + json.dumps(
                f"Module: none, Model: {self.controlnet['name']}, Weight: {_num(self.controlnet['scale'])}"
            )
            + ", "
            if self.controlnet
            else ""
        )
        lines.append(
            f"Steps: {self.steps}, Sampler: {sampler_name(self.scheduler)}, CFG scale: {_num(self.guidance)}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {_a1111_value(self.model)}, "
            f"{strength}{deep_cache}{controlnet}"
            + (f"Lora hashes: {json.dumps(lora_hashes(self.loras))}, " if self.loras else "")
            + (
                f"VAE hash: {self.vae['sha256'][:10]}, VAE: {_a1111_value(Path(self.vae['path']).name)}, "
                if self.vae
                else ""
            )
            + f"Version: slimsd {self.slimsd_version}"
        )
        return "\n".join(lines)


def lora_hashes(loras: list) -> str:
    """A1111's ``Lora hashes`` value: ``name: first 10 hex digits of the file's sha256``, comma separated."""
    return ", ".join(f"{r['name']}: {r['sha256'][:10]}" for r in loras)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _a1111_value(v: str) -> str:
    # A1111 values are comma separated; a model path with a comma would break parsers, so quote it then.
    return json.dumps(v) if ("," in v or ":" in v or '"' in v) else v


def png_bytes(image: Image.Image, settings: Settings | None = None, extra_json: dict | None = None) -> bytes:
    """PNG bytes with the A1111 ``parameters`` chunk and the ``slimsd`` JSON chunk (iTXt when not latin-1)."""
    info = PngInfo()
    if settings is not None:
        info.add_text("parameters", settings.a1111_parameters())
        info.add_text(PNG_JSON_KEY, json.dumps(asdict(settings), ensure_ascii=False, sort_keys=True))
    if extra_json is not None:
        info.add_text(PNG_JSON_KEY, json.dumps(extra_json, ensure_ascii=False, sort_keys=True))
    buf = BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_text(path: str | Path) -> dict[str, str]:
    """The PNG's text chunks (tEXt, iTXt, zTXt)."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"PNG file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise SlimsdError(
                    f"{str(path)!r} is a {im.format} file; a PNG written by slimsd or A1111 is expected"
                )
            return dict(getattr(im, "text", {}))
    except (OSError, SyntaxError) as e:
        raise SlimsdError(f"{str(path)!r} is not a readable image: {e}") from None


def parse_a1111(parameters: str) -> dict:
    """A1111's ``parameters`` text -> {prompt, negative_prompt, steps, guidance, width, height, seed, scheduler,
    model, deep_cache, strength} (the keys it has)."""
    lines = parameters.strip().split("\n")
    if not lines or not lines[-1].startswith("Steps:"):
        raise SlimsdError(
            "the PNG's 'parameters' chunk has no 'Steps: ...' line; it is not A1111-style metadata"
        )
    fields_ = dict(re.findall(r'\s*([\w ]+):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', lines[-1]))
    fields_ = {k.strip(): (json.loads(v) if v.startswith('"') else v.strip()) for k, v in fields_.items()}
    prompt, negative = [], []
    for line in lines[:-1]:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").lstrip())
        else:
            prompt.append(line)
    out: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    try:
        if "Steps" in fields_:
            out["steps"] = int(fields_["Steps"])
        if "CFG scale" in fields_:
            out["guidance"] = float(fields_["CFG scale"])
        if "Seed" in fields_:
            out["seed"] = int(fields_["Seed"])
        if "Size" in fields_:
            out["width"], out["height"] = (int(x) for x in fields_["Size"].split("x"))
        if "Deep cache" in fields_:
            out["deep_cache"] = int(fields_["Deep cache"])
        if "Denoising strength" in fields_:
            out["strength"] = float(fields_["Denoising strength"])
    except ValueError as e:
        raise SlimsdError(f"the PNG's 'parameters' chunk has a malformed value: {e}") from None
    if "Sampler" in fields_:
        sampler = fields_["Sampler"]
        if fields_.get("Schedule type") == "Karras" and f"{sampler} Karras" in SAMPLER_TO_SCHEDULER:
            sampler = f"{sampler} Karras"
        out["scheduler"] = SAMPLER_TO_SCHEDULER.get(sampler, sampler)
    if "Model" in fields_:
        out["model"] = fields_["Model"]
    return out


def settings_from_png(path: str | Path) -> dict:
    """The settings stored in a PNG: the ``slimsd`` JSON chunk if present, else A1111's ``parameters``."""
    text = read_png_text(path)
    if PNG_JSON_KEY in text:
        chunk = f"the {PNG_JSON_KEY!r} chunk of {str(path)!r}"
        try:
            data = json.loads(text[PNG_JSON_KEY])
        except json.JSONDecodeError as e:
            raise SlimsdError(f"{chunk} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise SlimsdError(f"{chunk} is a JSON {type(data).__name__}; a JSON object is expected")
        if "grid" in data:
            raise SlimsdError(f"{str(path)!r} is a grid; regenerate from one of its images instead")
        return _checked(data, path)
    if "parameters" in text:
        try:
            return parse_a1111(text["parameters"])
        except SlimsdError as e:
            raise SlimsdError(f"{str(path)!r}: {e}") from None
    raise SlimsdError(f"{str(path)!r} carries no generation metadata (no 'parameters' or 'slimsd' chunk)")


# The stored settings that decide the pixels, with the types they must have to be used again.
_STORED_TYPES = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "steps": (int,),
    "guidance": (int, float),
    "width": (int,),
    "height": (int,),
    "seed": (int,),
    "scheduler": (str,),
    "batch_size": (int,),
    "deep_cache": (int,),
    "model": (str,),
    "model_source": (str, type(None)),
    "loras": (list,),
    "vae": (dict, type(None)),
    "strength": (int, float, type(None)),
    "init_image": (dict, type(None)),
    "mask": (dict, type(None)),
    "controlnet": (dict, type(None)),
}


def _checked(data: dict, path) -> dict:
    """The JSON chunk's settings, refused with one line when one has the wrong type (a hand-edited file)."""
    for key, types in _STORED_TYPES.items():
        value = data.get(key)
        if key in data and (isinstance(value, bool) or not isinstance(value, types)):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise SlimsdError(
                f"the PNG's {PNG_JSON_KEY!r} chunk in {str(path)!r} has {key} = {value!r}; expected {allowed}"
            )
    return data


def model_to_reload(settings: dict) -> str:
    """Which MODEL string reloads the model a PNG names: a known name as is, else its recorded source."""
    from slimsd.models.presets import PRESETS

    model = settings.get("model") or ""
    if model in PRESETS:
        return model
    source = settings.get("model_source")
    if source and (Path(source).exists() or not Path(model).exists()):
        return source
    if not model:
        raise SlimsdError("the PNG names no model; pass MODEL on the command line")
    return model


def dtype_to_reload(settings: dict, device: str | None = None) -> tuple[str, str | None]:
    """The dtype to regenerate a PNG in, and a line for people where it is not this machine's own default.

    The recorded dtype where DEVICE runs it: an fp32 image reproduced on a CPU whose default is bf16 must run
    in fp32, or its pixels differ. Where DEVICE cannot (an fp16 GPU image on a CPU), this device's default, and
    the line says that pixels may differ. A PNG that records no dtype (A1111's text only): the default."""
    device = resolve_device(device)
    default = dtype_name(resolve_dtype("auto", device))
    recorded = settings.get("dtype")
    if not isinstance(recorded, str) or not recorded:
        return "auto", None
    try:
        resolve_dtype(recorded, device)
    except SlimsdError:
        return "auto", (
            f"the image was made in {recorded}, which {device} does not run here; using {default} instead: "
            "pixels may differ"
        )
    if dtype_name(resolve_dtype(recorded, device)) == default:
        return recorded, None
    return recorded, f"dtype {recorded}, as the image records ({default} is this machine's default)"


def loras_to_reload(settings: dict) -> list[tuple[str, float, str]]:
    """The LoRAs a PNG records, as (path, scale, sha256): each file must still exist (its hash is checked
    when it is loaded)."""
    out = []
    for entry in settings.get("loras") or []:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("path"), str)
            and isinstance(entry.get("sha256"), str)
        )
        scale = entry.get("scale") if isinstance(entry, dict) else None
        if not ok or isinstance(scale, bool) or not isinstance(scale, int | float):
            raise SlimsdError(
                f"the PNG's {PNG_JSON_KEY!r} chunk has a LoRA entry {entry!r}; expected path, scale and sha256"
            )
        if not Path(entry["path"]).is_file():
            raise SlimsdError(
                f"the image was made with LoRA file {entry['path']!r}, which does not exist any more; restore "
                "it, or choose LoRAs with --lora"
            )
        out.append((entry["path"], float(scale), entry["sha256"]))
    return out


def vae_to_reload(settings: dict) -> str | None:
    """The tiny decoder (folder or TAESD-layout file) a PNG records (None: the model's own VAE), when it is still
    at its recorded path with its recorded weights (pixel-equal regeneration needs the very same decoder)."""
    from slimsd.files import file_sha256
    from slimsd.models.decoders import weights_file

    record = settings.get("vae")
    if record is None:
        return None
    if not (isinstance(record.get("path"), str) and isinstance(record.get("sha256"), str)):
        raise SlimsdError(f"the PNG's {PNG_JSON_KEY!r} chunk has vae = {record!r}; expected path and sha256")
    path = Path(record["path"])
    try:
        weights = weights_file(path)
    except SlimsdError:
        raise SlimsdError(
            f"the image was decoded by the tiny decoder {str(path)!r}, which is not there any more; restore it, "
            "or give one with --vae PATH"
        ) from None
    found = file_sha256(weights)
    if found != record["sha256"]:
        raise SlimsdError(
            f"decoder {str(path)!r} has changed: its weights' sha256 is {found[:10]}..., the image was decoded "
            f"with {record['sha256'][:10]}...; restore it, or give one with --vae PATH"
        )
    return str(path)


def input_to_reload(settings: dict, key: str, what: str, option: str):
    """The file a PNG's ``init_image`` / ``mask`` record (KEY) names, as an InputImage, when it is still at its
    recorded path with its recorded sha256; None when the image had none. Pixel-equal regeneration needs the
    very same file: a changed or missing one is refused, and OPTION gives one again."""
    from slimsd.images import read_input_image

    record = settings.get(key)
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("sha256"), str)):
        raise SlimsdError(
            f"the PNG's {PNG_JSON_KEY!r} chunk has {key} = {record!r}; expected name, path, sha256"
        )
    path = record.get("path")
    if not isinstance(path, str) or not Path(path).is_file():
        raise SlimsdError(
            f"the image was made from {what} {record.get('name')!r}, which is not at its recorded path "
            f"{path!r}; give it with {option} FILE"
        )
    found = read_input_image(path, what)
    if found.sha256 != record["sha256"]:
        raise SlimsdError(
            f"{what} {path!r} has changed: its sha256 is {found.sha256[:10]}..., the image was made with "
            f"{record['sha256'][:10]}...; restore that file, or give one with {option} FILE"
        )
    return found
