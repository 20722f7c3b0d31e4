"""FID / IS / CLIP score, the report and `slimsd eval`, offline with stand-in extractors."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.measure import evaluate as ev

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


@pytest.mark.slow
def test_eval_cli_end_to_end_on_micro_sd_and_resume(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,caption\nr,a red circle\ng,a green square\nb,a blue triangle\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(6)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = tmp_path / "out"
    args = [
        "eval",
        "-m",
        "micro-sd",
        "--prompts",
        str(prompts),
        "--reference",
        str(ref),
        "--out",
        str(out),
        "--steps",
        "2",
        "--resolution",
        "64",
        "--score-resolution",
        "48",
        "--fid-extractor",
        "stand-in",
        "--clip-model",
        "stand-in",
        "--is-splits",
        "2",
        "--device",
        "cpu",
        "--save-reference-stats",
        str(tmp_path / "ref.npz"),
        "--batch-size",
        "2",
        "--json",
    ]

    # Shard 1/2 generates only prompt 1 and scores nothing.
    code, stdout, err = run_cli([*args[:-1], "--shard", "1/2", "--json"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (out / "images" / "micro-sd").iterdir()) == ["g.png"]
    assert not (out / "scores.json").exists()
    g_bytes = (out / "images" / "micro-sd" / "g.png").read_bytes()

    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result == json.loads((out / "scores.json").read_text())
    (row,) = result["models"]
    assert row["num_images"] == 3 and row["is_splits"] == 2
    assert np.isfinite(row["fid"]) and row["fid"] > 0 and 0 <= row["clip_score"] <= 100
    assert result["generation"]["micro-sd"] == {"generated": 2, "skipped": 1, "in_shard": 3}
    assert (out / "images" / "micro-sd" / "g.png").read_bytes() == g_bytes  # kept, not regenerated
    from slimsd.run.pnginfo import settings_from_png

    meta = settings_from_png(out / "images" / "micro-sd" / "b.png")  # prompt row 2: seed 0 + 2
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


def test_eval_cli_errors_are_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption\na cat\n")
    base = ["eval", "-m", "micro-sd", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    for extra, needle in (
        (["--shard", "3/2"], "shard"),
        (["--reference", str(tmp_path / "nope")], "does not exist"),
        (["--protocol", "coco"], "coco"),
        (["--score-only", "--clip-model", "none", "--fid-extractor", "stand-in"], "missing"),
    ):
        code, _, err = run_cli(base + extra, capsys)
        assert code == 2, (extra, err)
        assert needle in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err


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
