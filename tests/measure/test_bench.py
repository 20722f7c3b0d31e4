"""slimsd bench on the micro models: labelled rows (slimsd and plain diffusers in the same and in the default
dtype), MACs against torch's own FLOP counter, the end-to-end split against components of known cost, ratios
on known timings, the Markdown table and the chart."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from PIL import Image

from slimsd.cli import main
from slimsd.measure import bench

from helpers import tiny_decoder_folder

ENV_FIELDS = ("device", "torch", "diffusers", "date", "cpu_model", "cpu_isa", "threads", "process")


# one worker runs this module: its bench run (~30 s) is a module fixture, made once
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def rows():
    cfg = bench.BenchConfig(
        models=["micro-sd", "micro-sdxl"],
        device="cpu",
        dtype="bf16",
        steps=2,
        warmup=0,
        repeats=2,
        baseline="diffusers",
        batch_sizes=[1, 2],
        threads=1,
    )
    return bench.run(cfg)


def flop_counter_macs(model: str, resolution: int) -> int:
    """U-Net MACs by torch's FLOP counter (convolution + addmm + mm FLOPs / 2): BK-SDM's convention computed
    by another implementation than slimsd.models.counting's hooks."""
    from torch.utils.flop_counter import FlopCounterMode

    from slimsd.models.counting import unet_dummy_inputs
    from slimsd.models.micro import build_micro

    unet = build_micro(model).unet
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**unet_dummy_inputs(unet, resolution, device="cpu"))
    flops = counter.get_flop_counts()["Global"]
    return sum(v for op, v in flops.items() if str(op) in ("aten.convolution", "aten.addmm", "aten.mm")) // 2


def test_each_model_has_a_labelled_row_per_variant(rows):
    got = [(r["model"], r["variant"], r["dtype"]) for r in rows]
    assert got == [
        ("micro-sd", "slimsd", "bf16"),
        ("micro-sd", "diffusers-same-dtype", "bf16"),
        ("micro-sd", "diffusers-default-dtype", "fp32"),
        ("micro-sdxl", "slimsd", "bf16"),
        ("micro-sdxl", "diffusers-same-dtype", "bf16"),
        ("micro-sdxl", "diffusers-default-dtype", "fp32"),
    ]
    assert [r["label"] for r in rows[:3]] == [
        "slimsd",
        "diffusers (same dtype)",
        "diffusers (its default dtype)",
    ]
    for r in rows:
        for key in (
            "unet_macs",
            "step_latency_ms",
            "e2e_s",
            "peak_memory_bytes",
            "images_per_s",
            *ENV_FIELDS,
        ):
            assert key in r, key
        assert len(r["step_latency_all_ms"]) == 2 and set(r["images_per_s"]) == {"1", "2"}
        assert r["device"] == "cpu" and r["threads"] == 1 and r["torch"] == torch.__version__
    json.dumps(rows)  # JSON-ready


def test_slimsd_rows_run_the_runtime_and_diffusers_rows_do_not(rows):
    for r in rows:
        slimsd = r["variant"] == "slimsd"
        for where in ("step_runtime", "runtime"):  # the timed U-Net, and the end-to-end pipeline
            applied = r[where]
            assert applied["optimized"] is slimsd
            assert applied["channels_last"] is slimsd and applied["fused_qkv"] is slimsd
            assert applied["dtype"] == r["dtype"]
    # one process: every row under the same process-wide settings (threads, flush-denormal)
    assert len({json.dumps(r["process"], sort_keys=True) for r in rows}) == 1


# Bounds from rounding arguments, not from a run. The micro U-Nets' outputs are noise predictions of scale <= 1.
# In fp32 the runtime only reorders sums (fused QKV, channels_last kernels): ~30 layers in sequence, each summing
# up to ~10^3 terms (~sqrt(10^3) = 30 unit roundoffs), so at most ~10^3 roundoffs of 2^-24.
FP32_REORDERING = 1e3 * 2**-24  # 6e-5; measured 1.3e-6 (micro-sd) and 1.8e-6 (micro-sdxl) on the dev CPU
# bf16: activations rounded at each of ~30 layers, errors adding in quadrature: ~sqrt(30) ~ 6, say 8 roundoffs
# of 2^-8 from the fp32 result for one bf16 computation, twice that between two bf16 computations.
BF16_VS_FP32 = 8 * 2**-8  # 0.031; measured 0.012 / 0.015
BF16_VS_BF16 = 2 * BF16_VS_FP32  # 0.0625; measured 0.012 / 0.016


def test_same_dtype_baseline_computes_what_slimsd_computes(rows):
    for r in rows:
        if r["variant"] == "diffusers-same-dtype":
            assert r["max_abs_diff_vs_slimsd"] <= BF16_VS_BF16, r  # bf16 rounding of a different kernel order
        if r["variant"] == "diffusers-default-dtype":
            assert r["max_abs_diff_vs_slimsd"] <= BF16_VS_FP32, r  # fp32 vs bf16


@pytest.mark.slow(seconds=20)
def test_in_fp32_the_baseline_and_slimsd_differ_only_by_the_order_of_sums():
    cfg = bench.BenchConfig(
        models=["micro-sd", "micro-sdxl"],
        device="cpu",
        dtype="fp32",
        steps=1,
        warmup=0,
        repeats=1,
        baseline="diffusers",
        batch_sizes=[1],
        threads=1,
        e2e=False,
    )
    diffs = {r["model"]: r["max_abs_diff_vs_slimsd"] for r in bench.run(cfg) if r["variant"] != "slimsd"}
    assert set(diffs) == {"micro-sd", "micro-sdxl"}
    assert max(diffs.values()) <= FP32_REORDERING, diffs


def test_macs_equal_torchs_flop_counter(rows):
    for r in rows:
        assert r["unet_macs"] == flop_counter_macs(r["model"], 64)
        assert r["resolution"] == 64


def test_fp32_has_one_diffusers_row_that_is_also_its_default():
    cfg, rt = bench.resolve(
        bench.BenchConfig(models=["micro-sd"], device="cpu", dtype="fp32", baseline="diffusers")
    )
    assert [(v.name, v.dtype) for v in bench.variants(cfg, rt)] == [
        ("slimsd", torch.float32),
        ("diffusers", torch.float32),
    ]
    assert bench.LABELS["diffusers"] == "diffusers (same dtype, also its default)"


def test_end_to_end_parts_are_timed_where_they_run(monkeypatch):
    """Components that take known minimum times: each part of the split must hold at least its own."""
    from slimsd.models.loading import load

    pipe = load("micro-sd", device="cpu", dtype="fp32", optimize=False, scheduler="ddim")  # one call a step
    calls = {"text": 0, "unet": 0, "vae": 0}

    def slow(part, fn, seconds):
        def wrapped(*args, **kwargs):
            calls[part] += 1
            time.sleep(seconds)
            return fn(*args, **kwargs)

        return wrapped

    pipe.text_encoder.forward = slow("text", pipe.text_encoder.forward, 0.05)
    pipe.unet.forward = slow("unet", pipe.unet.forward, 0.04)
    pipe.vae.decode = slow("vae", pipe.vae.decode, 0.3)
    cfg = bench.BenchConfig(models=["micro-sd"], steps=3)
    for variant in (
        bench.Variant("slimsd", torch.float32, True),
        bench.Variant("diffusers", torch.float32, False),
    ):
        calls.update(text=0, unet=0, vae=0)
        t = bench.generate_timed(pipe, cfg, variant, 64, 1, 3, 7.5)
        assert calls == {
            "text": 2,
            "unet": 3,
            "vae": 1,
        }  # prompt + negative, one CFG batch per step, one decode
        assert t["text_encode_s"] >= 2 * 0.05
        assert t["vae_decode_s"] >= 0.3
        assert t["denoise_s"] >= 3 * 0.04  # the U-Net steps land in "denoise", not in text or VAE
        assert t["text_encode_s"] < 0.3 and t["denoise_s"] < t["total_s"]  # nor the VAE's 0.3 s in text


def test_end_to_end_runs_alternate_abba_and_keep_the_median(monkeypatch):
    order = []
    totals = iter([9.0, 9.0, 3.0, 30.0, 1.0, 10.0, 2.0, 20.0])  # warm-ups, then the timed runs in call order

    class Pipe:
        def __init__(self, name):
            self.name, self.components, self._slimsd = name, {}, {"runtime": {"optimized": name == "slimsd"}}

    def fake_timed(pipe, cfg, variant, resolution, batch, steps, guidance):
        order.append((variant.name, steps))
        total = next(totals)
        return {"total_s": total, "text_encode_s": 0.0, "vae_decode_s": 0.0, "denoise_s": total}

    monkeypatch.setattr(bench, "load_variant", lambda model, cfg, v, device: Pipe(v.name))
    monkeypatch.setattr(bench, "generate_timed", fake_timed)
    cfg = bench.BenchConfig(models=["micro-sd"], steps=4, batch_sizes=[1], e2e_repeats=3)
    kinds = [bench.Variant("slimsd", torch.float32, True), bench.Variant("diffusers", torch.float32, False)]
    out = bench.measure_end_to_end("micro-sd", cfg, kinds, "cpu", 64)
    slimsd, diffusers = ("slimsd", 4), ("diffusers", 4)
    assert order == [("slimsd", 1), ("diffusers", 1), slimsd, diffusers, diffusers, slimsd, slimsd, diffusers]
    assert out["slimsd"]["e2e_all_s"] == [3.0, 10.0, 2.0] and out["slimsd"]["total_s"] == 3.0
    assert out["diffusers"]["e2e_all_s"] == [30.0, 1.0, 20.0] and out["diffusers"]["total_s"] == 20.0
    assert out["slimsd"]["runtime"] == {"optimized": True}


def test_slimsd_end_to_end_runs_with_deep_cache_and_records_it(monkeypatch, rows):
    from slimsd.models.loading import load

    pipe = load("micro-sd", scheduler="euler")  # one U-Net call a step
    calls = {"deep": 0, "shallow": 0}
    handles = [
        pipe.unet.mid_block.register_forward_hook(lambda *a: calls.__setitem__("deep", calls["deep"] + 1)),
        pipe.unet.up_blocks[-1].register_forward_hook(
            lambda *a: calls.__setitem__("shallow", calls["shallow"] + 1)
        ),
    ]
    cfg = bench.BenchConfig(models=["micro-sd"], deep_cache=3, batch_sizes=[1])
    for variant, deep in (
        (bench.Variant("slimsd", torch.float32, True), 3),
        (bench.Variant("diffusers", torch.float32, False), 7),
    ):
        calls.update(deep=0, shallow=0)
        bench.generate_timed(pipe, cfg, variant, 64, 1, 7, 7.5)
        assert calls == {"deep": deep, "shallow": 7}  # plain diffusers has no deep cache: every step full
    for handle in handles:
        handle.remove()

    # the rows say so
    def fake_timed(pipe, cfg, variant, resolution, batch, steps, guidance):
        return {"total_s": 1.0, "text_encode_s": 0.0, "vae_decode_s": 0.0, "denoise_s": 1.0}

    monkeypatch.setattr(bench, "load_variant", lambda model, cfg, v, device: pipe)
    monkeypatch.setattr(bench, "generate_timed", fake_timed)
    kinds = [bench.Variant("slimsd", torch.float32, True), bench.Variant("diffusers", torch.float32, False)]
    out = bench.measure_end_to_end("micro-sd", cfg, kinds, "cpu", 64)
    assert (out["slimsd"]["deep_cache"], out["diffusers"]["deep_cache"]) == (3, 1)
    table = bench.markdown_table([{**rows[0], "deep_cache": 3}, {**rows[1], "deep_cache": 1}])
    assert "| micro-sd | slimsd, deep cache 3 |" in table and "| micro-sd | diffusers (same dtype) |" in table


def test_ratios_from_known_timings():
    rows = [
        {"model": "a", "variant": "slimsd", "unet_macs": 300, "step_latency_ms": 10.0, "e2e_s": 2.0},
        {"model": "a", "variant": "diffusers", "unet_macs": 300, "step_latency_ms": 15.0, "e2e_s": 3.0},
        {"model": "b", "variant": "slimsd", "unet_macs": 100, "step_latency_ms": 4.0, "e2e_s": 1.0},
        {"model": "b", "variant": "diffusers", "unet_macs": 100, "step_latency_ms": 5.0, "e2e_s": 1.5},
    ]
    bench._ratios(rows)
    a, a_base, b, b_base = rows
    assert (b["mac_ratio_vs_first"], b["speedup_vs_first"], b["speedup_over_mac_ratio"]) == (
        3.0,
        2.5,
        2.5 / 3,
    )
    assert (b_base["speedup_vs_first"], a["speedup_vs_first"]) == (3.0, 1.0)  # 15 / 5, within its own variant
    assert (a["step_speedup_vs_diffusers"], a["e2e_speedup_vs_diffusers"]) == (1.5, 1.5)
    assert (b["step_speedup_vs_diffusers"], b["e2e_speedup_vs_diffusers"]) == (1.25, 1.5)
    assert "step_speedup_vs_diffusers" not in a_base


def test_markdown_table(rows):
    md = bench.markdown_table(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| model | run | dtype | px | U-Net params (M) | U-Net MACs (G) | step ms |")
    assert lines[2].startswith("| micro-sd | slimsd | bf16 | 64 | 3.2 | 0.0417 |")
    assert lines[3].startswith("| micro-sd | diffusers (same dtype) | bf16 | 64 |")
    assert lines[4].startswith("| micro-sd | diffusers (its default dtype) | fp32 | 64 |")
    assert len({line.count("|") for line in lines[:8]}) == 1  # every row has every column
    speedup = rows[0]["step_speedup_vs_diffusers-same-dtype"]
    assert f"| {speedup:,.2f}× |" in lines[3]
    assert "torch " + torch.__version__ in md and "channels_last" in md


def test_chart_is_a_png(rows):
    png = bench.chart_png(rows)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 300 and img.height > 200


def test_round_robin_interleaves():
    calls = []
    out = bench.time_round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", warmup=2, repeats=3
    )
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert len(out["a"]["times_s"]) == 3 and len(out["b"]["times_s"]) == 3


def test_peak_memory_resets():
    bench.reset_peak_memory("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB
    big.add_(1)
    high, kind = bench.peak_memory("cpu")
    del big
    if kind != "peak_rss":
        pytest.skip("no /proc/self/clear_refs here")
    bench.reset_peak_memory("cpu")
    low, _ = bench.peak_memory("cpu")
    assert high - low > 200 * 2**20


def test_cli_writes_json_markdown_and_chart(tmp_path, capsys):
    out = tmp_path / "b.json"
    main(
        [
            "bench",
            "--models",
            "micro-sd",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--no-e2e",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--no-optimize",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "b.md"),
        ]
    )
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "micro-sd" and rows[0]["dtype"] == "bf16"
    assert rows[0]["step_runtime"]["optimized"] is False and rows[0]["step_runtime"]["channels_last"] is False
    assert rows[0]["unet_macs"] == flop_counter_macs("micro-sd", 64)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| micro-sd |" in (tmp_path / "b.md").read_text()
    assert "| micro-sd |" in capsys.readouterr().out


@pytest.mark.slow(seconds=20)
def test_cli_vae_decodes_every_row_with_the_tiny_decoder_and_records_it(tmp_path, capsys):
    """--vae DIR: the slimsd row and plain diffusers' rows all decode with the tiny decoder (the decoder each
    pipeline ran holds the folder's AutoencoderTiny's parameter count, not the micro VAE decoder's); every row
    and the table's footnote say which."""
    import hashlib

    from diffusers import AutoencoderTiny

    from slimsd.models.micro import build_micro

    folder = tiny_decoder_folder(tmp_path, "micro-sd")
    out = tmp_path / "b.json"
    args = ["bench", "--models", "micro-sd", "--device", "cpu", "--dtype", "bf16", "--baseline", "diffusers"]
    args += ["--steps", "1", "--warmup", "0", "--repeats", "1", "--threads", "1", "--vae", str(folder)]
    main([*args, "--json", str(out), "--markdown", str(tmp_path / "b.md")])
    rows = json.loads(out.read_text())
    sha = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    tiny = sum(p.numel() for p in AutoencoderTiny.from_pretrained(folder).decoder.parameters())
    full = sum(p.numel() for p in build_micro("micro-sd").vae.decoder.parameters())
    assert [r["variant"] for r in rows] == ["slimsd", "diffusers-same-dtype", "diffusers-default-dtype"]
    for r in rows:
        assert r["vae"] == {"path": str(folder.resolve()), "sha256": sha}
        assert r["vae_decoder_params"] == tiny != full
        assert r["vae_decode_s"] > 0
    assert f"decoder: tiny decoder {folder.resolve()} (sha256 {sha[:10]})" in (tmp_path / "b.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--models", "micro-sd", "--device", "cpu", "--vae", "/nonexistent"],
            "'/nonexistent' does not exist",
        ),
        (["--models", "micro-sd", "--device", "cpu", "--dtype", "float16"], "float16"),
        (["--models", "not-a-model", "--device", "cpu"], "not-a-model"),
        (["--models", "org/repo", "--random-weights", "--device", "cpu"], "org/repo"),
        (["--models", "micro-sd", "--device", "cpu", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["--models", "micro-sd", "--dtype", "int4"], "int4"),
        (["--models", "micro-sd", "--device", "cpu", "--deep-cache", "0"], "deep-cache 0"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
