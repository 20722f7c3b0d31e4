"""FID / IS / CLIP score, the report and `slimsd eval`, offline with stand-in extractors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.measure import evaluate as ev
from slimsd.run.pnginfo import settings_from_png

from helpers import html_tables, run_cli, tiny_decoder_folder

# ---------------------------------------------------------------------------------------------------------------
# End to end


def _folder(tail: str, identity: str) -> str:
    """A model's image folder as the README states it: a readable tail, then 8 hex digits of sha256(identity)."""
    return f"{tail}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _smoke_args(model, prompts, out, *extra) -> list[str]:
    """`slimsd eval` on stand-in scorers (offline, fast), 2 steps at 64 px, JSON out."""
    return [
        "eval",
        "-m",
        str(model),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--fid-extractor",
        "stand-in",
        "--clip-model",
        "stand-in",
        "--is-splits",
        "2",
        "--device",
        "cpu",
        "--json",
        *extra,
    ]


def _prompts_and_reference(tmp_path):
    """Three prompts with ids r, g, b, and a reference folder of four random 40 px images."""
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,caption\nr,a red circle\ng,a green square\nb,a blue triangle\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(6)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    return prompts, ref


def _eval(args, capsys) -> dict:
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    return json.loads(stdout)


@pytest.mark.slow
def test_two_students_whose_folders_share_a_name_get_their_own_images_and_scores(tmp_path, capsys):
    from slimsd.models.compress import compress

    students = {"a": tmp_path / "runs" / "a" / "final", "b": tmp_path / "runs" / "b" / "final"}
    compress("micro-sd", "bk-small", students["a"])
    compress("micro-sd", "bk-tiny", students["b"])
    prompts, ref = _prompts_and_reference(tmp_path)

    def scores(result, name):
        (row,) = [r for r in result["models"] if r["model"] == str(students[name])]
        return row

    runs = {}
    for order in ("ab", "ba"):  # each order into its own --out; the first run of each is a fresh --out
        out = tmp_path / f"out-{order}"
        for name in order:
            runs[order, name] = _eval(
                _smoke_args(students[name], prompts, out, "--reference", str(ref)), capsys
            )
        assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
            _folder(f"{n}_final", str(students[n].resolve())) for n in "ab"
        )
        for n in "ab":
            for png in (out / "images" / _folder(f"{n}_final", str(students[n].resolve()))).iterdir():
                assert settings_from_png(png)["model_source"] == str(students[n].resolve())
    metrics = ("fid", "inception_score", "clip_score")
    fresh = {"a": scores(runs["ab", "a"], "a"), "b": scores(runs["ba", "b"], "b")}
    assert all(fresh["a"][m] != fresh["b"][m] for m in metrics)  # two different students, two sets of scores
    for name, later in (("b", runs["ab", "b"]), ("a", runs["ba", "a"])):  # second into a shared --out
        assert later["generation"][str(students[name])]["generated"] == 3  # nothing taken from the other
        for m in metrics:
            assert scores(later, name)[m] == pytest.approx(fresh[name][m], rel=1e-9)


@pytest.mark.slow
def test_an_image_made_with_other_settings_is_made_again_and_counted(tmp_path, capsys, monkeypatch):
    prompts, _ = _prompts_and_reference(tmp_path)
    out = tmp_path / "out"
    images = out / "images" / _folder("micro-sd", "micro-sd")
    first = _eval(_smoke_args("micro-sd", prompts, out), capsys)
    assert first["generation"]["micro-sd"]["generated"] == 3
    # More steps: every image is made again, and the count says why.
    args = _smoke_args("micro-sd", prompts, out, "--steps", "3")
    again = _eval(args, capsys)["generation"]["micro-sd"]
    assert (again["generated"], again["regenerated"], again["reused"], again["differing"]) == (
        3,
        3,
        0,
        {"steps": 3},
    )
    assert {settings_from_png(p)["steps"] for p in images.iterdir()} == {3}
    cached = _eval([*args, "--deep-cache", "2"], capsys)
    assert cached["generation"]["micro-sd"]["differing"] == {"deep_cache": 3}
    assert cached["settings"]["deep_cache"] == 2
    assert {settings_from_png(p)["deep_cache"] for p in images.iterdir()} == {2}
    assert _eval(args, capsys)["generation"]["micro-sd"]["differing"] == {"deep_cache": 3}  # and back
    # One image swapped for another prompt's, one without any PNG info: those two are made again, one reused.
    shutil.copy(images / "g.png", images / "b.png")
    Image.new("RGB", (64, 64)).save(images / "r.png")
    mixed = _eval(args, capsys)["generation"]["micro-sd"]
    assert (mixed["generated"], mixed["reused"], mixed["differing"]) == (2, 1, {"prompt": 1, "unreadable": 1})
    meta = settings_from_png(images / "b.png")
    assert (meta["prompt"], meta["seed"], meta["steps"]) == ("a blue triangle", 2, 3)
    # All in order now: nothing is loaded, let alone generated.
    import slimsd.models.loading

    monkeypatch.setattr(slimsd.models.loading, "_diffusers_pipeline", lambda *a, **k: pytest.fail("loaded"))
    assert _eval(args, capsys)["generation"]["micro-sd"]["reused"] == 3
    # --score-only never scores images made otherwise: one line naming the first.
    code, _, err = run_cli(_smoke_args("micro-sd", prompts, out, "--steps", "4", "--score-only"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "3 images of 'micro-sd'" in err and "(first: r.png, steps)" in err


@pytest.mark.slow
def test_eval_cli_end_to_end_on_micro_sd_and_resume(tmp_path, capsys, monkeypatch):
    prompts, ref = _prompts_and_reference(tmp_path)
    out = tmp_path / "out"
    args = _smoke_args("micro-sd", prompts, out, "--reference", str(ref), "--score-resolution", "48")
    args += ["--save-reference-stats", str(tmp_path / "ref.npz"), "--batch-size", "2"]

    # Shard 1/2 generates only prompt 1 and scores nothing.
    code, stdout, err = run_cli([*args, "--shard", "1/2"], capsys)
    assert code == 0, err
    images = out / "images" / _folder("micro-sd", "micro-sd")
    assert sorted(p.name for p in images.iterdir()) == ["g.png"]
    assert not (out / "scores.json").exists()
    g_bytes = (images / "g.png").read_bytes()

    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads((out / "scores.json").read_text())
    (row,) = result["models"]
    assert row["num_images"] == 3 and row["is_splits"] == 2
    assert np.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["clip_score"] <= 100
    assert result["generation"]["micro-sd"] == {
        "generated": 2,
        "reused": 1,
        "regenerated": 0,
        "differing": {},
        "in_shard": 3,
        "steps": 2,
        "guidance": 7.5,
    }
    assert (images / "g.png").read_bytes() == g_bytes  # kept, not regenerated
    meta = settings_from_png(images / "b.png")  # prompt row 2: seed 0 + 2
    assert (meta["seed"], meta["prompt"], meta["width"], meta["steps"]) == (2, "a blue triangle", 64, 2)
    cells = html_tables((out / "report.html").read_text()).tables["scores"][0]
    assert float(cells["fid"]) == pytest.approx(row["fid"], abs=5e-4)
    assert float(cells["clip_score"]) == pytest.approx(row["clip_score"], abs=5e-4)

    # Resume: nothing left to generate, so no pipeline is even loaded; same scores; reference from its .npz.
    import slimsd.models.loading

    monkeypatch.setattr(
        slimsd.models.loading, "_diffusers_pipeline", lambda *a, **k: pytest.fail("regenerated")
    )
    args[args.index(str(ref))] = str(tmp_path / "ref.npz")
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    again = json.loads(stdout)
    assert again["generation"]["micro-sd"]["generated"] == 0
    assert again["models"][0]["fid"] == pytest.approx(row["fid"], rel=1e-9)


@pytest.mark.slow
def test_eval_with_a_tiny_decoder_makes_plain_diffusers_images_in_their_own_folder(tmp_path, capsys):
    """--vae DIR: each image is what a plain diffusers pipeline with ``pipe.vae = AutoencoderTiny(DIR)`` makes
    (same seed, fp32, no runtime), in a folder of its own (the decoder's sha256 in the identity), recorded in
    scores.json and the PNG; the same model without it keeps its own images."""
    import torch
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    from slimsd.models.micro import build_micro

    prompts, _ = _prompts_and_reference(tmp_path)
    folder = tiny_decoder_folder(tmp_path, "micro-sd")
    sha = hashlib.sha256((folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    out = tmp_path / "out"
    runtime = ["--dtype", "fp32", "--no-optimize", "--clip-model", "none"]
    tiny = _eval([*_smoke_args("micro-sd", prompts, out, "--vae", str(folder)), *runtime], capsys)
    full = _eval([*_smoke_args("micro-sd", prompts, out), *runtime], capsys)
    record = {"path": str(folder.resolve()), "sha256": sha}
    assert tiny["models"][0]["vae"] == tiny["settings"]["vae"] == record
    assert full["models"][0]["vae"] is None and full["generation"]["micro-sd"]["generated"] == 3
    images = out / "images" / _folder(f"micro-sd_vae_{sha[:10]}", f"micro-sd+vae:{sha[:10]}")
    assert settings_from_png(images / "g.png")["vae"] == record

    plain = StableDiffusionPipeline(**build_micro("micro-sd").components)
    plain.set_progress_bar_config(disable=True)
    plain.vae = AutoencoderTiny.from_pretrained(folder)
    theirs = plain(
        "a green square",  # prompt row 1: seed 0 + 1
        num_inference_steps=2,
        guidance_scale=7.5,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    ours = np.asarray(Image.open(images / "g.png").convert("RGB"), dtype=np.int16)
    assert np.abs(ours - np.asarray(theirs, dtype=np.int16)).max() <= 1
    own = np.asarray(Image.open(out / "images" / _folder("micro-sd", "micro-sd") / "g.png"), dtype=np.int16)
    assert np.abs(own - ours).mean() > 5  # the model's own VAE decodes another image


def test_eval_cli_errors_are_one_line_and_come_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import slimsd.models.loading

    monkeypatch.setattr(slimsd.models.loading, "_diffusers_pipeline", lambda *a, **k: pytest.fail("loaded"))
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption\na cat\na dog\n")
    (tmp_path / "latin1.csv").write_bytes("caption\ncafé au lait\nthé\n".encode("latin-1"))
    (tmp_path / "huge.csv").write_text("caption\n" + "x" * 200_000 + "\nb\n")  # past csv's field limit
    (tmp_path / "one.csv").write_text("caption\na cat\n")
    rng = np.random.default_rng(8)
    good = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    for name, corrupt in (("garbage", b"not an image"), ("truncated", None)):
        folder = tmp_path / f"ref-{name}"
        folder.mkdir()
        for i, im in enumerate(good):
            im.save(folder / f"{i}.png")
        data = corrupt or (folder / "0.png").read_bytes()[:300]  # a PNG header, half its pixels
        (folder / "bad.png").write_bytes(data)
    stats = {"shapes": (np.zeros(3), np.zeros((2, 2))), "dims": (np.zeros(5), np.eye(5))}
    stats["nan"] = (np.full(32, np.nan), np.eye(32))  # 32: the stand-in extractor's features
    for name, (mu, sigma) in stats.items():
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
    (tmp_path / "a-file").write_text("")
    base = ["eval", "-m", "micro-sd", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    base += ["--fid-extractor", "stand-in", "--clip-model", "none"]
    swap = lambda flag, value: [value if a == base[base.index(flag) + 1] else a for a in base]  # noqa: E731
    for args, needle in (
        ([*base, "--shard", "3/2"], "shard"),
        ([*base, "--reference", str(tmp_path / "nope")], "does not exist"),
        ([*base, "--protocol", "coco"], "coco"),
        ([*base, "--score-only"], "missing"),
        (swap("--prompts", str(tmp_path / "latin1.csv")), "is not UTF-8 text (byte 0xe9 on line 2)"),
        (
            swap("--prompts", str(tmp_path / "huge.csv")),
            "is not a readable CSV: field larger than field limit",
        ),
        (swap("--prompts", str(tmp_path / "one.csv")), "gives 1 prompt; FID and IS need at least 2"),
        (
            [*base, "--reference", str(tmp_path / "ref-garbage")],
            f"{str(tmp_path / 'ref-garbage' / 'bad.png')!r}",
        ),
        ([*base, "--reference", str(tmp_path / "ref-truncated")], "truncated" + "/bad.png' is not readable"),
        ([*base, "--reference", str(tmp_path / "shapes.npz")], "mu of shape (D,) and sigma of shape (D, D)"),
        (
            [*base, "--reference", str(tmp_path / "dims.npz")],
            "statistics of 5 features; this FID extractor gives 32",
        ),
        ([*base, "--reference", str(tmp_path / "nan.npz")], "NaN"),
        (swap("-m", "nope"), "unknown model 'nope'"),
        ([*base, "--seed", str(2**40)], f"seed {2**40} is out of range"),
        ([*base, "--resolution", "63"], "width 63"),
        (swap("--out", str(tmp_path / "a-file" / "o")), "cannot create folder"),
        ([*base, "--save-reference-stats", str(tmp_path / "a-file" / "r.npz")], "cannot create folder"),
        (
            [*base, "--vae", str(tmp_path / "nope")],
            f"decoder {str(tmp_path / 'nope')!r} does not exist",
        ),
        ([*base, "--vae", str(tmp_path)], "holds no AutoencoderTiny"),
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err, (needle, err)
        assert len(err.strip().splitlines()) == 1, err


def test_protocol_fills_unset_settings_and_explicit_options_win(cpu_default):
    cfg = ev.resolve(
        ev.EvalConfig(models=["m"], prompts="p.csv", out="o", protocol="bk-sdm-coco30k", steps=5)
    )
    assert (cfg.resolution, cfg.score_resolution, cfg.scheduler, cfg.guidance, cfg.seed, cfg.num_prompts) == (
        512,
        256,
        "pndm",
        7.5,
        1234,
        30000,
    )
    assert cfg.steps == 5 and cfg.device == "cpu" and cfg.dtype == cpu_default
    plain = ev.resolve(ev.EvalConfig(models=["m"], prompts="p.csv", out="o"))
    assert (plain.resolution, plain.score_resolution, plain.scheduler, plain.num_prompts) == (None,) * 4
    with pytest.raises(SlimsdError, match="allowed"):
        ev.resolve(ev.EvalConfig(models=["m"], prompts="p.csv", out="o", scheduler="magic"))
