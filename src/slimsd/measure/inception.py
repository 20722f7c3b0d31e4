"""The FID Inception-v3, in plain torch: pool3 features (2048) and logits (1008) for FID and IS.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") is defined on the pool3 features of the TensorFlow Inception graph
``inception-2015-12-05``; IS (Salimans et al. 2016) on its softmax. Its port to PyTorch
(``pt_inception-2015-12-05-6726825d.pth``, released by pytorch-fid) is the network the published SD and BK-SDM
numbers used. The architecture here is Inception-v3 (Szegedy et al. 2016) with the module names of that
weights file (torchvision's ``Inception3`` naming), plus the three places where the TF graph differs from
torchvision's model: average pools that do not count the zero padding (mixed 5b-5d, 6b-6e, 7b) and a max
pool in the last block (7c). So the real weights load key for key.

The weights file is a pickle. It is loaded only when the caller allows pickle (then with
``torch.load(weights_only=True)``, which refuses arbitrary objects); ``convert_weights`` turns it once into
safetensors, which loads with no flag.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimsd.errors import SlimsdError

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d"
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's 1008-way softmax (1000 ImageNet classes + 8 unused)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMSD_CACHE", Path.home() / ".cache" / "slimsd"))


class Conv(nn.Sequential):
    """conv (no bias) -> batch norm (eps 1e-3, as in TF) -> ReLU; names ``conv``/``bn`` as in the weights."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.relu = nn.ReLU(inplace=True)


def _avg_pool_no_pad(x):
    # TF's average pool divides by the number of real pixels under the window, not 9, at the borders.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (5b, 5c, 5d): 1x1 | 5x5 | double 3x3 | pool."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_no_pad(x)),
            ],
            1,
        )


class ReduceB(nn.Module):
    """35 -> 17 grid reduction (6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            1,
        )


class MixedC(nn.Module):
    """17x17 block (6b-6e) with factorised 7x7 convolutions."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class ReduceD(nn.Module):
    """17 -> 8 grid reduction (7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1
        )


class MixedE(nn.Module):
    """8x8 block (7b, 7c) with split 1x3 / 3x1 outputs. ``max_pool``: the TF graph's 7c pools by max."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(d),
                self.branch3x3dbl_3b(d),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """Images in [0, 1], Bx3x299x299 -> (pool3 features Bx2048, logits Bx1008)."""

    input_size = INPUT_SIZE
    feature_dim = 2048  # pool3
    name = "inception-v3"

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images * 2 - 1  # the TF graph takes [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        features = x.mean(dim=(2, 3))
        return features, self.fc(features)


def read_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from the original ``.pth`` pickle when ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise SlimsdError(f"Inception weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise SlimsdError(
                f"Inception weights {str(path)!r} are not a readable safetensors file: {e}"
            ) from None
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise SlimsdError(f"Inception weights {str(path)!r}: expected a .safetensors or .pth file")
    if not allow_pickle:
        raise SlimsdError(
            f"Inception weights {str(path)!r} are a pickle file, which can run code when loaded: pass "
            "--allow-pickle to load it (weights_only), or convert it once with `python -m slimsd.measure.inception "
            "IN.pth OUT.safetensors`"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; the user needs one line
        raise SlimsdError(
            f"could not load Inception weights {str(path)!r}: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(state, dict):
        raise SlimsdError(f"Inception weights {str(path)!r} hold a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_inception(weights: str | Path | None = None, allow_pickle: bool = False) -> FIDInceptionV3:
    """The FID Inception with its real weights: ``weights``, else the safetensors or (with ``allow_pickle``)
    pickle copy in the cache folder, else (``allow_pickle``, online) the download from ``FID_WEIGHTS_URL``."""
    if weights is None:
        safe = cache_dir() / f"{WEIGHTS_NAME}.safetensors"
        pth = cache_dir() / f"{WEIGHTS_NAME}.pth"
        if safe.is_file():
            weights = safe
        elif allow_pickle:
            if not pth.is_file():
                _download(pth)
            weights = pth
        else:
            raise SlimsdError(
                f"no FID Inception weights: pass --inception-weights FILE (.safetensors, or .pth with "
                f"--allow-pickle), or put {safe.name} in {cache_dir()}, or pass --allow-pickle to download "
                f"{FID_WEIGHTS_URL}; --fid-extractor stand-in runs without weights (scores not comparable)"
            )
    model = FIDInceptionV3()
    state = read_weights(weights, allow_pickle)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Old checkpoints have no num_batches_tracked counters; nothing else may be missing.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SlimsdError(
            f"{str(weights)!r} is not an FID Inception state dict: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval().requires_grad_(False)


def _download(dest: Path) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SlimsdError(f"no Inception weights in {dest.parent} and HF_HUB_OFFLINE=1: cannot download them")
    from torch.hub import download_url_to_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        download_url_to_file(FID_WEIGHTS_URL, str(dest), hash_prefix="6726825d")
    except Exception as e:  # network errors of any kind: one line to the user
        raise SlimsdError(f"could not download {FID_WEIGHTS_URL}: {e}") from None


def convert_weights(pth: str | Path, out: str | Path) -> Path:
    """The pickle weights -> safetensors, checked against the architecture, written atomically."""
    from safetensors.torch import save

    from slimsd.atomic import atomic_write_bytes

    state = read_weights(pth, allow_pickle=True)
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=False)
    clean = {k: v.contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(out, save(clean))


class StandInExtractor(nn.Module):
    """A small random network with the FID Inception's interface, for offline tests and smoke runs.

    Its scores only mean something relative to each other within one run: never report them.
    """

    input_size = 32
    name = "stand-in"

    def __init__(self, features: int = 32, classes: int = 10, seed: int = 0):
        super().__init__()
        self.feature_dim = features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, features, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.fc = nn.Linear(features, classes)
            with torch.no_grad():
                self.fc.weight.mul_(30)  # confident enough that IS differs between image sets
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images * 2 - 1).mean(dim=(2, 3))
        return features, self.fc(features)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m slimsd.measure.inception IN.pth OUT.safetensors")
    print(convert_weights(sys.argv[1], sys.argv[2]))
