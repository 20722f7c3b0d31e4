"""Per image, one model, every runtime a CPU user could pick, in one table (issue: quantise and deploy).

Rows, each at the model's own steps, guidance and scheduler, one image per call, same prompt and seeds:
  diffusers eager fp32 (plain DiffusionPipeline, no slimsd) | slimsd torch fp32 | slimsd torch bf16 (when the
  CPU has native bf16) | slimsd ONNX Runtime fp32 static | slimsd OpenVINO fp32 static | slimsd OpenVINO int8 |
  slimsd ONNX Runtime int8 | peer: optimum-intel's OV pipeline on the same OpenVINO fp32 folder, run from its
  own virtualenv (benchmarks/make_peer_env.sh) in a subprocess.
The rows are timed round-robin (one image of each row, then the next round), so that a load change on a shared
machine hits every row alike; the figure is the median per image with the sample std. Every row's image is
compared with diffusers eager fp32's on the same seed (PSNR, dB).

  python benchmarks/deploy_runtimes.py --model DIR_OR_NAME --resolution 64 --threads 2 --repeats 5 \
      --prompts FILE --out benchmarks/results/deploy_toy.json [--peer-python benchmarks/.peer-venv/bin/python]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PEER_SCRIPT = Path(__file__).with_name("peer_optimum.py")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# the exported folder each row runs (the peers run the OpenVINO fp32 one; the int8 one is always made: its record
# holds the calibration and the disk sizes)
ROW_FOLDERS = {"onnx-fp32": "onnx-fp32", "onnx-int8": "onnx-int8", "ov-fp32": "openvino-fp32"}


def prepare(
    model: str, work: Path, size: str, prompts: str | None, calib: int, layers: int, skip: set[str], log
) -> dict[str, Path]:
    """The exported folders (static shapes, batch 1) the rows not in ``skip`` need, made once per work folder."""
    needed = {"openvino-fp32", "openvino-int8"} | {f for k, f in ROW_FOLDERS.items() if k not in skip}
    from slimsd.models.exporting import export_runtime
    from slimsd.run.quantize import quantize

    folders = {}
    for name, to in (("onnx-fp32", "onnx"), ("openvino-fp32", "openvino")):
        if name not in needed:
            continue
        folders[name] = work / name
        if not (work / name / "slimsd.json").is_file():
            t = time.perf_counter()
            export_runtime(model, work / name, to, resolution=size, batch=1, overwrite=True)
            log(f"exported {name} in {time.perf_counter() - t:.0f} s")
    for name, to in (("openvino-int8", "openvino"), ("onnx-int8", "onnx")):
        if name not in needed:
            continue
        folders[name] = work / name
        if not (work / name / "slimsd.json").is_file():
            t = time.perf_counter()
            quantize(
                model,
                work / name,
                to=to,
                prompts_file=prompts,
                calibration_prompts=calib,
                resolution=size,
                batch=1,
                sensitivity_layers=layers,
                overwrite=True,
            )
            log(f"quantised {name} in {time.perf_counter() - t:.0f} s")
    return folders


def lcm_student(preset: str, folder: Path, log) -> str:
    """A full-size LCM student of ``preset``'s shape with random weights, shaped as ``slimsd distill`` with
    objective lcm shapes its result (final/): the U-Net with the guidance embedding (``time_cond_proj_dim``,
    DistillConfig.cond_proj_dim), LCMScheduler from the teacher's config, and slimsd.json ``sampling`` (4 steps,
    the guidance through the embedding). Time and memory only: its images are noise."""
    if (folder / "slimsd.json").is_file():
        return str(folder)
    from diffusers import StableDiffusionPipeline

    from slimsd.models.loading import load
    from slimsd.train.objectives.lcm import LCM
    from slimsd.train.settings import DistillConfig

    objective = LCM(DistillConfig(teacher=preset, objective="lcm"))
    pipe = load(preset, dtype="fp32", optimize=False, random_weights=True)
    parts = {k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer")}
    student = StableDiffusionPipeline(
        **parts,
        unet=objective.adapt(pipe.unet).requires_grad_(False),
        scheduler=objective.final_scheduler(dict(pipe.scheduler.config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    student.save_pretrained(folder, safe_serialization=True)
    info = {"random_weights": True, "shape_of": preset, "objective": "lcm", "sampling": objective.sampling()}
    (folder / "slimsd.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"built a random-weight {preset}-shaped LCM student in {folder}")
    return str(folder)


def diffusers_eager(model: str):
    """What a user gets from diffusers alone: the model's own folder, fp32, eager, its own scheduler."""
    from diffusers import DiffusionPipeline

    from slimsd.models.loading import describe_model, load

    if describe_model(model) == "local":
        pipe = DiffusionPipeline.from_pretrained(model, safety_checker=None)
    else:  # a name only slimsd resolves (micro, toy, preset with random weights): its plain modules
        pipe = load(model, dtype="fp32", optimize=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Peer:
    """optimum-intel's pipeline in its own process (peer_optimum.py), one image per call: a row like the others."""

    def __init__(self, python: str, folder: Path, args, own: dict, precision: str):
        cmd = [python, str(PEER_SCRIPT), str(folder), "--threads", str(args.threads), "--prompt", args.prompt]
        cmd += [
            "--steps",
            str(own["steps"]),
            "--guidance",
            str(own["guidance"]),
            "--size",
            str(args.resolution),
        ]
        cmd += ["--precision", precision]
        self.command = " ".join(cmd)
        env = {**os.environ, "PYTHONPATH": ""}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer ended (exit {self.proc.wait()}): {self.command}")
        return json.loads(line)

    def __call__(self, seed: int) -> float:
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        return self.read()["ms"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def build_rows(args, folders: dict[str, Path], own: dict, skip: set[str], log) -> dict[str, tuple]:
    """label -> (kind, runner, record): the pipelines of every row, loaded before any is timed."""
    from slimsd.devices import cpu_supports_bf16
    from slimsd.models.loading import load

    rows = {}

    def add(key: str, label: str, kind: str, make) -> None:
        if key in skip:
            return
        t, rss = time.perf_counter(), rss_mb()
        runner = make()
        mem = {"rss_added_at_load_mb": rss_mb() - rss}
        if kind == "slimsd":
            runtime = runner._slimsd["runtime"]
            if "backend" in runtime:  # an exported folder: the dtype its float kernels really run in
                label += f", {runtime['dtype']} kernels"
            rows[label] = (kind, runner, {"runtime": runtime, **mem})
        elif kind == "peer":
            label += f", {runner.info['precision']['unet']} kernels (VAE {runner.info['precision']['vae_decoder']})"
            rows[label] = (
                kind,
                runner,
                {"peer": runner.info, "process_rss_at_load_mb": rss_mb(runner.proc.pid)},
            )
        else:
            rows[label] = (kind, runner, mem)
        log(f"loaded {label} in {time.perf_counter() - t:.0f} s")

    add("diffusers", "diffusers eager fp32", "diffusers", lambda: diffusers_eager(args.model))
    add("torch-fp32", "slimsd torch fp32", "slimsd", lambda: load(args.model, dtype="fp32"))
    if cpu_supports_bf16():
        add("torch-bf16", "slimsd torch bf16", "slimsd", lambda: load(args.model, dtype="bf16"))
    exported = (
        ("onnx-fp32", "onnx-fp32", "slimsd ONNX Runtime fp32 static", None),
        ("ov-fp32", "openvino-fp32", "slimsd OpenVINO fp32 static (default)", None),
        ("ov-fp32-bf16", "openvino-fp32", "slimsd OpenVINO fp32 static, --dtype bf16", "bf16"),
        ("ov-int8", "openvino-int8", "slimsd OpenVINO int8 static (default)", None),
        ("ov-int8-fp32", "openvino-int8", "slimsd OpenVINO int8 static, --dtype fp32", "fp32"),
        ("onnx-int8", "onnx-int8", "slimsd ONNX Runtime int8 static", None),
    )
    for key, folder, label, dtype in exported:
        if folder in folders:
            add(key, label, "slimsd", lambda f=folder, d=dtype: load(str(folders[f]), dtype=d))
    if args.peer_python:
        for key, precision in (("peer", "default"), ("peer-f32", "f32")):
            label = f"peer: optimum-intel OV pipeline, same OpenVINO fp32 folder, precision {precision}"
            add(
                key,
                label,
                "peer",
                lambda p=precision: Peer(args.peer_python, folders["openvino-fp32"], args, own, p),
            )
    return rows


def time_rows(rows: dict, args, own: dict, log, on_round) -> tuple[dict, dict]:
    """Round-robin: one image of each row, then the next round; round 0 (compilation, first-call allocation)
    is not counted. Returns the times (ms) and round 1's images (slimsd and diffusers rows); ``on_round(times,
    images)`` after every counted round (the results file so far: a long run stopped early keeps its rounds)."""
    from slimsd.run.generate import generate

    times = {k: [] for k in rows}
    images = {}
    w = h = args.resolution
    for r in range(args.repeats + 1):
        for label, (kind, pipe, _record) in rows.items():
            seed = 100 + r
            img = None
            if kind == "peer":
                elapsed = pipe(seed) / 1000
            elif kind == "diffusers":
                t = time.perf_counter()
                img = pipe(
                    args.prompt,
                    num_inference_steps=own["steps"],
                    guidance_scale=own["guidance"],
                    width=w,
                    height=h,
                    generator=torch.Generator().manual_seed(seed),
                ).images[0]
                elapsed = time.perf_counter() - t
            else:
                t = time.perf_counter()
                img = generate(pipe, args.prompt, seed=seed, width=w, height=h)[0].image
                elapsed = time.perf_counter() - t
            if r > 0:
                times[label].append(elapsed * 1000)
            if r == 1 and img is not None:
                images[label] = np.asarray(img)
        log(f"round {r} done, load {os.getloadavg()[0]:.1f}")
        if r > 0:
            on_round(times, images)
    return times, images


@contextlib.contextmanager
def bench_lock(path: str | None, log):
    """flock(PATH) held while the rows are timed (as `flock PATH CMD` would hold it, for the timing alone)."""
    if path is None:
        yield
        return
    with open(path, "a") as f:
        log(f"waiting for {path}")
        fcntl.flock(f, fcntl.LOCK_EX)
        log(f"holding {path}")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rss_mb(pid: int | str = "self") -> int:
    """The process's resident memory now (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def targets(table: list[dict]) -> dict:
    """Issue 23's targets on this table: int8 (as slimsd loads it by default) per image >= 3x diffusers eager
    fp32, and at least as fast as the peer (optimum-intel's pipeline as its user gets it)."""
    int8 = next((r for r in table if r["row"].startswith("slimsd OpenVINO int8 static (default)")), None)
    peer = next((r for r in table if r["row"].startswith("peer") and "precision default" in r["row"]), None)
    base = next((r for r in table if r["row"] == "diffusers eager fp32"), None)
    out = {}
    if int8 and base:
        ratio = base["image_ms_median"] / int8["image_ms_median"]
        out["int8_vs_diffusers_eager_fp32"] = {"speedup": round(ratio, 3), "target": 3.0, "met": ratio >= 3}
    if int8 and peer:
        ratio = peer["image_ms_median"] / int8["image_ms_median"]
        out["int8_vs_peer_default"] = {"speedup": round(ratio, 3), "target": 1.0, "met": ratio >= 1}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model (folder or name); or --preset")
    ap.add_argument("--preset", help="a preset name: its full-size shape with random weights (time, memory)")
    ap.add_argument("--lcm", action="store_true", help="with --preset: the LCM student of that shape")
    ap.add_argument("--sensitivity-layers", type=int, default=16)
    ap.add_argument("--prepare-only", action="store_true", help="make the exported folders, time nothing")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", default=None, help="calibration prompts (one per line)")
    ap.add_argument("--calibration-prompts", type=int, default=16)
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--work", default=None, help="where the exported folders go (reused)")
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--skip", default="", help="rows left out, by key (e.g. onnx-fp32,peer-f32)")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--lock", default=None, help="a file to flock around the timing (e.g. /tmp/slimsd-bench.lock)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from slimsd.models.loading import load, model_info
    from slimsd.run.generate import sampling_defaults

    def log(m):
        print(m, file=sys.stderr, flush=True)

    size = f"{args.resolution}x{args.resolution}"
    name = Path(args.model).name if args.model else f"{args.preset}{'-lcm' if args.lcm else ''}"
    work = Path(args.work or f"/tmp/deploy-bench-{name}-{args.resolution}")
    work.mkdir(parents=True, exist_ok=True)
    if bool(args.model) == bool(args.preset) or (args.preset and not args.lcm):
        ap.error("give --model, or --preset with --lcm")
    if args.preset:
        args.model = lcm_student(args.preset, work / "model", log) if args.lcm else args.preset
    skip = set(filter(None, args.skip.split(",")))
    folders = prepare(
        args.model, work, size, args.prompts, args.calibration_prompts, args.sensitivity_layers, skip, log
    )
    if args.prepare_only:
        return
    own = sampling_defaults(model_info(load(args.model, dtype="fp32", optimize=False)).get("sampling"))
    load_start = os.getloadavg()
    rows = build_rows(args, folders, own, skip, log)

    def write(times: dict, images: dict) -> list[dict]:
        return write_result(args, rows, times, images, own, folders, load_start)

    with bench_lock(args.lock, log):  # the timing only: loading and compiling need no quiet machine
        table = write(*time_rows(rows, args, own, log, write))
    for _kind, runner, _record in rows.values():
        if isinstance(runner, Peer):
            runner.close()
    for row in table:
        log(
            f"{row['row']:<55} {row['image_ms_median']:>10.1f} ms  ±{row.get('image_ms_std') or 0:.1f}  "
            f"x{row['speedup_vs_diffusers_eager_fp32'] or 0:.2f}  PSNR {row.get('psnr_vs_diffusers_eager_fp32_db')}"
        )


def write_result(
    args, rows: dict, times: dict, images: dict, own: dict, folders: dict, load_start
) -> list[dict]:
    """The results file of the rounds so far; returns its table."""
    from slimsd.atomic import atomic_write_text
    from slimsd.devices import cpu_isa, cpu_model

    reference = images.get("diffusers eager fp32")  # plain diffusers, fp32: the independent reference
    table = []
    for label, (_kind, _runner, record) in rows.items():
        ms = times[label]
        row = {
            "row": label,
            "image_ms_median": round(statistics.median(ms), 2),
            "image_ms_std": round(statistics.stdev(ms), 2) if len(ms) > 1 else None,
            "n": len(ms),
            "psnr_vs_diffusers_eager_fp32_db": round(psnr(images[label], reference), 2)
            if label in images and reference is not None
            else None,
            **record,
        }
        table.append(row)
    base = next((r["image_ms_median"] for r in table if r["row"] == "diffusers eager fp32"), None)
    for row in table:
        row["speedup_vs_diffusers_eager_fp32"] = round(base / row["image_ms_median"], 3) if base else None
    q = json.loads((folders["openvino-int8"] / "slimsd.json").read_text())["export"]["quantization"]
    disk = {"openvino_fp32": q["unet_bytes_fp32"], "openvino_int8": q["unet_bytes"]}
    if "onnx-int8" in folders:
        qo = json.loads((folders["onnx-int8"] / "slimsd.json").read_text())["export"]["quantization"]
        disk.update(onnx_fp32=qo["unet_bytes_fp32"], onnx_int8=qo["unet_bytes"])
    result = {
        "what": "one image per call at the model's own steps and guidance, per-image wall time (median, sample std)"
        ", rows timed round-robin after one warm-up round",
        "model": args.model,
        "steps": own["steps"],
        "guidance": own["guidance"],
        "resolution": args.resolution,
        "threads": args.threads,
        "machine": {
            "cpu": cpu_model(),
            "isa": cpu_isa(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cores_visible": os.cpu_count(),
        },
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "rows": table,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "rounds_counted": min(len(v) for v in times.values()),
        "shared_machine": "other sessions share these cores; every row was timed round-robin so a load change "
        "hits all rows alike, and loadavg is recorded at start and end",
        "targets": targets(table),
        "unet_disk_bytes": disk,
        "calibration": {
            k: q["calibration"][k] for k in ("count", "steps", "guidance", "unet_inputs", "timesteps")
        },
        "kept_layers": len(q["kept_layers"]),
        "max_rss_mb_all_slimsd_rows_in_one_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        // 1024,
    }
    if args.preset:
        result["random_weights"] = (
            f"a {args.preset}-shaped LCM student with random weights: time and memory only; its images are "
            "noise, so the PSNR column says only whether two runtimes compute the same function"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
