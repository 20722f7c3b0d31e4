"""Why did longer training of the old toy teacher lose its colours? Three measurements, results in
benchmarks/results/toy_teacher_diagnosis.json.

guidance: caption fidelity of a teacher folder at several classifier-free guidance scales (48 fresh captions
  of seen combinations, seed stream 5, 25 steps).
continue: continue a teacher exactly as the failed run did (learning rate warmed up to 1e-3 again, cosine over
  2400 steps, text encoder at 1e-3, data of every combination as it was then), once with the text encoder
  trained (arm joint) and once frozen (arm text_frozen), scoring fidelity at guidance 5 every EVERY steps and
  how far the text encoder's states of all 360 captions moved (text_drift, relative L2).

sampler: `guidance OLD 2,5 --schedulers pndm,euler,dpm++2m,ddim`: the same sweep per sampler (what failed at
  guidance 5 was the PLMS sampler, not the teacher).

Run:  git show 4679db3:src/slimsd/toy/assets/toy-sd/...  (the old teacher) into OLD, then
      .venv/bin/python scripts/diagnose_toy_teacher.py guidance OLD 1,2,3,5,7.5
      .venv/bin/python scripts/diagnose_toy_teacher.py continue OLD --steps 1000 --every 200
      .venv/bin/python scripts/diagnose_toy_teacher.py guidance OLD 2,5 --schedulers pndm,euler,dpm++2m,ddim
"""

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import train_toy_teacher as T

from slimsd.toy import shapes as S


def load(folder):
    # slimsd's one loader, plain modules (optimize=False): they are trained below
    from slimsd.models.loading import load as slimsd_load

    return slimsd_load(str(folder), device="cpu", dtype="fp32", optimize=False)


def data(n, seed=0):  # the old data: every combination
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sc = S.sample_scene(rng, "all")
        j = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        out.append((S.render(sc, 64, j), sc.caption))
    return out


CAPS = [
    S.Scene(c, s, z, p).caption for c in S.PALETTE for s in S.SHAPES for z in S.SIZES for p in S.POSITIONS
]


@torch.no_grad()
def text_stats(pipe, ref):
    e = T.encode_text(pipe, CAPS)
    drift = ((e - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).mean().item()
    idx = {c: i for i, c in enumerate(CAPS)}

    def sep(pairs):
        return sum(((e[idx[a]] - e[idx[b]]).norm() / e[idx[a]].norm()).item() for a, b in pairs) / len(pairs)

    colour_pairs = [
        (f"a {a} {s}", f"a {b} {s}") for s in S.SHAPES for a, b in itertools.combinations(S.PALETTE, 2)
    ]
    shape_pairs = [
        (f"a {c} {a}", f"a {c} {b}") for c in S.PALETTE for a, b in itertools.combinations(S.SHAPES, 2)
    ]
    return {"text_drift": drift, "colour_separation": sep(colour_pairs), "shape_separation": sep(shape_pairs)}


@torch.no_grad()
def evaluate(pipe):
    rng = random.Random(10_000)
    caps = [S.sample_scene(rng, "all").caption for _ in range(48)]
    gens = [torch.Generator().manual_seed(i) for i in range(48)]
    ims = pipe(caps, num_inference_steps=25, guidance_scale=5.0, generator=gens, height=64, width=64).images
    r = S.caption_fidelity(ims, caps, details=True)
    return {k: r[k] for k in ("fidelity", "colour_accuracy", "shape_accuracy")}


def run(old, freeze_text, steps, every):
    pipe = load(old)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    d = data(4096)
    pixels = T.to_tensor([im for im, _ in d])
    caps = [c for _, c in d]
    lat = T.encode_latents(pipe.vae, pixels)
    lat = lat / lat.std()
    ids = T.token_ids(pipe, caps)
    unc = T.token_ids(pipe, [""])[0]
    ref = T.encode_text(pipe, CAPS)
    unet, te, sch = pipe.unet, pipe.text_encoder, pipe.scheduler
    groups = [{"params": unet.parameters(), "lr": 1e-3}]
    if not freeze_text:
        groups.append({"params": te.parameters(), "lr": 1e-3})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    te.requires_grad_(not freeze_text)
    alphas = sch.alphas_cumprod.float()
    hist = []

    def point(step):
        unet.eval()
        te.eval()
        h = {"step": step, **evaluate(pipe), **text_stats(pipe, ref)}
        hist.append(h)
        print(json.dumps(h), flush=True)
        unet.train()
        te.train(mode=not freeze_text)

    point(0)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, 2400, 1e-3, 100)
        loss = T.task_loss(
            unet, te, alphas, lat, ids, unc, 32, 0.1, gen
        )  # the failed run's batch and dropout
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        if (step + 1) % every == 0:
            point(step + 1)
    return hist


@torch.no_grad()
def guidance_sweep(folder, scales, scheduler=None):
    """Fidelity at each guidance scale, with the folder's own scheduler or SCHEDULER (a slimsd name)."""
    from slimsd.models.schedulers import set_scheduler

    pipe = load(folder)
    if scheduler:
        set_scheduler(pipe, scheduler)
    caps = S.make_captions(48, seed=5)
    out = {}
    for g in scales:
        gens = [torch.Generator().manual_seed(i) for i in range(48)]
        ims = pipe(caps, num_inference_steps=25, guidance_scale=g, generator=gens, height=64, width=64).images
        r = S.caption_fidelity(ims, caps, details=True)
        out[str(g)] = {k: round(r[k], 4) for k in ("fidelity", "colour_accuracy", "shape_accuracy")}
        print(scheduler or "own", g, out[str(g)], flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    g = sub.add_parser("guidance")
    g.add_argument("folder", type=Path)
    g.add_argument("scales")
    g.add_argument(
        "--schedulers", default="", help="comma-separated slimsd scheduler names (default: its own)"
    )
    c = sub.add_parser("continue")
    c.add_argument("folder", type=Path)
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--every", type=int, default=200)
    c.add_argument("--arms", default="joint,text_frozen")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "guidance":
        scales = [float(x) for x in args.scales.split(",")]
        if args.schedulers:
            result = {s: guidance_sweep(args.folder, scales, s) for s in args.schedulers.split(",")}
        else:
            result = guidance_sweep(args.folder, scales)
    else:
        result = {}
        for name, frozen in (("joint", False), ("text_frozen", True)):
            if name in args.arms.split(","):
                print("arm", name, flush=True)
                result[name] = run(args.folder, frozen, args.steps, args.every)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
