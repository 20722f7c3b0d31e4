"""Image + caption data for distillation: examples and the batch plan over a source's rows.

The sources (formats, metadata, row filters) are ``slimsd.train.sources``, whose names are also importable from
here. Sources are map-style so that the trainer owns the order (exact resume, and the same examples whether one
process or several read them). A row whose image cannot be decoded is counted by reason (``skipped``) when it is
read, never a crash, and its slot is filled by a replacement row chosen from (seed, epoch, row) alone
(``Examples``): every micro-batch stays full, and P processes read and train on what one process with P x the
batch does, corrupt rows included. Data whose every row has failed to read (``ReadGuard``) ends the run with one
line that names what was skipped and why.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from slimsd.train.sources import (  # noqa: F401 (the sources' names, importable from here as before)
    CACHE_FORMAT,
    CAPTION_KEYS,
    FILTER_PREFIX,
    IMAGE_COLUMNS,
    BadRow,
    Source,
    Wanted,
    check_rows,
    describe_skipped,
    filter_source,
    index_source,
    nothing_readable,
    open_source,
    row_counts,
)

# --- examples and batches --------------------------------------------------------------------------------------


def _rng(seed: int, epoch: int, index: int) -> random.Random:
    """Per-example randomness (crop, flip) that depends only on (seed, epoch, index): the same whichever
    process reads the example, and the same after a resume."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_000_007 + index)


def preprocess(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    rng: random.Random | None = None,
) -> dict:
    """Resize the short side to ``resolution``, crop a square (centre, or random with ``rng``), flip, scale to
    [-1, 1]. Also returns SDXL's size conditioning: the original size and the crop's top-left corner."""
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = image.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else image
    if center_crop or rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return {
        "pixels": pixels,
        "original_size": torch.tensor([h, w]),
        "crop_top_left": torch.tensor([top, left]),
    }


class Examples(torch.utils.data.Dataset):
    """Map-style dataset over a source. Indexed by (row, epoch); returns a dict with "failed": the (row, reason)
    of every read that failed on the way (counted by the trainer), and "bad" when no row of the data reads (or,
    with ``replace=False``, when the row itself fails).

    A row that fails to read is replaced by the first row that reads on a walk over the data's rows from a start
    drawn from (seed, epoch, row) (``replacement_start``): the same replacement whichever process reads the slot,
    and after a resume. The replacement is read with its own per-example randomness, as if it had been drawn."""

    def __init__(
        self,
        source: Source,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        replace: bool = True,
    ):
        self.source, self.resolution = source, resolution
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed
        # False: a row that fails stays out (a latent cache holds each readable row once)
        self.replace = replace

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        failed: list[tuple[int, str]] = []
        for row in self.walk(index, epoch):
            try:
                return self.example(row, epoch) | {"failed": failed}
            except BadRow as e:
                failed.append((row, e.args[0]))
        return {"bad": failed[0][1], "index": index, "failed": failed}

    def walk(self, index: int, epoch: int) -> Iterator[int]:
        """Row ``index``, then (when replacing) every other row once, from the start the slot draws."""
        yield index
        if not self.replace:
            return
        n = len(self.source)
        start = replacement_start(self.seed, epoch, index, n)
        for j in range(n):
            if (row := (start + j) % n) != index:
                yield row

    def example(self, index: int, epoch: int) -> dict:
        """Row ``index`` read and preprocessed with the randomness of (seed, epoch, row); raises BadRow."""
        rng = _rng(self.seed, epoch, index)
        flip = self.random_flip and rng.random() < 0.5
        row = self.source.read(self.source.rows[index])
        if isinstance(row, dict):  # latent cache
            if flip and "latent_mean_flip" in row:
                row["latent_mean"], row["latent_std"] = row["latent_mean_flip"], row["latent_std_flip"]
            return {k: v for k, v in row.items() if not k.endswith("_flip")} | {"index": index}
        image, caption = row
        out = preprocess(image, self.resolution, self.center_crop, flip, rng)
        return {**out, "caption": caption, "index": index}


def replacement_start(seed: int, epoch: int, index: int, n: int) -> int:
    """Where the walk for a replacement of row ``index`` (epoch ``epoch``) starts: a row drawn from a generator
    seeded by (seed, epoch, row) only (a string seed is hashed with SHA-512: the same in every process)."""
    return random.Random(f"replacement {seed} {epoch} {index}").randrange(n)


def collate(items: list[dict]) -> dict:
    """Stack the good examples; every failed read (replaced or not) is listed under "skipped" (its reason) and
    "bad_index" (its row) for the trainer to count."""
    good = [it for it in items if "bad" not in it]
    failed = [f for it in items for f in it["failed"]]
    batch: dict = {
        "skipped": [reason for _, reason in failed],
        "bad_index": [row for row, _ in failed],
        "size": len(good),
        "slot": torch.tensor([s for s, it in enumerate(items) if "bad" not in it], dtype=torch.long),
    }
    if not good:
        return batch
    for k in good[0]:
        if k == "failed":
            continue
        if k == "caption":
            batch[k] = [it[k] for it in good]
        elif k == "index":
            batch[k] = torch.tensor([it[k] for it in good])
        else:
            batch[k] = torch.stack([it[k] for it in good])
    return batch


class ReadGuard:
    """Ends a run whose data yields nothing instead of spinning on empty micro-batches: once every row of the
    source has failed to read since the last row that read (all rows bad from the start, or the files gone in
    the middle of a run), one line names what was skipped and why.

    Rows dropped at indexing are known before training (``check_rows``); rows that fail to decode are known only
    when read, so the bound is the data itself: about one epoch of failed reads, never a read up front.
    """

    def __init__(self, spec: str, source: Source):
        self.spec, self.n = spec, len(source)
        # rows dropped at indexing for being unusable; a filter's chosen removals are no failed read
        self.dropped = Counter({k: v for k, v in source.skipped.items() if not k.startswith(FILTER_PREFIX)})
        self.failed: dict[int, str] = {}  # row -> reason, for the distinct rows that failed since a good one

    def check(self, batch: dict, step: int) -> None:
        if batch["size"]:
            self.failed.clear()
            return
        self.failed.update(zip(batch["bad_index"], batch["skipped"], strict=True))
        if len(self.failed) >= self.n:
            raise nothing_readable(self.spec, Counter(self.failed.values()) + self.dropped, step)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g).tolist()


class BatchPlan(torch.utils.data.Sampler):
    """Batches of (row, epoch) keys for one process, starting at ``start`` (micro-batches already consumed).

    Micro-batch k of the whole run takes the global examples [k·G, (k+1)·G) of the concatenated epoch orders,
    G = per-process batch × processes; process r takes its slice [r·B, (r+1)·B). One process with batch G
    therefore sees exactly the examples that P processes with batch B see together.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        num_processes: int,
        rank: int,
        seed: int,
        start: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.b, self.p, self.rank, self.seed, self.start, self.shuffle = (
            n,
            batch_size,
            num_processes,
            rank,
            seed,
            start,
            shuffle,
        )

    def position(self, k: int) -> tuple[int, int]:
        """(epoch, offset) of the first example of global micro-batch k; a partial last batch is dropped."""
        per_epoch = self.n // (self.b * self.p)
        return k // per_epoch, (k % per_epoch) * self.b * self.p

    def __iter__(self):
        k = self.start
        order_epoch, order = -1, []
        while True:
            epoch, offset = self.position(k)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(self.n, self.seed, epoch, self.shuffle)
            lo = offset + self.rank * self.b
            yield [(i, epoch) for i in order[lo : lo + self.b]]
            k += 1

    def __len__(self) -> int:  # endless; the trainer stops at max_steps
        return 2**62
