"""Scoring generated images: FID, IS and CLIP score, and what they need (feature extractors, CLIP, resizing).

- FID (Heusel et al. 2017): Fréchet distance between Gaussians fitted to Inception pool3 features of the
  generated and the reference images. Images are resized to the network's input the *clean* way (Parmar et
  al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation"): PIL bicubic on each channel in
  float, not a bilinear tensor interpolation, which aliases and shifts FID by whole points.
- IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.
- CLIP score (Hessel et al. 2021): 100 * mean max(cos(image, text), 0) of CLIP embeddings.

The feature extractors are swappable (``stand-in`` ones run offline).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from slimsd.atomic import atomic_write_bytes
from slimsd.errors import SlimsdError, unknown
from slimsd.images import IMAGE_SUFFIXES
from slimsd.measure.protocols import DEFAULT_CLIP, FID_EXTRACTORS

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
    """Mean and sample standard deviation (n - 1, as every spread in slimsd; the reference IS code reports the
    population std) over ``splits`` of exp(E_x KL(p(y|x) || p(y))); 0 for one split."""
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
    return float(np.mean(scores)), float(np.std(scores, ddof=1)) if splits > 1 else 0.0


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
