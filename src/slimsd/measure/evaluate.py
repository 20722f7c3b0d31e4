"""Image quality and text alignment of text-to-image models: FID, IS and CLIP score over a prompt set.

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to Inception pool3 features of the
  generated and the reference images. Images are resized to the network's input the *clean* way (Parmar et
  al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"): PIL bicubic on each channel in
  float, not a bilinear tensor interpolation, which aliases and shifts FID by whole points.
- IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.
- CLIP score (Hessel et al. 2021): 100 * mean max(cos(image, text), 0) of CLIP embeddings.

The MS-COCO 30K protocol of BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion") is a named preset: 30K val2014 captions, 512 px, PNDM 25 steps, guidance 7.5, seed 1234,
images scored after a PIL bicubic resize to 256 px.

Each model's images live in a folder named from its identity (resolved path, hub id or name, plus a hash), so
two models never share images. Generation is resumable (an existing image is reused only when its PNG info says
it was made by this model with this run's settings, else it is made again; each is written atomically) and
shardable: image *i* always uses seed S+i, whichever process makes it, so ``--shard k/n`` runs fill one folder
with exactly the images a single run would make. The feature extractors are swappable (``stand-in`` ones run
offline).
"""

from __future__ import annotations

import base64
import csv
import datetime
import hashlib
import html
import io
import json
import platform
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slimsd.atomic import atomic_write_bytes, atomic_write_text
from slimsd.errors import SlimsdError, unknown
from slimsd.images import IMAGE_SUFFIXES
from slimsd.measure.protocols import DEFAULT_CLIP, FID_EXTRACTORS, PROTOCOLS
from slimsd.models.loading import native_resolution
from slimsd.run.outputs import safe_stem

CAPTION_COLUMNS = ("caption", "text", "prompt")
ID_COLUMNS = ("id", "file_name", "image_id", "filename")


# ---------------------------------------------------------------------------------------------------------------
# Metrics: plain numpy on features, logits and embeddings.


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as in the reference FID code) of N x D features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise SlimsdError(f"FID needs at least 2 images; got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), the Fréchet distance between two Gaussians."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SlimsdError(
            f"feature statistics do not match: {mu1.shape} vs {mu2.shape} (different extractors?)"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns on singular products, which are expected and handled here
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # Fewer images than feature dimensions make S1 S2 singular: regularise both, as pytorch-fid does.
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # sqrtm of a product of PSD matrices is real up to rounding; drop the tiny imaginary part.
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` of exp(E_x KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, dtype=np.float64)
    if len(logits) < splits:
        raise SlimsdError(f"IS with {splits} splits needs at least {splits} images; got {len(logits)}")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(logp, splits):
        p = np.exp(part)
        log_marginal = np.log(p.mean(axis=0) + 1e-30)
        kl = (p * (part - log_marginal)).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def clip_score(image_embeds, text_embeds) -> float:
    """100 * mean over pairs of max(cosine similarity, 0); row i of each input is one pair."""
    a = torch.as_tensor(np.asarray(image_embeds), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(text_embeds), dtype=torch.float64)
    if a.shape != b.shape:
        raise SlimsdError(f"CLIP score needs one text per image; got {tuple(a.shape)} and {tuple(b.shape)}")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """``mu``/``sigma`` in an .npz (the pytorch-fid layout, so its files are read here and ours there)."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, **{k: np.asarray(str(v)) for k, v in meta.items()})
    return atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | Path, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` (D) and ``sigma`` (D x D) from an .npz; D must be ``dim`` when given (the extractor's features)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise SlimsdError(f"{str(path)!r} is not an .npz with 'mu' and 'sigma' arrays: {e}") from None
    if (
        mu.ndim != 1
        or sigma.shape != (len(mu), len(mu))
        or not np.issubdtype(mu.dtype, np.number)
        or not np.issubdtype(sigma.dtype, np.number)
    ):
        raise SlimsdError(
            f"{str(path)!r} holds mu {mu.shape} {mu.dtype} and sigma {sigma.shape} {sigma.dtype}; "
            "expected numbers, mu of shape (D,) and sigma of shape (D, D)"
        )
    if dim is not None and len(mu) != dim:
        raise SlimsdError(
            f"{str(path)!r} holds statistics of {len(mu)} features; this FID extractor gives {dim} "
            "(statistics of another extractor?)"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise SlimsdError(f"{str(path)!r} holds NaN or infinite values in mu or sigma")
    return mu, sigma


# ---------------------------------------------------------------------------------------------------------------
# Images in: resizing and feature extraction.


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """The protocol's scoring size: PIL bicubic on 8-bit RGB (what BK-SDM saved as its 256 px images)."""
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def clean_resize(image: Image.Image, size: int) -> np.ndarray:
    """size x size x 3 float32 in [0, 255]: PIL bicubic per channel in float mode (clean-fid's "clean" resize),
    so no rounding to 8 bits after resampling and no aliasing from a tensor interpolation."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    if arr.shape[:2] == (size, size):
        return arr
    channels = [
        np.asarray(Image.fromarray(arr[..., c], mode="F").resize((size, size), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def load_fid_extractor(name: str = "inception-v3", weights: str | None = None, allow_pickle: bool = False):
    """A module mapping B x 3 x S x S images in [0, 1] to (features B x D, logits); S is its ``input_size``, D
    its ``feature_dim``."""
    from slimsd.measure import inception

    if name == "inception-v3":
        return inception.load_inception(weights, allow_pickle)
    if name == "stand-in":
        return inception.StandInExtractor()
    raise unknown("FID extractor", name, FID_EXTRACTORS)


@torch.no_grad()
def extract(
    extractor, images: Iterable[Image.Image], batch_size: int = 32, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N x D) and logits (N x C) of ``images``, resized cleanly to the extractor's input size."""
    extractor = extractor.to(device)
    feats, logits, batch = [], [], []

    def flush():
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device) / 255.0
        f, lg = extractor(x)
        feats.append(f.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
        batch.clear()

    for image in images:
        batch.append(clean_resize(image, extractor.input_size))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        return np.zeros((0, 0)), np.zeros((0, 0))
    return np.concatenate(feats), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------------------------
# CLIP: a real transformers CLIPModel, or a tiny random one built offline.


@dataclass
class Clip:
    model: object
    tokenizer: object
    image_processor: object
    name: str


def load_clip(name: str = DEFAULT_CLIP, device: str = "cpu") -> Clip:
    """CLIP from a hub id or local folder (safetensors only), or ``stand-in``: a tiny random CLIPModel with
    the fixture tokenizer (offline; its scores mean nothing outside one run)."""
    from transformers import AutoTokenizer, CLIPModel

    try:  # the PIL processor: the default one wants torchvision, which is not installed beside this torch
        from transformers import CLIPImageProcessorPil as processor_cls
    except ImportError:
        from transformers import CLIPImageProcessor as processor_cls
    if name == "stand-in":
        from transformers import CLIPConfig

        from slimsd.models.micro import load_tokenizer, micro_text_config

        tokenizer = load_tokenizer()
        vision = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        }
        config = CLIPConfig(text_config=micro_text_config(tokenizer), vision_config=vision, projection_dim=32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPModel(config)
        processor = processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        try:
            model = CLIPModel.from_pretrained(name, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(name)
            processor = processor_cls.from_pretrained(name)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SlimsdError(
                f"could not load CLIP model {name!r}: {first}; --clip-model stand-in runs "
                "offline (scores not comparable), --clip-model none skips the CLIP score"
            ) from None
    return Clip(model.eval().requires_grad_(False).to(device), tokenizer, processor, name)


def _embedding(out) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_embed_images(clip: Clip, images: Sequence[Image.Image]) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    pixels = clip.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
        "pixel_values"
    ]
    return _embedding(clip.model.get_image_features(pixel_values=pixels.to(device))).float().cpu()


@torch.no_grad()
def clip_embed_texts(clip: Clip, texts: Sequence[str]) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    tokens = clip.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
    return _embedding(clip.model.get_text_features(**tokens)).float().cpu()


# ---------------------------------------------------------------------------------------------------------------
# Prompts and generation.


@dataclass
class Prompt:
    index: int  # row in the prompt file: image ``index`` uses seed S + index
    id: str  # file stem of its image (sanitised)
    caption: str


def read_prompts(
    path: str | Path,
    caption_column: str | None = None,
    id_column: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from a CSV with a header: a caption column (``caption``/``text``/``prompt`` unless named) and an
    optional id column (``id``/``file_name``/``image_id``), which names the image file (sanitised)."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"prompt file {str(path)!r} does not exist")
    try:
        return _read_prompts(path, caption_column, id_column, limit)
    except UnicodeDecodeError:
        # The reader's offset counts within its buffer: decode the whole file to name the place.
        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise SlimsdError(
                f"prompt file {str(path)!r} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}); "
                "save it as UTF-8"
            ) from None
        raise
    except csv.Error as e:
        raise SlimsdError(f"prompt file {str(path)!r} is not a readable CSV: {e}") from None


def _read_prompts(path: Path, caption_column, id_column, limit) -> list[Prompt]:
    # utf-8-sig: the byte-order mark a spreadsheet may write is not part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if caption_column is None:
            caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
            if caption_column is None:
                raise SlimsdError(
                    f"prompt file {str(path)!r} has no caption column: columns {columns}; "
                    f"expected one of {', '.join(CAPTION_COLUMNS)} or --caption-column"
                )
        elif caption_column not in columns:
            raise SlimsdError(f"caption column {caption_column!r} not in {str(path)!r}; columns: {columns}")
        if id_column is None:
            id_column = next((c for c in ID_COLUMNS if c in columns), None)
        elif id_column not in columns:
            raise SlimsdError(f"id column {id_column!r} not in {str(path)!r}; columns: {columns}")
        prompts, seen = [], set()
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            value = row[id_column] or "" if id_column else ""
            pid = safe_stem(
                Path(value).stem if "." in value else value,
                120,
                keep="._-",
                sep="_",
                lower=False,
                fallback="",
            )
            pid = pid or f"{i:06d}"
            if pid in seen:
                raise SlimsdError(
                    f"id {pid!r} appears twice in {str(path)!r} (row {i + 2}); ids name image files"
                )
            seen.add(pid)
            prompts.append(Prompt(i, pid, row[caption_column] or ""))
    if not prompts:
        raise SlimsdError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def parse_shard(text: str | None) -> tuple[int, int]:
    """``k/n`` -> (k, n) with 0 <= k < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise SlimsdError(f"bad --shard {text!r}: expected k/n with 0 <= k < n, e.g. 0/4")
    return int(m[1]), int(m[2])


def model_slug(source: str) -> str:
    """The folder of a model's images, named from its identity (:func:`slimsd.models.loading.model_source`: a
    local folder's resolved path, a hub id, a micro or preset name): a readable tail and 8 hex digits of the
    identity's sha256, so two folders both called ``final`` never share images."""
    tail = "_".join(Path(source).parts[-2:]) if Path(source).is_absolute() else source
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:8]
    return f"{safe_stem(tail, 60, keep='._-', sep='_', lower=False, fallback='model')}-{digest}"


@dataclass
class GenSettings:
    steps: int | None = 25  # None: the model's own (a step-distilled student's, else 25)
    guidance: float | None = 7.5  # None: the model's own (else 7.5)
    seed: int = 0
    resolution: int | None = None  # None: the model's own
    scheduler: str | None = None  # None: the model's own (names: slimsd.run.generate.SCHEDULERS)
    batch_size: int = 1
    dtype: str = "fp32"  # the pipeline's, as slimsd.devices names it
    deep_cache: int = 1  # slimsd.run.deepcache's interval; 1: off
    loras: list = field(default_factory=list)  # [[sha256, scale], ...] of the LoRAs merged into the model


def own_settings(settings: GenSettings, model: str) -> GenSettings:
    """``settings`` with the steps and guidance left open filled from MODEL's own (a step-distilled student
    samples in 4 steps, a teacher in 25)."""
    from dataclasses import replace

    from slimsd.models.loading import model_sampling
    from slimsd.run.generate import sampling_defaults

    own = sampling_defaults(model_sampling(model))
    return replace(
        settings,
        steps=own["steps"] if settings.steps is None else settings.steps,
        guidance=own["guidance"] if settings.guidance is None else settings.guidance,
    )


def image_path(folder: Path, prompt: Prompt) -> Path:
    return folder / f"{prompt.id}.png"


def wanted_settings(prompt: Prompt, settings: GenSettings, source: str) -> dict:
    """What the PNG info of prompt's image must hold for the image to be reused: the model, the prompt and every
    setting that decides the pixels. A size or scheduler left to the model is stored as asked (``eval_*``
    None), since the same model always gives the same one; an explicit one must also be what the image has."""
    want = {
        "model_source": source,
        "prompt": prompt.caption,
        "negative_prompt": "",
        "steps": settings.steps,
        "guidance": float(settings.guidance),
        "seed": settings.seed + prompt.index,
        "dtype": settings.dtype,
        "deep_cache": settings.deep_cache,
        "eval_resolution": settings.resolution,
        "eval_scheduler": settings.scheduler,
    }
    if settings.resolution:
        want["width"] = want["height"] = settings.resolution
    if settings.scheduler:
        want["scheduler"] = settings.scheduler
    if settings.loras:
        want["eval_loras"] = settings.loras
    return want


def differing_setting(path: Path, want: dict) -> str | None:
    """None when the image at PATH was made as WANT says; else the first setting that differs ('missing' when
    there is no image, 'unreadable' when its PNG info cannot be read)."""
    from slimsd.run.pnginfo import settings_from_png

    if not path.is_file():
        return "missing"
    try:
        stored = settings_from_png(path)
    except SlimsdError:
        return "unreadable"
    extra = stored.get("extra")
    # an image from before deep-cache existed was made without it
    stored = {"deep_cache": 1, **stored, **(extra if isinstance(extra, dict) else {})}
    return next((key for key, value in want.items() if key not in stored or stored[key] != value), None)


def plan_images(
    prompts: Sequence[Prompt],
    folder: Path,
    settings: GenSettings,
    source: str,
    shard: tuple[int, int] = (0, 1),
) -> tuple[list[Prompt], dict]:
    """The prompts of this shard whose image must be made (missing, or made with other settings), and the counts:
    ``reused``, ``regenerated`` (an image was there, made otherwise), ``generated`` (both kinds of new images),
    ``differing`` (regenerated images by the first setting that differed) and ``in_shard``."""
    k, n = shard
    mine = [p for p in prompts if p.index % n == k]
    todo, differing = [], {}
    for p in mine:
        key = differing_setting(image_path(folder, p), wanted_settings(p, settings, source))
        if key is not None:
            todo.append(p)
        if key not in (None, "missing"):
            differing[key] = differing.get(key, 0) + 1
    counts = {
        "generated": len(todo),
        "reused": len(mine) - len(todo),
        "regenerated": sum(differing.values()),
        "differing": differing,
        "in_shard": len(mine),
    }
    return todo, counts


def generate_missing(
    pipe,
    prompts: Sequence[Prompt],
    folder: str | Path,
    settings: GenSettings,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Generate the image of each of ``prompts`` into ``folder`` (the ones :func:`plan_images` names).

    Prompt i uses seed S+i (:func:`slimsd.run.generate.generate`'s per-prompt seeds), so an image does not
    depend on the sharding or on what was generated before (nor, beyond float rounding, on the batch size).
    Each batch's PNGs are written atomically as soon as they are made, with their PNG info and the size and
    scheduler asked for, so a killed run leaves only whole images, each checked before it is reused.
    """
    from slimsd.run import generate as gen
    from slimsd.run.pnginfo import png_bytes

    folder = Path(folder)
    size = settings.resolution or native_resolution(pipe)  # generate() validates every setting
    asked = {"eval_resolution": settings.resolution, "eval_scheduler": settings.scheduler}
    if settings.loras:
        asked["eval_loras"] = settings.loras
    done = 0
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        results = gen.generate(
            pipe,
            [p.caption for p in batch],
            steps=settings.steps,
            guidance=settings.guidance,
            width=size,
            height=size,
            batch_size=settings.batch_size,
            scheduler=settings.scheduler,
            seeds=[settings.seed + p.index for p in batch],
            deep_cache=settings.deep_cache,
            on_warning=lambda _msg: None,  # long COCO captions are cut at 77 tokens, as in the protocol
        )
        for p, r in zip(batch, results, strict=True):
            r.settings.extra = dict(asked)
            atomic_write_bytes(image_path(folder, p), png_bytes(r.image, r.settings))
        done += len(batch)
        if progress:
            progress(done, len(prompts))
    return done


# ---------------------------------------------------------------------------------------------------------------
# Scoring.


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SlimsdError(
            f"reference {str(folder)!r} is neither a folder of images nor an .npz of statistics"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise SlimsdError(f"reference folder {str(folder)!r} holds {len(files)} images; FID needs at least 2")
    return files


def _open(paths: Iterable[Path], size: int | None) -> Iterable[Image.Image]:
    """Each image as RGB (resized when ``size``); an unreadable one stops the run with one line naming it: a
    reference or a model's image set that silently shrank would change the scores."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise SlimsdError(f"image {str(p)!r} is not readable ({e}); remove or replace it") from None
        yield resize_square(im, size) if size else im


def reference_statistics(
    reference: str | Path, extractor, score_resolution: int | None, batch_size: int = 32, device: str = "cpu"
) -> dict:
    """mu, sigma and provenance of a reference: an .npz of statistics or a folder of images."""
    reference = Path(reference)
    if reference.suffix == ".npz":
        mu, sigma = load_stats(reference, getattr(extractor, "feature_dim", None))
        return {"mu": mu, "sigma": sigma, "source": str(reference), "num_images": None}
    files = list_images(reference)
    feats, _ = extract(extractor, _open(files, score_resolution), batch_size, device)
    mu, sigma = feature_statistics(feats)
    return {"mu": mu, "sigma": sigma, "source": str(reference), "num_images": len(files)}


def score_images(
    paths: Sequence[Path],
    captions: Sequence[str],
    extractor,
    clip: Clip | None,
    reference: dict | None,
    score_resolution: int | None,
    is_splits: int = 10,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict:
    """FID (if a reference), IS and CLIP score (if a CLIP model) of one model's images."""
    feats, logits = extract(extractor, _open(paths, score_resolution), batch_size, device)
    splits = min(is_splits, len(paths))  # a handful of images cannot fill 10 splits; recorded in the result
    is_mean, is_std = inception_score(logits, splits)
    result = {
        "num_images": len(paths),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "is_splits": splits,
        "fid": None,
        "clip_score": None,
    }
    mu, sigma = feature_statistics(feats)
    if reference is not None:
        result["fid"] = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    if clip is not None:
        image_embeds, text_embeds = [], []
        for start in range(0, len(paths), batch_size):
            image_embeds.append(
                clip_embed_images(clip, list(_open(paths[start : start + batch_size], score_resolution)))
            )
            text_embeds.append(clip_embed_texts(clip, captions[start : start + batch_size]))
        result["clip_score"] = clip_score(torch.cat(image_embeds), torch.cat(text_embeds))
    result["_stats"] = (mu, sigma)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The whole evaluation.


@dataclass
class EvalConfig:
    models: list[str]
    prompts: str
    out: str
    reference: str | None = None
    protocol: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    resolution: int | None = None
    score_resolution: int | None = None
    scheduler: str | None = None
    deep_cache: int | None = None  # None: 1 (off)
    num_prompts: int | None = None
    caption_column: str | None = None
    id_column: str | None = None
    batch_size: int = 1
    score_batch_size: int = 32
    shard: str | None = None
    score_only: bool = False
    fid_extractor: str = "inception-v3"
    inception_weights: str | None = None
    clip_model: str | None = DEFAULT_CLIP  # None: no CLIP score
    is_splits: int = 10
    save_stats: bool = False
    save_reference_stats: str | None = None
    grid: int = 8
    device: str | None = None
    dtype: str | None = None
    optimize: bool = True  # the fast runtime (slimsd.models.runtime)
    random_weights: bool = False
    allow_pickle: bool = False
    prediction_type: str | None = None  # None: each model's own
    loras: Sequence = ()  # LoRA files ("FILE[:SCALE]") merged into every model (slimsd.models.lora)


def resolve(config: EvalConfig) -> EvalConfig:
    """Fill unset settings from the protocol, then from the defaults; explicit options win."""
    if config.protocol is not None and config.protocol not in PROTOCOLS:
        raise unknown("protocol", config.protocol, PROTOCOLS)
    preset = PROTOCOLS.get(config.protocol, {})
    defaults = {"seed": 0}  # steps and guidance: each model's own (run_eval), unless a protocol fixes them
    for key in ("steps", "guidance", "seed", "resolution", "score_resolution", "scheduler", "num_prompts"):
        if getattr(config, key) is None:
            setattr(config, key, preset.get(key, defaults.get(key)))
    config.deep_cache = 1 if config.deep_cache is None else config.deep_cache  # no protocol sets it
    from slimsd.devices import dtype_name, resolve_device, resolve_dtype
    from slimsd.models.schedulers import check_scheduler

    check_scheduler(config.scheduler)
    config.device = resolve_device(config.device)
    config.dtype = dtype_name(resolve_dtype(config.dtype, config.device))
    if not config.models:
        raise SlimsdError("no models to evaluate: pass --models MODEL (repeat it to compare models)")
    return config


def run_eval(config: EvalConfig, log: Callable[[str], None] = print) -> dict:
    """Generate what is missing, score every model, write ``scores.json`` and ``report.html`` into ``out``.

    With a shard (k/n with n > 1), only that shard's images are generated; scoring is left to a final run
    without ``--shard`` (or with ``--score-only``) once all shards are done.
    """
    from slimsd.models.loading import model_source
    from slimsd.models.lora import as_spec, file_sha256
    from slimsd.run import generate as gen

    config = resolve(config)
    shard = parse_shard(config.shard)
    prompts = read_prompts(config.prompts, config.caption_column, config.id_column, config.num_prompts)
    out = Path(config.out)
    settings = base_settings = GenSettings(
        config.steps,
        config.guidance,
        config.seed,
        config.resolution,
        config.scheduler,
        config.batch_size,
        config.dtype,
        config.deep_cache,
    )
    # Everything that can be checked before hours of work is checked here, each with one line.
    gen.validate(
        steps=gen.DEFAULT_STEPS if settings.steps is None else settings.steps,
        guidance=gen.DEFAULT_GUIDANCE if settings.guidance is None else settings.guidance,
        width=settings.resolution or 64,
        height=settings.resolution or 64,
        seed=settings.seed,
        batch_size=settings.batch_size,
        scheduler=settings.scheduler,
        deep_cache=settings.deep_cache,
    )
    if settings.seed + prompts[-1].index > gen.MAX_SEED:
        raise SlimsdError(
            f"seed {settings.seed} + {prompts[-1].index} prompts passes {gen.MAX_SEED}; use a smaller --seed"
        )
    if len(prompts) < 2:
        raise SlimsdError(
            f"prompt file {config.prompts!r} gives 1 prompt; FID and IS need at least 2 images per model"
        )
    for folder in (out, Path(config.save_reference_stats or out).parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimsdError(f"cannot create folder {str(folder)!r}: {e.strerror or e}") from None
    sources = [model_source(m, config.random_weights) for m in config.models]  # an unknown model: now
    loras = [as_spec(spec, config.allow_pickle) for spec in config.loras]  # a bad LoRA file: now
    settings.loras = [[file_sha256(spec.path), spec.scale] for spec in loras]
    # A model with LoRAs is another model: its images get their own folder.
    with_loras = "".join(f"+lora:{sha[:10]}x{scale:g}" for sha, scale in settings.loras)
    slugs = [model_slug(source + with_loras) for source in sources]
    if config.reference is not None and not Path(config.reference).exists():
        raise SlimsdError(f"reference {config.reference!r} does not exist (a folder of images or an .npz)")

    extractor = clip = reference = None
    if shard[1] == 1:  # the scorers and the reference first: a bad file should not wait for the generation
        extractor = load_fid_extractor(config.fid_extractor, config.inception_weights, config.allow_pickle)
        clip = load_clip(config.clip_model, config.device) if config.clip_model else None
        if config.reference is not None:
            log(f"reference statistics from {config.reference}")
            reference = reference_statistics(
                config.reference, extractor, config.score_resolution, config.score_batch_size, config.device
            )
            if config.save_reference_stats:
                save_stats(
                    config.save_reference_stats,
                    reference["mu"],
                    reference["sigma"],
                    extractor=config.fid_extractor,
                    score_resolution=config.score_resolution,
                )

    generation = {}
    for model, source, slug in zip(config.models, sources, slugs, strict=True):
        folder = out / "images" / slug
        settings = own_settings(base_settings, model)
        todo, counts = plan_images(prompts, folder, settings, source, shard)
        generation[model] = {**counts, "steps": settings.steps, "guidance": settings.guidance}
        if todo and config.score_only:
            first = differing_setting(image_path(folder, todo[0]), wanted_settings(todo[0], settings, source))
            raise SlimsdError(
                f"{len(todo)} images of {model!r} in {str(folder)!r} are missing or were made with other "
                f"settings (first: {todo[0].id}.png, {first}); run without --score-only, or finish every shard"
            )
        if not todo:
            continue
        if counts["regenerated"]:
            log(
                f"{model}: {counts['regenerated']} images in {folder} were made with other settings "
                f"({', '.join(f'{k}: {n}' for k, n in counts['differing'].items())}); making them again"
            )
        pipe = _load(model, config, log)
        log(f"{model}: generating {len(todo)} images into {folder}")
        generate_missing(pipe, todo, folder, settings)
        del pipe
    if shard[1] > 1:
        return {"shard": f"{shard[0]}/{shard[1]}", "generation": generation}

    rows = []
    for model, source, slug in zip(config.models, sources, slugs, strict=True):
        folder = out / "images" / slug
        log(f"{model}: scoring {len(prompts)} images")
        scores = score_images(
            [image_path(folder, p) for p in prompts],
            [p.caption for p in prompts],
            extractor,
            clip,
            reference,
            config.score_resolution,
            config.is_splits,
            config.score_batch_size,
            config.device,
        )
        mu, sigma = scores.pop("_stats")
        if config.save_stats:
            save_stats(out / "stats" / f"{slug}.npz", mu, sigma, model=model, extractor=config.fid_extractor)
        own = {k: generation[model][k] for k in ("steps", "guidance")}  # each model's, when left open
        rows.append({"model": model, "model_source": source, "images": f"images/{slug}", **own, **scores})

    result = {
        "protocol": config.protocol,
        "settings": {
            **_settings(config, prompts, reference, extractor),
            "loras": [
                {"path": str(Path(spec.path).resolve()), "scale": spec.scale, "sha256": sha}
                for spec, (sha, _) in zip(loras, settings.loras, strict=True)
            ],
        },
        "models": rows,
        "generation": generation,
        "environment": _environment(config),
    }
    atomic_write_text(out / "scores.json", json.dumps(result, indent=1))
    atomic_write_text(out / "report.html", render_report(result, out, prompts[: config.grid]))
    return result


def _load(model: str, config: EvalConfig, log: Callable[[str], None]):
    from slimsd.models.loading import load

    return load(
        model,
        device=config.device,
        dtype=config.dtype,
        scheduler=config.scheduler,
        optimize=config.optimize,
        allow_pickle=config.allow_pickle,
        random_weights=config.random_weights,
        loras=config.loras,
        on_warning=lambda message: log(f"{model}: warning: {message}"),
        prediction_type=config.prediction_type,
    )


def _settings(config: EvalConfig, prompts, reference, extractor) -> dict:
    return {
        "prompts": str(config.prompts),
        "num_prompts": len(prompts),
        "steps": config.steps,
        "guidance": config.guidance,
        "seed": config.seed,
        "seeds": "seed + prompt index",
        "resolution": config.resolution,
        "score_resolution": config.score_resolution,
        "scheduler": config.scheduler,
        "deep_cache": config.deep_cache,
        "fid_extractor": config.fid_extractor,
        "fid_input_size": extractor.input_size,
        "fid_resize": "clean (PIL bicubic per channel, float)",
        "inception_weights": config.inception_weights,
        "clip_model": config.clip_model,
        "is_splits": config.is_splits,
        "reference": None if reference is None else reference["source"],
        "reference_images": None if reference is None else reference["num_images"],
    }


def _environment(config: EvalConfig) -> dict:
    import diffusers
    import transformers

    return {
        "device": config.device,
        "dtype": config.dtype,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------------------
# The HTML report: one self-contained file (images inlined as base64).

METRICS = (  # key, column title, format; the table shows exactly these strings
    ("fid", "FID ↓", "{:.3f}"),
    ("inception_score", "IS ↑", "{:.3f}"),
    ("inception_score_std", "IS std", "{:.3f}"),
    ("clip_score", "CLIP score ↑", "{:.3f}"),
    ("num_images", "images", "{}"),
)

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}td.num{text-align:right}
img{display:block;max-width:192px}caption{text-align:left;font-weight:bold;padding:4px 0}"""


def format_metric(key: str, value) -> str:
    if value is None:
        return "–"
    fmt = next(f for k, _, f in METRICS if k == key)
    return fmt.format(value)


def _thumbnail(path: Path, size: int = 192) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_report(result: dict, out: str | Path, grid_prompts: Sequence[Prompt]) -> str:
    """The report as one HTML string: score table (id ``scores``), side-by-side grid, settings, environment."""
    e = html.escape
    out = Path(out)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>slimsd eval</title>",
        f"<style>{_CSS}</style></head><body><h1>slimsd eval</h1>",
    ]
    if result.get("protocol"):
        parts.append(f"<p>Protocol: <code>{e(result['protocol'])}</code></p>")
    parts.append("<table id='scores'><caption>Scores</caption><thead><tr><th>model</th>")
    parts += [f"<th data-metric='{k}'>{e(title)}</th>" for k, title, _ in METRICS]
    parts.append("</tr></thead><tbody>")
    for row in result["models"]:
        parts.append(f"<tr><td data-metric='model'>{e(row['model'])}</td>")
        parts += [
            f"<td class='num' data-metric='{k}'>{e(format_metric(k, row.get(k)))}</td>" for k, _, _ in METRICS
        ]
        parts.append("</tr>")
    parts.append("</tbody></table>")

    if grid_prompts:
        parts.append(
            "<table id='grid'><caption>Samples (same prompt and seed across models)</caption>"
            "<thead><tr><th>prompt</th>"
        )
        parts += [f"<th>{e(row['model'])}</th>" for row in result["models"]]
        parts.append("</tr></thead><tbody>")
        for p in grid_prompts:
            parts.append(
                f"<tr><td>{e(p.caption)}<br><small>{e(p.id)} · seed "
                f"{result['settings']['seed'] + p.index}</small></td>"
            )
            for row in result["models"]:
                path = out / row["images"] / f"{p.id}.png"
                cell = f"<img src='{_thumbnail(path)}' alt='{e(p.caption)}'>" if path.is_file() else "missing"
                parts.append(f"<td>{cell}</td>")
            parts.append("</tr>")
        parts.append("</tbody></table>")

    for table_id, title, data in (
        ("settings", "Settings", result["settings"]),
        ("environment", "Environment", result["environment"]),
    ):
        parts.append(f"<table id='{table_id}'><caption>{title}</caption><tbody>")
        parts += [
            f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
            for k, v in data.items()
        ]
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = [
    "PROTOCOLS",
    "Clip",
    "EvalConfig",
    "GenSettings",
    "Prompt",
    "clean_resize",
    "clip_embed_images",
    "clip_embed_texts",
    "clip_score",
    "extract",
    "feature_statistics",
    "frechet_distance",
    "generate_missing",
    "inception_score",
    "load_clip",
    "load_fid_extractor",
    "load_stats",
    "parse_shard",
    "read_prompts",
    "render_report",
    "run_eval",
    "save_stats",
    "score_images",
]
