"""slimsd bench on the micro models: JSON fields, counting's numbers, the Markdown table and the chart."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from slimsd.cli import main
from slimsd.measure import bench
from slimsd.models.counting import count_params, summarize

ENV_FIELDS = ("device", "dtype", "torch", "diffusers", "date", "cpu_model", "cpu_isa", "threads")


@pytest.fixture(scope="module")
def rows():
    cfg = bench.BenchConfig(
        models=["micro-sd", "micro-sdxl"],
        device="cpu",
        dtype="float32",
        steps=2,
        warmup=0,
        repeats=2,
        baseline="diffusers",
        batch_sizes=[1, 2],
        threads=1,
    )
    return bench.run(cfg)


def test_rows_have_the_contract_fields(rows):
    assert [r["model"] for r in rows] == ["micro-sd", "micro-sdxl"]
    for r in rows:
        for key in (
            "unet_params",
            "unet_macs",
            "step_latency_ms",
            "text_encode_s",
            "denoise_s",
            "vae_decode_s",
            "e2e_s",
            "peak_memory_bytes",
            "images_per_s",
            "baseline_step_latency_ms",
            *ENV_FIELDS,
        ):
            assert key in r, key
        assert r["step_latency_ms"] > 0 and len(r["step_latency_all_ms"]) == 2
        assert set(r["images_per_s"]) == {"1", "2"}
        assert r["e2e_s"] == pytest.approx(r["text_encode_s"] + r["denoise_s"] + r["vae_decode_s"])
        assert r["peak_memory_bytes"] > 50 * 2**20  # at least torch itself is resident
        assert r["dtype"] == "fp32" and r["device"] == "cpu" and r["threads"] == 1
        assert r["torch"] == torch.__version__
        # the optimised U-Net and plain diffusers compute the same thing
        assert r["max_abs_diff_vs_baseline"] < 1e-3
    json.dumps(rows)  # JSON-ready


def test_counts_equal_counting(rows, micro_sd, micro_sdxl):
    for r, pipe in zip(rows, (micro_sd, micro_sdxl), strict=True):
        s = summarize(r["model"], 64)
        assert r["unet_params"] == s["unet_params"] == count_params(pipe.unet)
        assert r["unet_macs"] == s["unet_macs"]
    assert rows[1]["mac_ratio_vs_first"] == pytest.approx(rows[0]["unet_macs"] / rows[1]["unet_macs"])
    assert rows[0]["speedup_vs_first"] == 1.0


def test_markdown_table(rows):
    md = bench.markdown_table(rows)
    lines = md.splitlines()
    assert lines[0].startswith(
        "| model | px | U-Net params (M) | U-Net MACs (G) | step ms | diffusers step ms"
    )
    assert lines[2].startswith("| micro-sd | 64 | 3.2 |") and lines[3].startswith("| micro-sdxl | 64 |")
    assert len({line.count("|") for line in lines[:4]}) == 1  # every row has every column
    assert "torch " + torch.__version__ in md and "fp32" in md


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
    assert len(out["a"]["times_s"]) == 3 and out["b"]["median_ms"] >= 0


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
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "b.md"),
        ]
    )
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "micro-sd" and rows[0]["dtype"] == "bf16"
    assert rows[0]["unet_macs"] == summarize("micro-sd", 64)["unet_macs"]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| micro-sd |" in (tmp_path / "b.md").read_text()
    assert "| micro-sd |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--models", "micro-sd", "--device", "cpu", "--dtype", "float16"], "float16"),
        (["--models", "not-a-model", "--device", "cpu"], "not-a-model"),
        (["--models", "org/repo", "--random-weights", "--device", "cpu"], "org/repo"),
        (["--models", "micro-sd", "--device", "cpu", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["--models", "micro-sd", "--dtype", "int4"], "int4"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
