"""Bad input to every sub-command: exit code 2, one line on stderr naming the bad value, no traceback.

Each row is (command line, text the error line must contain). ``{tmp}`` in a row stands for a folder that
holds the bad files made by :func:`bad_files`. Checks that happen before a model loads need no model; the rest
use micro-sd with the smallest settings.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from helpers import run_cli

LATIN1 = "un caf\u00e9 rouge\n".encode("latin-1")  # \xe9 is not UTF-8 on its own


def png_with_chunk(path, chunk: str) -> None:
    info = PngInfo()
    info.add_text("slimsd", chunk)
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)


def bad_files(tmp) -> None:
    """The bad (and the few good) files the rows name."""
    (tmp / "latin1.txt").write_bytes(LATIN1)
    (tmp / "latin1.csv").write_bytes(b"caption\n" + LATIN1)
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "prompts.csv").write_text("caption\na red circle\na blue square\n")
    (tmp / "nocaption.csv").write_text("colour\nred\n")
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("someone's work\n")
    (tmp / "emptydir").mkdir()
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "model_index.json").write_text("{ not json")
    (tmp / "bad.yaml").write_text("teacher: [unclosed\n")
    (tmp / "bad.tar").write_bytes(b"not a tar file at all" * 40)
    (tmp / "junk.safetensors").write_bytes(b"not a safetensors file" * 4)
    (tmp / "ref").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp / "ref" / "good.png")
    (tmp / "ref" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    png_with_chunk(tmp / "wrong-types.png", json.dumps({"prompt": "a", "model": "micro-sd", "steps": "many"}))
    png_with_chunk(tmp / "not-object.png", json.dumps(["a red circle", 25]))
    png_with_chunk(tmp / "not-json.png", "{steps: 25")
    png_with_chunk(tmp / "big-seed.png", json.dumps({"prompt": "a", "model": "micro-sd", "seed": 2**40}))
    png_with_chunk(tmp / "bad-width.png", json.dumps({"prompt": "a", "model": "micro-sd", "width": 100}))
    png_with_chunk(
        tmp / "deep-cache-0.png", json.dumps({"prompt": "a", "model": "micro-sd", "deep_cache": 0})
    )
    png_with_chunk(
        tmp / "deep-cache-x.png", json.dumps({"prompt": "a", "model": "micro-sd", "deep_cache": "x"})
    )
    png_with_chunk(tmp / "grid.png", json.dumps({"grid": {"cols": 2}}))
    Image.new("RGB", (8, 8), "white").save(tmp / "plain.png")
    Image.new("RGB", (8, 8), "white").save(tmp / "photo.jpg")
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1")
    Image.new("RGB", (8, 8), "white").save(tmp / "a1111.png", pnginfo=info)


GEN = ["generate", "micro-sd", "a red circle", "--out", "{tmp}/gen", "--steps", "1"]
DISTILL = [
    "distill",
    "teacher=micro-sd",
    "data=shapes:4",
    "batch_size=2",
    "max_steps=1",
    "output_dir={tmp}/run",
    "tensorboard=false",
    "progress=false",
]
CACHE = ["cache", "--model", "micro-sd", "--out", "{tmp}/cache", "--resolution", "64"]
EVAL = [
    "eval",
    "--models",
    "micro-sd",
    "--prompts",
    "{tmp}/prompts.csv",
    "--out",
    "{tmp}/eval",
    "--steps",
    "1",
    "--fid-extractor",
    "stand-in",
    "--clip-model",
    "none",
    "--device",
    "cpu",
]
BENCH = ["bench", "--models", "micro-sd", "--device", "cpu", "--no-e2e", "--repeats", "1", "--warmup", "0"]
DEMO = ["demo", "--out", "{tmp}/demo", "--steps", "1", "--data-images", "2", "--eval-prompts", "1"]
UI = ["ui", "--models", "micro-sd"]


def row(args: list[str], *names: str):
    """A bad command line and the texts its one error line must contain."""
    return pytest.param(args, names, id=" ".join(args)[:70])


ROWS = [
    row(["no-such-command"], "no-such-command"),
    row(["--no-such-option"], "--no-such-option"),
    # presets
    row(["presets", "--jsn"], "--jsn"),
    row(["presets", "extra"], "extra"),
    # inspect
    row(["inspect", "no-such-model"], "no-such-model", "slimsd presets"),
    row(["inspect", "no-such/hub-model"], "no-such/hub-model", "HF_HUB_OFFLINE"),
    row(["inspect", "{tmp}/emptydir"], "emptydir", "model_index.json"),
    row(["inspect", "{tmp}/badjson"], "badjson", "broken"),
    row(["inspect", "{tmp}/a-file"], "a-file", "not a folder"),
    row(["inspect", "micro-sd", "--resolution", "10"], "--resolution", "10"),
    row(["inspect", "micro-sd", "--resolution", "100"], "resolution 100", "multiple"),
    row(["inspect", "micro-sd", "--resolution", "big"], "--resolution", "big"),
    row(["inspect"], "MODEL"),
    # compress
    row(
        ["compress", "--teacher", "no-such-model", "--recipe", "bk-small", "--out", "{tmp}/c"],
        "no-such-model",
    ),
    row(
        ["compress", "--teacher", "micro-sd", "--recipe", "no-recipe", "--out", "{tmp}/c"],
        "no-recipe",
        "bk-small",
    ),
    row(["compress", "--teacher", "micro-sd", "--recipe", "{tmp}/bad.yaml", "--out", "{tmp}/c"], "bad.yaml"),
    row(
        ["compress", "--teacher", "micro-sd", "--recipe", "bk-small", "--init", "zeros", "--out", "{tmp}/c"],
        "zeros",
    ),
    row(
        ["compress", "--teacher", "micro-sd", "--recipe", "bk-small", "--out", "{tmp}/other"],
        "other",
        "choose another --out",  # --overwrite never replaces a folder compress did not write
    ),
    row(["compress", "--teacher", "micro-sd", "--recipe", "bk-small", "--out", "{tmp}/a-file"], "a-file"),
    row(
        ["compress", "--teacher", "{tmp}/badjson", "--recipe", "bk-small", "--out", "{tmp}/c"],
        "badjson",
        "broken",
    ),
    row(["compress", "--teacher", "micro-sd", "--out", "{tmp}/c"], "--recipe"),
    # distill
    row([*DISTILL, "seed=-1"], "seed", "-1"),
    row([*DISTILL, "validation_prompts=[1, 2]", "validation_every=1"], "validation_prompts"),
    row([*DISTILL, "mixed_precision=maybe"], "mixed_precision", "maybe", "bf16"),
    row([*DISTILL, "max_steps=many"], "max_steps", "many"),
    row([*DISTILL, "max_steps=0"], "max_steps", "0"),
    row([*DISTILL, "no_such_key=1"], "no_such_key"),
    row([*DISTILL, "just-a-word"], "just-a-word", "key=value"),
    row([*DISTILL, "teacher=no-such-model"], "no-such-model"),
    row([*DISTILL, "student=no-recipe"], "no-recipe"),
    row([*DISTILL, "data={tmp}/missing"], "missing", "shapes:N"),
    row([*DISTILL, "data={tmp}/bad.tar"], "bad.tar"),
    row([*DISTILL, "data={tmp}/emptydir"], "emptydir"),
    row([*DISTILL, "resolution=12"], "resolution", "12"),
    row(["distill", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    row(["distill", "--config", "{tmp}/bad.yaml"], "bad.yaml"),
    # cache
    row([*CACHE, "--data", "{tmp}/missing"], "missing", "shapes:N"),
    row([*CACHE, "--data", "{tmp}/bad.tar"], "bad.tar"),
    row([*CACHE, "--data", "{tmp}/emptydir"], "emptydir"),
    row([*CACHE, "--data", "shapes:0"], "shapes:0"),
    row([*CACHE, "--data", "shapes:2", "--model", "no-such-model"], "no-such-model"),
    row([*CACHE, "--data", "shapes:2", "--resolution", "12"], "--resolution", "12"),
    row([*CACHE, "--data", "shapes:2", "--out", "{tmp}/other"], "other", "choose another --out"),
    row([*CACHE, "--data", "shapes:2", "--batch-size", "0"], "--batch-size", "0"),
    row([*CACHE, "--data", "shapes:2", "--filter", "aesthetic > 7"], "aesthetic", "it has: caption"),
    # data
    row(["data", "{tmp}/missing"], "missing", "shapes:N"),
    row(["data", "shapes:2", "--filter", "aesthetic > 7"], "no column 'aesthetic'", "it has: caption"),
    row(["data", "shapes:2", "--filter", "len(caption) >< 3"], "'><'", "allowed: ==, !="),
    row(["data", "shapes:2", "--filter", "punsafe < 0.1x"], "'0.1x' is not a number"),
    row(["data", "shapes:2", "--sample", "0"], "--sample", "0"),
    row(["data", "--config", "{tmp}/missing.yaml"], "missing.yaml"),
    row(["data"], "no data", "DATA"),
    row(["data", "shapes:2", "--grid", "/proc/slimsd-grid.png"], "slimsd-grid.png", "cannot be written"),
    row([*DISTILL, "--filter", "punsafe < 0.1x"], "'0.1x' is not a number"),
    row([*DISTILL, "--filter", "aesthetic >= 7.5"], "no column 'aesthetic'", "it has: caption"),
    # generate
    row(["generate", "no-such-model", "a red circle"], "no-such-model", "slimsd presets"),
    row(["generate", "no-such/hub-model", "a red circle"], "no-such/hub-model", "HF_HUB_OFFLINE"),
    row(["generate", "{tmp}/emptydir", "a red circle"], "emptydir", "model_index.json"),
    row(["generate", "{tmp}/badjson", "a red circle"], "badjson", "broken"),
    row([*GEN, "--device", "tpu"], "tpu", "cpu"),
    row([*GEN, "--device", "cuda:7"], "cuda:7"),
    row([*GEN, "--dtype", "fp8"], "--dtype", "fp8", "bf16"),
    row([*GEN, "--dtype", "fp16", "--device", "cpu"], "fp16", "CPU"),
    row([*GEN, "--scheduler", "no-such-scheduler"], "no-such-scheduler", "euler"),
    row([*GEN, "--width", "100"], "width 100", "multiple of 8"),
    row([*GEN, "--height", "tall"], "--height", "tall"),
    row([*GEN, "--steps", "0"], "steps 0", "1 to 200"),
    row([*GEN, "--steps", "9999"], "steps 9999"),
    row([*GEN, "--guidance", "nan"], "guidance nan"),
    row([*GEN, "--seed", "-5"], "seed -5"),
    row([*GEN, "--num-images", "0"], "num-images 0"),
    row([*GEN, "--batch-size", "65"], "batch-size 65"),
    row([*GEN, "--deep-cache", "0"], "deep-cache 0", "1 to 50"),
    row([*GEN, "--deep-cache", "51"], "deep-cache 51", "1 to 50"),
    row([*GEN, "--deep-cache", "x"], "--deep-cache", "'x'"),
    row(["generate", "--from-png", "{tmp}/deep-cache-0.png"], "deep-cache 0", "1 to 50"),
    row(["generate", "--from-png", "{tmp}/deep-cache-x.png"], "deep-cache-x.png", "deep_cache", "'x'"),
    row([*GEN, "--vae", "{tmp}/junk.safetensors"], "junk.safetensors", "not a readable safetensors", "TAESD"),
    row([*GEN, "--vae", "{tmp}/photo.jpg"], "photo.jpg", "not a .safetensors file", "TAESD"),
    row([*GEN, "--vae", "{tmp}/prompts.csv"], "prompts.csv", "not a .safetensors file"),
    row([*GEN, "--out", "{tmp}/a-file"], "--out", "a-file"),
    row([*GEN, "--out", "{tmp}/a-file/images"], "a-file"),
    row(["generate", "{tmp}/other", "a red circle", "--random-weights"], "other", "--random-weights"),
    row(["generate", "micro-sd", "--prompts", "{tmp}/missing.txt"], "--prompts", "missing.txt"),
    row(["generate", "micro-sd", "--prompts", "{tmp}/latin1.txt"], "latin1.txt", "UTF-8"),
    row(["generate", "micro-sd", "--prompts", "{tmp}/empty.txt"], "PROMPT"),
    row(["generate", "micro-sd", "--prompts", "{tmp}/emptydir"], "--prompts", "emptydir"),
    row(["generate", "micro-sd", "a", "--prompts", "{tmp}/latin1.txt"], "PROMPT", "--prompts"),
    row(["generate", "micro-sd"], "PROMPT"),
    row(["generate"], "MODEL"),
    row(["generate", "--from-png", "{tmp}/wrong-types.png"], "wrong-types.png", "steps", "'many'"),
    row(["generate", "--from-png", "{tmp}/not-object.png"], "not-object.png", "object"),
    row(["generate", "--from-png", "{tmp}/not-json.png"], "not-json.png", "JSON"),
    row(["generate", "--from-png", "{tmp}/big-seed.png"], f"seed {2**40}"),
    row(["generate", "--from-png", "{tmp}/bad-width.png"], "width 100"),
    row(["generate", "--from-png", "{tmp}/grid.png"], "grid.png"),
    row(["generate", "--from-png", "{tmp}/plain.png"], "plain.png", "metadata"),
    row(["generate", "--from-png", "{tmp}/photo.jpg"], "photo.jpg", "JPEG"),
    row(["generate", "--from-png", "{tmp}/a1111.png"], "a1111.png", "'many'"),
    row(["generate", "--from-png", "{tmp}/missing.png"], "--from-png", "missing.png"),
    # ui (a row whose input passes its checks would start a server: the test stops that)
    row([*UI, "--device", "tpu"], "tpu"),
    row([*UI, "--dtype", "fp8"], "--dtype", "fp8"),
    row([*UI, "--port", "0"], "--port", "0"),
    row([*UI, "--max-loaded", "0"], "--max-loaded", "0"),
    row(["ui", "--models", "no-such-model"], "no-such-model"),
    # bench
    row(["bench", "--models", "no-such-model", "--device", "cpu"], "no-such-model"),
    row([*BENCH, "--device", "tpu"], "tpu"),
    row([*BENCH, "--dtype", "fp8"], "--dtype", "fp8"),
    row([*BENCH, "--batch-sizes", "1,two"], "--batch-sizes", "1,two"),
    row([*BENCH, "--batch-sizes", "0"], "batch sizes"),  # names the rule, not the value (bench: the lead's)
    row([*BENCH, "--resolution", "100"], "resolution 100"),
    row([*BENCH, "--repeats", "0"], "--repeats", "0"),
    row([*BENCH, "--threads", "none"], "--threads", "none"),
    row(["bench"], "--models"),
    row([*BENCH, "--deep-cache", "51"], "deep-cache 51", "1 to 50"),
    row([*BENCH, "--deep-cache", "2", "--compile"], "--deep-cache", "--compile"),
    # eval
    row([*EVAL[:4], "{tmp}/latin1.csv", *EVAL[5:]], "latin1.csv"),
    row([*EVAL[:4], "{tmp}/missing.csv", *EVAL[5:]], "missing.csv"),
    row([*EVAL[:4], "{tmp}/nocaption.csv", *EVAL[5:]], "nocaption.csv", "caption"),
    row([*EVAL, "--reference", "{tmp}/ref"], "corrupt.png"),
    row([*EVAL, "--reference", "{tmp}/missing-ref"], "missing-ref"),
    row([*EVAL, "--shard", "3/2"], "--shard", "3/2"),
    row([*EVAL, "--shard", "half"], "--shard", "half"),
    row([*EVAL, "--scheduler", "no-such-scheduler"], "--scheduler", "no-such-scheduler"),
    row([*EVAL, "--deep-cache", "0"], "deep-cache 0", "1 to 50"),
    row(
        [*EVAL, "--fid-extractor", "inception-v3", "--inception-weights", "{tmp}/no.safetensors"],
        "no.safetensors",
    ),
    row(["eval", "--models", "no-such-model", *EVAL[3:]], "no-such-model"),
    # demo
    row([*DEMO, "--steps", "0"], "--steps", "0"),
    row([*DEMO, "--feat-norm", "l2"], "--feat-norm", "l2"),
    row([*DEMO, "--threads", "0"], "--threads", "0"),
    row([*DEMO, "--learning-rate", "0"], "--learning-rate", "0"),
    row(["demo", "--out", "{tmp}/a-file"], "--out", "a-file"),
    row(["demo", "--out", "{tmp}/other"], "other", "--overwrite"),
]


@pytest.mark.parametrize("args, names", ROWS)
def test_bad_input_is_one_line_and_exit_2(args, names, tmp_path, capsys, monkeypatch):
    bad_files(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if args[0] == "ui":  # a row that passed its checks must not start a server and wait
        import slimsd.run.ui

        def no_launch(*a, **k):
            raise AssertionError("the UI launched: the bad input was not refused")

        monkeypatch.setattr(slimsd.run.ui, "launch", no_launch)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        code, out, err = run_cli(args, capsys)
    except Exception as e:  # it escaped the CLI: the user would see a traceback
        pytest.fail(f"Traceback: {e!r}")
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], lines[0]


EVAL_FID = ["eval", "-m", "micro-sd", "--prompts", "{tmp}/p.csv", "--reference", "{tmp}", "--out", "{tmp}/e"]


@pytest.mark.parametrize(
    ("args", "package", "extra"),
    [
        (UI, "gradio", "ui"),
        ([*BENCH, "--json", "{tmp}/b.json"], "matplotlib", "eval"),
        (EVAL_FID, "scipy", "eval"),
    ],
)
def test_a_missing_optional_package_is_one_line_naming_it(
    args, package, extra, tmp_path, monkeypatch, capsys
):
    import sys

    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ModuleNotFoundError
    code, out, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2 and "Traceback" not in out + err
    assert out == "" and err.strip().splitlines() == [  # before any work: nothing else was printed
        f"slimsd: error: this needs the optional package {package!r}, which is not installed: "
        f"pip install 'slimsd[{extra}]'"
    ]
