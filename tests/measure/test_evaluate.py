"""FID / IS / CLIP score, the report and `slimsd eval`, offline with stand-in extractors."""

from __future__ import annotations

import hashlib
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.measure import evaluate as ev
from slimsd.run.pnginfo import settings_from_png

from helpers import run_cli

# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _random_cov(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_matches_direct_sqrtm_computation():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = _random_cov(rng, 5), _random_cov(rng, 5)
    # Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½): the symmetric form, computed independently.
    r1 = np.real(sqrtm(s1))
    direct = (
        np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(sqrtm(r1 @ s2 @ r1)))
    )
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # Diagonal Gaussians: |mu1 - mu2|² + Σ (σ1 - σ2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert ev.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 8))
    mu, sigma = ev.feature_statistics(feats)
    assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    fids = []
    for shift in (0.1, 0.5, 1.0, 2.0):
        m2, s2 = ev.feature_statistics(feats + shift)
        fids.append(ev.frechet_distance(mu, sigma, m2, s2))
    assert fids == sorted(fids) and fids[0] > 0
    assert fids[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)  # a pure shift adds exactly |shift|²


def test_frechet_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(2)
    mu1, s1 = ev.feature_statistics(rng.normal(size=(4, 16)))
    mu2, s2 = ev.feature_statistics(rng.normal(size=(4, 16)) + 1)
    d = ev.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(SlimsdError, match="do not match"):
        ev.frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_stats_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    ev.save_stats(tmp_path / "ref.npz", mu, sigma, extractor="stand-in")
    mu2, sigma2 = ev.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(SlimsdError, match="mu"):
        ev.load_stats(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------------------
# Inception Score, CLIP score


def test_inception_score_of_uniform_prediction_is_one():
    mean, std = ev.inception_score(np.zeros((50, 7)), splits=5)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_number_of_classes():
    logits = np.full((100, 10), -50.0)
    logits[np.arange(100), np.arange(100) % 10] = 50.0
    mean, _ = ev.inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6)
    # Confident but all the same class: no diversity, IS 1.
    same = np.full((100, 10), -50.0)
    same[:, 3] = 50.0
    assert ev.inception_score(same, splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(SlimsdError, match="splits"):
        ev.inception_score(logits[:3], splits=10)


def test_clip_score_matched_vs_shuffled_pairs():
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def embed_image(im):  # a transparent stand-in: the mean colour as a vector
        return np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    def embed_text(t):
        return np.asarray(colours[t], dtype=np.float64)

    names = list(colours)
    images = [Image.new("RGB", (8, 8), colours[n]) for n in names]
    img = np.stack([embed_image(i) for i in images])
    assert ev.clip_score(img, np.stack([embed_text(n) for n in names])) == pytest.approx(100.0)
    shuffled = names[1:] + names[:1]
    assert ev.clip_score(img, np.stack([embed_text(n) for n in shuffled])) == pytest.approx(0.0)
    # Negative similarity is clipped at 0, not averaged in.
    assert ev.clip_score(
        np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [-1.0, 0.0]])
    ) == pytest.approx(50)


def test_clip_stand_in_model_score_equals_clip_own_similarity():
    clip = ev.load_clip("stand-in")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    texts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    img = ev.clip_embed_images(clip, images)
    txt = ev.clip_embed_texts(clip, texts)
    assert img.shape == txt.shape == (4, 32)
    # CLIPModel's own forward: logits_per_image = exp(logit_scale) * cosine; its diagonal is the matched pairs.
    pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
        )
    cos = out.logits_per_image / clip.model.logit_scale.exp()
    expected = float(100 * cos.diagonal().clamp(min=0).mean())
    assert ev.clip_score(img, txt) == pytest.approx(expected, rel=1e-5)
    shuffled = float(100 * cos[np.arange(4), [1, 2, 3, 0]].clamp(min=0).mean())
    assert ev.clip_score(img, txt[[1, 2, 3, 0]]) == pytest.approx(shuffled, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Images in: resizing, extractors, Inception architecture


def test_clean_resize_is_float_bicubic():
    im = Image.fromarray(np.random.default_rng(4).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    out = ev.clean_resize(im, 17)
    assert out.shape == (17, 17, 3) and out.dtype == np.float32
    # Not rounded to 8 bits after resampling (what the 'legacy' uint8 resize would do).
    assert not np.allclose(out, np.round(out))
    flat = Image.new("RGB", (20, 30), (10, 200, 30))
    np.testing.assert_allclose(ev.clean_resize(flat, 17)[5, 5], [10, 200, 30], atol=1e-3)


def test_stand_in_extractor_features_separate_image_sets():
    extractor = ev.load_fid_extractor("stand-in")
    rng = np.random.default_rng(5)
    dark = [Image.fromarray(rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)) for _ in range(12)]
    bright = [Image.fromarray(rng.integers(180, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(12)]
    f_dark, logits = ev.extract(extractor, dark, batch_size=5)
    f_bright, _ = ev.extract(extractor, bright, batch_size=5)
    assert f_dark.shape == (12, 32) and logits.shape == (12, 10)
    self_fid = ev.frechet_distance(*ev.feature_statistics(f_dark[:6]), *ev.feature_statistics(f_dark[6:]))
    cross_fid = ev.frechet_distance(*ev.feature_statistics(f_dark), *ev.feature_statistics(f_bright))
    assert cross_fid > 10 * self_fid
    with pytest.raises(SlimsdError, match="allowed"):
        ev.load_fid_extractor("vgg")


def torch_fidelity_inception():
    """torch-fidelity's FID Inception-v3 (its own port of the TF graph, after pytorch-fid's), imported without
    the package's __init__, which imports torchvision (not installable beside this torch): the module needs only
    torch and three small modules of its own."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is installed by make install (pip install --no-deps)"
    if "torch_fidelity" not in sys.modules:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


@pytest.mark.slow(seconds=15)
def test_the_fid_inception_computes_what_torch_fidelitys_computes(tmp_path):
    """Output for output against an independent implementation of the same network, both with the same random
    weights (batch-norm statistics included, names mapped one to one) and in float64, so that only the order of
    sums can differ: a wrong pool (TF's average pools ignore the zero padding; 7c max-pools), a swapped branch
    or a missing ReLU would show as differences of order 1."""
    from slimsd.measure.inception import FIDInceptionV3

    torch.manual_seed(0)
    ours = FIDInceptionV3().double().eval()
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    name_map = {k: k for k in ours.state_dict()}  # the same module names (torchvision's Inception3 naming)
    ours = ours.float().double()  # fp32 values, as the file gives them to torch-fidelity
    torch.save({name_map[k]: v.float() for k, v in ours.state_dict().items()}, tmp_path / "w.pth")
    theirs = torch_fidelity_inception()(
        "inception-v3-compat", ["2048", "logits"], feature_extractor_weights_path=str(tmp_path / "w.pth")
    )
    # its "float64" option maps to float32 (torch_fidelity.helpers.text_to_dtype, 0.4.0): set it directly
    theirs = theirs.double()
    theirs.feature_extractor_internal_dtype = torch.float64
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)  # at 299 px: no resize on either side
    with torch.no_grad():
        pool3, logits = theirs(images)  # computed in float64, returned rounded to float32
        # theirs maps u8 to (u - 128) / 128; ours maps [0, 1] to 2x - 1: the same input is u / 256
        features, our_logits = ours(images.double() / 256)
    assert features.shape == (2, 2048) and our_logits.shape == (2, 1008)
    assert (
        pool3.abs().max() > 0.1
    )  # the features are not all zero (dead ReLUs would make the comparison empty)
    # two float64 results a few 1e-16 apart round to the same float32 or to neighbours: one float32 ulp at most
    one_ulp = {"rtol": 2**-23, "atol": 1e-30}
    torch.testing.assert_close(features.float(), pool3, **one_ulp)
    torch.testing.assert_close(our_logits.float(), logits, **one_ulp)


@pytest.mark.slow
def test_inception_architecture_matches_fid_weights_layout(tmp_path):
    from safetensors.torch import save_file

    from slimsd.measure.inception import FIDInceptionV3, load_inception

    model = FIDInceptionV3()
    state = model.state_dict()
    # The pytorch-fid weights: torchvision Inception3 names, no aux head, a 1008-way fc: 23,850,960 parameters.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_6e.branch7x7dbl_5.bn.running_var"].shape == (192,)
    assert not any(k.startswith("AuxLogits") for k in state)
    # Real weights load from safetensors without any flag; a .pth pickle needs one.
    tensors = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_inception(tmp_path / "w.safetensors")
    torch.testing.assert_close(loaded.fc.bias, model.fc.bias)
    torch.save(tensors, tmp_path / "w.pth")
    with pytest.raises(SlimsdError, match="allow-pickle"):
        load_inception(tmp_path / "w.pth")
    assert load_inception(tmp_path / "w.pth", allow_pickle=True).fc.weight.shape == (1008, 2048)
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(SlimsdError, match="could not load"):
        load_inception(tmp_path / "bad.pth", allow_pickle=True)
    with torch.no_grad():  # smallest input the network takes: shapes of both heads
        features, logits = loaded(torch.rand(1, 3, 75, 75))
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)


def test_missing_inception_weights_is_one_clear_error(tmp_path, monkeypatch):
    from slimsd.measure.inception import load_inception

    monkeypatch.setenv("SLIMSD_CACHE", str(tmp_path))
    with pytest.raises(SlimsdError, match="--inception-weights"):
        load_inception()


# ---------------------------------------------------------------------------------------------------------------
# Prompts, shards


def test_read_prompts_columns_ids_and_errors(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('file_name,text\nCOCO_1.jpg,"a cat, sitting"\n../evil/x y.jpg,a dog\n')
    prompts = ev.read_prompts(f)
    assert [(p.index, p.id, p.caption) for p in prompts] == [
        (0, "COCO_1", "a cat, sitting"),
        (1, "x_y", "a dog"),
    ]
    f.write_text("caption\nA\nB\nC\n")
    assert [p.id for p in ev.read_prompts(f, limit=2)] == ["000000", "000001"]
    f.write_text("foo\nA\n")
    with pytest.raises(SlimsdError, match="caption column"):
        ev.read_prompts(f)
    f.write_text("id,caption\na,x\na,y\n")
    with pytest.raises(SlimsdError, match="twice"):
        ev.read_prompts(f)


def test_parse_shard():
    assert ev.parse_shard("2/4") == (2, 4)
    assert ev.parse_shard(None) == (0, 1)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(SlimsdError, match="shard"):
            ev.parse_shard(bad)


# ---------------------------------------------------------------------------------------------------------------
# Report


class _Tables(HTMLParser):
    """Cells of the report's tables, by table id: {table: [{data-metric: text}]}; counts <img> tags."""

    def __init__(self):
        super().__init__()
        self.tables, self.images = {}, 0
        self._table = self._row = self._metric = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._metric = a.get("data-metric")
            self._row[self._metric] = ""
        elif tag == "img":
            self.images += 1
            assert a["src"].startswith("data:image/jpeg;base64,")  # self-contained

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "td":
            self._metric = None

    def handle_data(self, data):
        if self._metric is not None and self._row is not None:
            self._row[self._metric] += data


def _parse(text):
    p = _Tables()
    p.feed(text)
    return p


def test_report_table_holds_the_computed_scores(tmp_path):
    for slug in ("a", "b"):
        (tmp_path / "images" / slug).mkdir(parents=True)
        Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "images" / slug / "p0.png")
    rows = [
        {
            "model": "teacher <x>",
            "images": "images/a",
            "fid": 12.34567,
            "inception_score": 3.5,
            "inception_score_std": 0.25,
            "clip_score": 31.0,
            "num_images": 10,
        },
        {
            "model": "student",
            "images": "images/b",
            "fid": None,
            "inception_score": 2.0,
            "inception_score_std": 0.1,
            "clip_score": None,
            "num_images": 10,
        },
    ]
    result = {
        "protocol": "bk-sdm-coco30k",
        "models": rows,
        "settings": {"seed": 7, "steps": 25},
        "environment": {"device": "cpu"},
    }
    text = ev.render_report(result, tmp_path, [ev.Prompt(0, "p0", "a <b>bold</b> cat")])
    parsed = _parse(text)
    table = parsed.tables["scores"]
    assert [r["model"] for r in table] == ["teacher <x>", "student"]  # escaped in HTML, intact when parsed
    for row, cells in zip(rows, table, strict=True):
        for key, _, _ in ev.METRICS:
            expected = row[key]
            if expected is None:
                assert cells[key] == "–"
            else:
                assert float(cells[key]) == pytest.approx(expected, abs=5e-4)
    assert parsed.images == 2  # one prompt x two models, side by side
    assert "<b>bold</b>" not in text


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


def test_an_image_made_with_another_deep_cache_is_made_again(tmp_path):
    """deep_cache decides the pixels: an image made with another interval is not reused; one from before the
    option existed (no deep_cache in its PNG info) was made without it, so a run without it reuses it."""
    from slimsd.atomic import atomic_write_bytes
    from slimsd.run.pnginfo import Settings, png_bytes

    prompts = [ev.Prompt(i, name, f"a {name} circle") for i, name in enumerate(("two", "one", "old"))]
    for p, stored in zip(prompts, ({"deep_cache": 2}, {"deep_cache": 1}, None), strict=True):
        settings = Settings(p.caption, steps=2, seed=p.index, model_source="micro-sd", dtype="fp32")
        settings.extra = {"eval_resolution": None, "eval_scheduler": None}
        meta = vars(settings) | (stored or {})
        if stored is None:
            del meta["deep_cache"]
        atomic_write_bytes(ev.image_path(tmp_path, p), png_bytes(Image.new("RGB", (8, 8)), extra_json=meta))
    assert "deep_cache" not in settings_from_png(ev.image_path(tmp_path, prompts[2]))
    for interval, todo, differing in (
        (1, ["two"], {"deep_cache": 1}),
        (2, ["one", "old"], {"deep_cache": 2}),
    ):
        gen = ev.GenSettings(steps=2, deep_cache=interval)
        made, counts = ev.plan_images(prompts, tmp_path, gen, "micro-sd")
        assert [p.id for p in made] == todo and counts["differing"] == differing


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
    cells = _parse((out / "report.html").read_text()).tables["scores"][0]
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
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err, (needle, err)
        assert len(err.strip().splitlines()) == 1, err


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_bytes("caption,id\na cat,x\n".encode("utf-8-sig"))
    assert [(p.id, p.caption) for p in ev.read_prompts(f)] == [("x", "a cat")]


def test_protocol_fills_unset_settings_and_explicit_options_win():
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
    assert cfg.steps == 5 and cfg.device == "cpu" and cfg.dtype == "fp32"
    plain = ev.resolve(ev.EvalConfig(models=["m"], prompts="p.csv", out="o"))
    assert (plain.resolution, plain.score_resolution, plain.scheduler, plain.num_prompts) == (None,) * 4
    with pytest.raises(SlimsdError, match="allowed"):
        ev.resolve(ev.EvalConfig(models=["m"], prompts="p.csv", out="o", scheduler="magic"))
