"""The README's figures are the results files' (benchmarks/results/, written by committed scripts), and every
spread in them is a sample standard deviation (n - 1). Run by `make test`: a table edited by hand, or a results
file re-made without its README table, fails here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def readme_rows() -> list[str]:
    return [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("|")]


def records(node):
    """Every dict in a JSON document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from records(value)
    elif isinstance(node, list):
        for value in node:
            yield from records(value)


@pytest.mark.parametrize("path", sorted(RESULTS.rglob("*.json")), ids=lambda p: p.name)
def test_every_spread_with_its_values_beside_it_is_a_sample_std(path):
    for record in records(json.loads(path.read_text())):
        for key, spread in record.items():
            values = record.get(key.removesuffix("_std") + "_per_seed") if key.endswith("_std") else None
            if isinstance(values, list) and len(values) > 1:
                assert spread == pytest.approx(statistics.stdev(values), abs=1e-12), (key, record)


def test_toy_steps_spreads_are_the_sample_std_of_its_seeds():
    data = json.loads((RESULTS / "toy_steps.json").read_text())
    for row in data["rows"]:
        values = [r["caption_fidelity"] for r in data["per_seed"] if r["row"] == row["row"]]
        assert row["caption_fidelity_std"] == pytest.approx(statistics.stdev(values), abs=1e-12), row["row"]


def cell(mean: float, std: float | None, held: float) -> str:
    return f"{mean:.3f}" + ("" if std is None else f" ± {std:.3f}") + f" ({held:.3f})"


def test_the_toy_steps_table_is_its_results_file():
    rows = readme_rows()
    for r in json.loads((RESULTS / "toy_steps.json").read_text())["rows"]:
        std = r["caption_fidelity_std"] if len(r["seeds"]) > 1 and r["row"] != "teacher" else None
        want = cell(r["caption_fidelity_mean"], std, r["caption_fidelity_held_out_mean"])
        assert any(f"| {want} |" in line for line in rows), (r["row"], want)


def test_the_toy_ablation_table_is_its_results_file():
    rows = readme_rows()
    for r in json.loads((RESULTS / "toy_ablation.json").read_text()):
        std = None if r["arm"] == "teacher" else r["caption_fidelity_std"]
        want = cell(r["caption_fidelity_mean"], std, r["caption_fidelity_held_out_mean"])
        line = next((line for line in rows if line.startswith(f"| {r['recipe']} |")), None)
        if r["arm"] == "teacher":
            line = next(line for line in rows if line.startswith("| teacher (toy-sd) | 3,222,692"))
        assert line is not None and f"| {want} |" in line, (r["recipe"], r["arm"], want, line)


def test_the_toy_samplers_table_is_its_results_file():
    data = json.loads((RESULTS / "toy_samplers.json").read_text())
    rows = readme_rows()
    for label in dict.fromkeys(r["model"] for r in data["rows"]):
        cells = []
        for r in (r for r in data["rows"] if r["model"] == label):
            held = r["caption_fidelity_held_out"]
            cells.append(f"{r['caption_fidelity']:.3f}" + ("" if held is None else f" ({held:.3f})"))
        assert f"| {label} | " + " | ".join(cells) + " |" in rows, label


def readme_text() -> str:
    """The README with its line breaks and runs of spaces made single spaces (figures inside sentences)."""
    return " ".join((ROOT / "README.md").read_text().split())


def test_the_sdxl_step_latency_sentence_is_its_results_file():
    rows = {r["model"]: r for r in json.loads((RESULTS / "cpu_step_latency_sdxl.json").read_text())}
    text, base = readme_text(), rows["sdxl-base-1.0"]
    assert f"median step sdxl-base-1.0 {base['step_latency_ms'] / 1000:.1f} s" in text
    for name in ("ssd-1b", "segmind-vega"):
        r = rows[name]
        times = r["step_latency_all_ms"]
        assert len(times) >= 5 and f"{name} {statistics.median(times) / 1000:.1f} s" in text
        ratios = [a / b for a, b in zip(base["step_latency_all_ms"], times, strict=True)]
        spread = f"{statistics.median(ratios):.2f} ± {statistics.stdev(ratios):.2f}x for {name}"
        assert f"{spread} (MAC ratio {base['unet_macs'] / r['unet_macs']:.2f})" in text, spread
        assert f"{min(ratios):.2f}-{max(ratios):.2f}x" in text
    assert f"from {base['load_average'][0]:.1f} to {base['load_average_end'][0]:.1f}" in text


def test_the_progressive_paragraph_and_row_are_the_sweeps_file():
    """benchmarks/results/toy_step_distillation_sweeps.json (benchmarks/toy_step_sweeps.py): the README's
    progressive-distillation paragraph and its row in the fewer-steps table."""
    data = json.loads((RESULTS / "toy_step_distillation_sweeps.json").read_text())
    prog, lcm = data["progressive"], data["lcm"]
    p = prog["lr1e-4"]["fidelity_by_steps"]
    text = readme_text()
    for phrase in (
        f"480 steps, {prog['lr1e-4']['train_s_under_load'] / 60:.1f} min",
        f"the 4-step student scores caption fidelity {p['4'][0]:.3f} (held out {p['4'][1]:.3f})",
        f"the LCM student of the same KD student {lcm['lr1e-4']['fidelity_by_steps']['4'][0]:.3f} at 4 steps",
        f"stage 1 alone already gives {prog['lr1e-4_per_round_checkpoints']['step160_4'][0]:.3f} at 4 DDIM steps",
        f"{p['4'][0]:.3f} ({p['2'][0]:.3f} at 2 steps)",
        f"(3e-4: {prog['lr3e-4']['fidelity_by_steps']['4'][0]:.3f})",
        f"(250 steps: {prog['lr1e-4-r250']['fidelity_by_steps']['4'][0]:.3f})",
    ):
        assert phrase in text, phrase
    teacher = next(
        r for r in json.loads((RESULTS / "toy_steps.json").read_text())["rows"] if r["row"] == "teacher"
    )
    row = (
        f"| 4 | 2 | {p['4'][0]:.3f} ({p['4'][1]:.3f}) | {p['4'][0] / teacher['caption_fidelity_mean']:.0%} |"
    )
    assert any(line.startswith("| progressive, [16, 8, 4]") and row in line for line in readme_rows()), row


def test_the_fullsize_bf16_table_is_its_results_file():
    data = json.loads((RESULTS / "fullsize_steps_bf16.json").read_text())
    rows = readme_rows()
    for r in data["rows"]:
        assert r["image_s_std"] == pytest.approx(statistics.stdev(r["image_s_all"]), abs=1e-12), r["row"]
        want = f"| {r['decoder_params']:,} | {r['image_s_median']:.2f} ± {r['image_s_std']:.2f} |"
        assert any(want in line for line in rows), (r["row"], want)
    tiny = data["rows"][-1]
    assert any(f"**{tiny['speedup_vs_sd']:.1f}x** |" in line for line in rows)


def test_the_toy_per_image_paragraph_is_its_timing_file():
    per_image = json.loads((RESULTS / "toy_tiny_decoder_timing.json").read_text())["per_image"]
    text = " ".join((ROOT / "README.md").read_text().split())
    ms, parts = per_image["image_ms"], per_image["parts_ms"]
    speedup = per_image["speedup_vs_teacher"]
    unet_only = 25 * parts["teacher_unet_call_batch_2"] / (4 * parts["student_unet_call_batch_1"])
    for figure in (
        f"guidance {ms['teacher_25_steps']:.0f} ms",
        f"{ms['student_4_steps_full_decoder']:.1f} ms with the full decoder ({speedup['student_4_steps_full_decoder']:.1f}x)",
        f"{ms['student_4_steps_tiny_decoder']:.1f} ms with the tiny one (**{speedup['student_4_steps_tiny_decoder']:.1f}x**",
        f"four U-Net evaluations of {parts['student_unet_call_batch_1']:.1f} ms",
        f"text encoding {parts['text_encoding']:.1f} ms",
        f"tiny decode {parts['tiny_decode']:.1f} ms (the full one: {parts['full_decode']:.1f} ms)",
        f"doubled batch costs {parts['teacher_unet_call_batch_2']:.1f} ms",
        f"give {unet_only:.1f}x",
    ):
        assert figure in text, figure


TINY_SETS = ("reconstructions", "teacher_seen", "teacher_held_out", "student_seen", "student_held_out")


def tiny_decoder_rows(summary: dict) -> dict[str, list[str]]:
    """The tiny decoder's table (README, "A tiny decoder"): a row per figure, a column per set of latents."""
    s = [summary[name] for name in TINY_SETS]

    def sampled(fmt):
        return [""] + [fmt(x) for x in s[1:]]

    return {
        "PSNR (dB; target >= 28)": [f"{x['psnr_db']['mean']:.1f} ± {x['psnr_db']['std']:.1f}" for x in s],
        "SSIM": [f"{x['ssim']['mean']:.3f} ± {x['ssim']['std']:.3f}" for x in s],
        "worst channel's mean shift, worst seed (grey levels; target <= 2)": [
            f"{x['colour_shift_max_abs']:.2f}" for x in s
        ],
        "worst channel's mean absolute shift per image, worst seed": [
            f"{x['colour_shift_per_image_abs_max']:.1f}" for x in s
        ],
        "caption fidelity, full decoder": sampled(lambda x: f"{x['fidelity_full']:.3f}"),
        "caption fidelity, tiny decoder": sampled(
            lambda x: f"{x['fidelity_tiny']['mean']:.3f} ± {x['fidelity_tiny']['std']:.3f}"
        ),
        "tiny / full (target >= 97%)": sampled(
            lambda x: f"{x['fidelity_ratio']['mean']:.1%} ± {x['fidelity_ratio']['std']:.1%}"
        ),
    }


@pytest.mark.parametrize("name", ["toy_tiny_decoder.json", "toy_tiny_decoder_1000.json"])
def test_the_tiny_decoder_tables_are_their_results_files(name):
    """benchmarks/toy_tiny_decoder.py's evaluation (the config's 4000 steps; the demo's 1000): every cell of its
    README table, the table headed by the file's name."""
    data = json.loads((RESULTS / name).read_text())
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and f"`{name}`" in line)
    want = tiny_decoder_rows(data["summary"])
    table = [line for line in lines[start:] if line.startswith("|")][: 2 + len(want)]
    for label, cells in want.items():
        assert f"| {label} | " + " | ".join(cells) + " |" in table, (name, label)
    for r in data["per_seed"]:
        for name_ in TINY_SETS:
            assert r[name_]["images"] == data["summary"][name_]["images"]


def test_the_tiny_decoder_sweep_table_is_its_results_file():
    data = json.loads((RESULTS / "toy_tiny_decoder_sweep.json").read_text())
    rows = readme_rows()
    for name, c in data["candidates"].items():
        s = c["summary"]
        cells = [
            f"{s['reconstructions']['psnr_db']['mean']:.1f}",
            f"{s['teacher_seen']['psnr_db']['mean']:.1f}",
            f"{s['student_seen']['psnr_db']['mean']:.1f}",
            f"{max(s[k]['colour_shift_max_abs'] for k in s):.2f}",
            f"{s['teacher_seen']['fidelity_ratio']['mean']:.1%}",
            f"{s['student_seen']['fidelity_ratio']['mean']:.1%}",
        ]
        chosen = " (chosen)" if name == data["chosen"] else ""
        assert f"| {name}{chosen} | " + " | ".join(cells) + " |" in rows, name


def test_the_latent_noise_sentence_is_the_sweeps_file():
    """The latent-noise sentence under the sweep's table (README, "A tiny decoder"): its figures from the file."""
    data = json.loads((RESULTS / "toy_tiny_decoder_sweep.json").read_text())
    c = {k: v["summary"] for k, v in data["candidates"].items()}
    m = data["machine"]
    full = c["steps-4000"]["teacher_seen"]
    seen = round(full["fidelity_full"] * full["images"])

    def psnr(name):
        return f"{c[name]['student_seen']['psnr_db']['mean']:.1f}"

    def fid(name):
        return f"{c[name]['teacher_seen']['fidelity_ratio']['mean']:.1%}"

    text = readme_text()
    for phrase in (
        f"load average {m['loadavg_start'][0]:.1f} to {m['loadavg_end'][0]:.1f}",
        f"({psnr('noise-0.1-2000')} and {psnr('noise-0.3-2000')} dB at σ 0.1 and 0.3, against "
        f"{psnr('steps-2000')} at 2000 steps and",
        f"{psnr('steps-4000')} at 4000)",
        f"({fid('noise-0.1-2000')} and {fid('noise-0.3-2000')}, against {fid('steps-2000')} and",
        f"{fid('steps-4000')}): no clear win",
        f"{seen} teacher images the full decoder reads right: one image is {1 / seen:.1%} of that ratio",
    ):
        assert phrase in text, phrase
    assert data["date"].startswith("2026-12-07") and data["chosen"] == "steps-4000"


def test_the_tiny_decoder_sentences_are_their_results_files():
    """The figures of the toy tiny-decoder paragraph's sentences, from its results files."""
    new = json.loads((RESULTS / "toy_tiny_decoder.json").read_text())
    old = json.loads((RESULTS / "toy_tiny_decoder_1000.json").read_text())
    demo = json.loads((RESULTS / "toy_demo_run.json").read_text())
    s, o = new["summary"], old["summary"]
    student = [r["student_seen"]["colour_shift_max_abs"] for r in new["per_seed"]]
    held = [r["student_held_out"]["colour_shift_rgb"] for r in new["per_seed"]]
    worst = max(held, key=lambda rgb: max(abs(v) for v in rgb))
    text = readme_text()

    def only_full(data):
        return ", ".join(str(r["teacher_held_out"]["only_full_right"]) for r in data["per_seed"][:-1]) + (
            f" and {data['per_seed'][-1]['teacher_held_out']['only_full_right']}"
        )

    def ratio(x):
        return f"{x['fidelity_ratio']['mean']:.1%} ± {x['fidelity_ratio']['std']:.1%}"

    for phrase in (
        f"load average {new['machine']['loadavg_start'][0]:.1f} to {new['machine']['loadavg_end'][0]:.1f}",
        f"({new['data_checks']['evaluation_reconstructions_skipped_as_training_images']} draws pixel-identical",
        f"PSNR on reconstructions ({s['reconstructions']['psnr_db']['mean']:.1f} dB)",
        f"on the teacher's seen samples ({s['teacher_seen']['psnr_db']['mean']:.1f})",
        f"the student's seen ones ({s['student_seen']['psnr_db']['mean']:.1f})",
        f"(teacher {s['teacher_held_out']['psnr_db']['mean']:.1f} dB, {28 - s['teacher_held_out']['psnr_db']['mean']:.1f}"
        " short",
        f"student {s['student_held_out']['psnr_db']['mean']:.1f}, {28 - s['student_held_out']['psnr_db']['mean']:.1f}"
        " short",
        f"({max(student):.2f} grey levels seen, {max(abs(v) for v in worst):.2f} held-out: red",
        f"teacher's held-out images ({ratio(s['teacher_held_out'])})",
        f"({ratio(o['teacher_held_out'])} at 1000 steps, {ratio(s['teacher_held_out'])} at 4000:",
        f"{only_full(new)} images only the full decoder reads right at 4000 against {only_full(old)} at 1000",
        f"({o['teacher_held_out']['psnr_db']['mean']:.1f} and {o['student_held_out']['psnr_db']['mean']:.1f} dB held"
        f" out, {o['student_seen']['psnr_db']['mean']:.1f} seen student) nor the student's held-out colour shift"
        f" ({o['student_held_out']['colour_shift_max_abs']:.2f})",
        f"three times the decoder's {demo['timings_s']['tiny_decoder_train_s']:.0f} s",
    ):
        assert phrase in text, phrase
    assert max(abs(v) for v in worst) == abs(worst[0]) and worst[0] > 0  # red, redder than the full decode
