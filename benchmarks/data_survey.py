"""`slimsd data` on LAION-like data: wall time of a sample and of a full pass, parquet and webdataset.

Makes N rows of LAION-like metadata (aesthetic, WIDTH/HEIGHT, punsafe, LANGUAGE; a seeded draw) with small JPEGs
(1% of them corrupt), as parquet files and as img2dataset-style webdataset shards, then times what a user runs,
`python -m slimsd.cli data DATA --filter ... --json` (a new process each time: imports included), with the
default sample of 64 kept rows and with --full. Beside it, what one would write instead to count the kept rows
of the parquet copy: pandas.read_parquet of the metadata columns and a query (a new process too; it reads no
image, so it says nothing of unreadable rows). Repeats alternate the order; spreads are sample std.

Writes benchmarks/results/data_survey.json (machine, date and command inside).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RULES = ["aesthetic > 7.5", "min(width, height) >= 512", "punsafe < 0.1"]
PANDAS = (
    "import sys, pandas as pd\n"
    "df = pd.read_parquet(sys.argv[1], columns=['aesthetic', 'WIDTH', 'HEIGHT', 'punsafe'])\n"
    "kept = df[(df.aesthetic > 7.5) & (df[['WIDTH', 'HEIGHT']].min(axis=1) >= 512) & (df.punsafe < 0.1)]\n"
    "print(len(kept))\n"
)


def jpeg(rng: random.Random) -> bytes:
    image = Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "key": f"{i:09d}",
                "image": b"\xff\xd8 not a jpeg" if rng.random() < 0.01 else jpeg(rng),
                "TEXT": " ".join(
                    rng.choice(["a", "red", "cat", "on", "the", "old", "painting"]) for _ in range(8)
                ),
                "aesthetic": round(rng.uniform(5.0, 8.5), 3),
                "WIDTH": rng.choice([256, 384, 512, 640, 768, 1024]),
                "HEIGHT": rng.choice([256, 384, 512, 640, 768, 1024]),
                "punsafe": round(rng.random() ** 3, 4),
                "LANGUAGE": rng.choice(["en", "en", "en", "de", "fr"]),
            }
        )
    return rows


def write_parquet(rows: list[dict], folder: Path, per_file: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    for k in range(0, len(rows), per_file):
        part = rows[k : k + per_file]
        table = {name: [r[name] for r in part] for name in part[0] if name not in ("key", "image")}
        table["image"] = [{"bytes": r["image"], "path": None} for r in part]
        pq.write_table(pa.table(table), folder / f"part-{k // per_file:05d}.parquet", row_group_size=1000)


def write_webdataset(rows: list[dict], folder: Path, per_file: int) -> None:
    folder.mkdir(parents=True)
    for k in range(0, len(rows), per_file):
        with tarfile.open(folder / f"{k // per_file:05d}.tar", "w") as tar:
            for r in rows[k : k + per_file]:
                meta = {name: r[name] for name in r if name not in ("key", "image", "TEXT")}
                for ext, data in (
                    ("jpg", r["image"]),
                    ("txt", r["TEXT"].encode()),
                    ("json", json.dumps(meta | {"caption": r["TEXT"]}).encode()),
                ):
                    info = tarfile.TarInfo(f"{r['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def run(args: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, of the child) and stdout of one new process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, r.stdout


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--per-file", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "data_survey.json")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    sys.path.insert(0, str(ROOT / "src"))
    from slimsd.atomic import atomic_write_text
    from slimsd.devices import cpu_isa, cpu_model

    load = os.getloadavg()  # the machine may be shared: how busy it was when the runs began
    work = Path(tempfile.mkdtemp(prefix="slimsd-data-survey-"))
    rows = make_rows(args.rows, args.seed)
    write_parquet(rows, work / "parquet", args.per_file)
    write_webdataset(rows, work / "webdataset", args.per_file)
    filters = [x for rule in RULES for x in ("--filter", rule)]
    cases = {
        (fmt, mode): ["-m", "slimsd.cli", "data", str(work / fmt), *filters, "--json", *extra]
        for fmt in ("parquet", "webdataset")
        for mode, extra in (("sample", []), ("full", ["--full"]))
    }
    cases[("parquet", "pandas count")] = ["-c", PANDAS, str(work / "parquet")]
    times: dict = {k: [] for k in cases}
    cpu: dict = {k: [] for k in cases}
    outputs: dict = {}
    for r in range(args.repeats):
        for key in list(cases) if r % 2 == 0 else list(cases)[::-1]:
            t, c, out = run(cases[key])
            times[key].append(t)
            cpu[key].append(c)
            outputs[key] = out
    table = []
    for (fmt, mode), ts in times.items():
        cs = cpu[(fmt, mode)]
        row = {
            "data": fmt,
            "what": mode,
            "wall_s_mean": round(statistics.mean(ts), 3),
            "wall_s_std": round(statistics.stdev(ts), 3) if len(ts) > 1 else None,
            "cpu_s_mean": round(statistics.mean(cs), 3),
            "cpu_s_std": round(statistics.stdev(cs), 3) if len(cs) > 1 else None,
            "wall_s": [round(t, 3) for t in ts],
        }
        if mode == "pandas count":
            row["kept"] = int(outputs[(fmt, mode)].strip())
        else:
            s = json.loads(outputs[(fmt, mode)])
            row |= {"found": s["found"], "kept": s["rows"], "read": s["read"]}
        table.append(row)
        print(
            f"{fmt:10s} {mode:13s} wall {row['wall_s_mean']:6.2f} s ± {row['wall_s_std']}, "
            f"CPU {row['cpu_s_mean']:6.2f} s ± {row['cpu_s_std']} (kept {row['kept']})"
        )
    result = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa(),
            "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load],
            "python": sys.version.split()[0],
        },
        "settings": {"rows": args.rows, "per_file": args.per_file, "repeats": args.repeats, "rules": RULES},
        "rows": table,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    shutil.rmtree(work)
    return result


if __name__ == "__main__":
    main()
