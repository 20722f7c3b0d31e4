"""The precision an exported folder's float kernels run in (runtimes.kernel_dtype, Session): what slimsd compiles
is what plain OpenVINO gives with the same INFERENCE_PRECISION_HINT (the reference: openvino itself, read back
from its compiled model), the policy follows the CPU's auto dtype for int8 folders only, and an image made with
bf16 kernels records bf16 so that --from-png gives it again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from slimsd.errors import SlimsdError
from slimsd.models import runtimes

from helpers import run_cli


@pytest.mark.parametrize(
    ("backend", "precision", "dtype", "want"),
    [
        ("openvino", "fp32", None, "fp32"),  # the exact path: the torch image to rounding
        ("openvino", "fp16", "auto", "fp32"),
        ("openvino", "bf16", None, "bf16"),
        ("openvino", "int8", None, "cpu"),  # the CPU's auto dtype, as slimsd's torch side
        ("openvino", "int8-weights", "auto", "cpu"),
        ("openvino", "fp32", "bf16", "bf16"),  # asked for: that
        ("openvino", "int8", "fp32", "fp32"),
        ("onnx", "int8", None, "fp32"),  # ONNX Runtime: fp32 only
    ],
)
def test_kernel_policy_known_values(backend, precision, dtype, want, cpu_default):
    assert runtimes.kernel_dtype(backend, precision, dtype) == (cpu_default if want == "cpu" else want)


@pytest.mark.parametrize(("backend", "dtype"), [("onnx", "bf16"), ("openvino", "fp16")])
def test_a_kernel_dtype_the_runtime_cannot_is_one_line(backend, dtype):
    with pytest.raises(SlimsdError) as err:
        runtimes.kernel_dtype(backend, "fp32", dtype)
    assert repr(dtype) in str(err.value) and "allowed:" in str(err.value)


@pytest.fixture(scope="module")
def matmul_xml(tmp_path_factory):
    """x @ W in OpenVINO IR, W of a size whose bf16 rounding shows."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256)).astype(np.float32)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    param = ops.parameter([4, 256], np.float32, name="x")
    model = ov.Model([ops.matmul(param, ops.constant(w), False, False)], [param])
    path = tmp_path_factory.mktemp("ov") / "openvino_model.xml"
    ov.save_model(model, str(path), compress_to_fp16=False)
    return path, x, w


@pytest.mark.parametrize(("kernels", "hint"), [("fp32", "f32"), ("bf16", "bf16")])
def test_session_runs_what_plain_openvino_runs_with_the_hint(matmul_xml, kernels, hint):
    import openvino as ov

    path, x, w = matmul_xml
    session = runtimes.Session(path, "openvino", kernels)
    plain = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    reported = plain.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    assert session.kernels == {"f32": "fp32", "bf16": "bf16"}[reported]
    out = session(x=x)[session.outputs[0]]
    np.testing.assert_array_equal(out, plain([x])[0])
    exact = np.abs(out - x @ w).max() <= 1e-3
    assert exact == (reported == "f32")  # bf16 kernels, where the CPU runs them, round visibly


@pytest.mark.slow(seconds=40)
def test_bf16_kernels_through_generate_record_bf16_and_reproduce_from_png(tmp_path, capsys):
    """An fp32 folder asked for bf16 kernels: the runtime and the PNG say what ran, --from-png gives the same
    pixels, and they are not the fp32 kernels' pixels where the CPU has bf16 (plain OpenVINO says whether)."""
    import openvino as ov
    from PIL import Image

    out = tmp_path / "ov"
    code, _, err = run_cli(["export", "micro-sd", "--to", "openvino", "--out", str(out)], capsys)
    assert code == 0, err
    reported = (
        ov.Core()
        .compile_model(str(out / "unet" / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        .get_property("INFERENCE_PRECISION_HINT")
        .get_type_name()
    )
    want = {"f32": "fp32", "bf16": "bf16"}[reported]
    args = ["generate", str(out), "a blue square", "--steps", "2", "--seed", "3", "--json"]
    images = {}
    for dtype in ("bf16", "fp32"):
        code, stdout, err = run_cli([*args, "--dtype", dtype, "--out", str(tmp_path / dtype)], capsys)
        assert code == 0, err
        report = json.loads(stdout)
        assert report["runtime"]["dtype"] == (want if dtype == "bf16" else "fp32")
        images[dtype] = report["images"][0]["path"]
    first = Image.open(images["bf16"])
    assert json.loads(first.text["slimsd"])["dtype"] == want
    code, stdout, err = run_cli(
        ["generate", "--from-png", images["bf16"], "--out", str(tmp_path / "again"), "--json"], capsys
    )
    assert code == 0, err
    again = np.asarray(Image.open(json.loads(stdout)["images"][0]["path"]))
    assert np.array_equal(np.asarray(first), again)
    assert np.array_equal(again, np.asarray(Image.open(images["fp32"]))) == (want == "fp32")
