"""FID, IS and CLIP score on features, logits and embeddings; resizing, the stand-in and Inception extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from slimsd.errors import SlimsdError
from slimsd.measure import scores

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
    assert scores.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-8)


def test_frechet_closed_form_for_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # Diagonal Gaussians: |mu1 - mu2|² + Σ (σ1 - σ2)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert scores.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(200, 8))
    mu, sigma = scores.feature_statistics(feats)
    assert scores.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    fids = []
    for shift in (0.1, 0.5, 1.0, 2.0):
        m2, s2 = scores.feature_statistics(feats + shift)
        fids.append(scores.frechet_distance(mu, sigma, m2, s2))
    assert fids == sorted(fids) and fids[0] > 0
    assert fids[-1] == pytest.approx(8 * 2.0**2, rel=1e-6)  # a pure shift adds exactly |shift|²


def test_frechet_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(2)
    mu1, s1 = scores.feature_statistics(rng.normal(size=(4, 16)))
    mu2, s2 = scores.feature_statistics(rng.normal(size=(4, 16)) + 1)
    d = scores.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(SlimsdError, match="do not match"):
        scores.frechet_distance(mu1, s1, mu1[:3], s1[:3, :3])


def test_stats_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    scores.save_stats(tmp_path / "ref.npz", mu, sigma, extractor="stand-in")
    mu2, sigma2 = scores.load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(SlimsdError, match="mu"):
        scores.load_stats(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------------------
# Inception Score, CLIP score


def test_inception_score_of_uniform_prediction_is_one():
    mean, std = scores.inception_score(np.zeros((50, 7)), splits=5)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_spread_is_the_sample_std_over_splits():
    """Split 1 predicts uniformly (IS 1), split 2 confidently and evenly over 4 classes (IS 4): mean 2.5, and
    the spread the sample std of (1, 4), 3 / sqrt(2), as every spread in slimsd (the population std is 1.5)."""
    logits = np.zeros((8, 4))
    logits[4:] = -50.0
    logits[np.arange(4, 8), np.arange(4)] = 50.0
    mean, std = scores.inception_score(logits, splits=2)
    assert mean == pytest.approx(2.5, rel=1e-6) and std == pytest.approx(3 / 2**0.5, rel=1e-6)
    assert scores.inception_score(logits, splits=1)[1] == 0.0  # one split: no spread


def test_inception_score_of_confident_evenly_spread_predictions_is_number_of_classes():
    logits = np.full((100, 10), -50.0)
    logits[np.arange(100), np.arange(100) % 10] = 50.0
    mean, _ = scores.inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6)
    # Confident but all the same class: no diversity, IS 1.
    same = np.full((100, 10), -50.0)
    same[:, 3] = 50.0
    assert scores.inception_score(same, splits=2)[0] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(SlimsdError, match="splits"):
        scores.inception_score(logits[:3], splits=10)


def test_clip_score_matched_vs_shuffled_pairs():
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}

    def embed_image(im):  # a transparent stand-in: the mean colour as a vector
        return np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)

    def embed_text(t):
        return np.asarray(colours[t], dtype=np.float64)

    names = list(colours)
    images = [Image.new("RGB", (8, 8), colours[n]) for n in names]
    img = np.stack([embed_image(i) for i in images])
    assert scores.clip_score(img, np.stack([embed_text(n) for n in names])) == pytest.approx(100.0)
    shuffled = names[1:] + names[:1]
    assert scores.clip_score(img, np.stack([embed_text(n) for n in shuffled])) == pytest.approx(0.0)
    # Negative similarity is clipped at 0, not averaged in.
    assert scores.clip_score(
        np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 0.0], [-1.0, 0.0]])
    ) == pytest.approx(50)


def test_clip_stand_in_model_score_equals_clip_own_similarity():
    clip = scores.load_clip("stand-in")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    texts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    img = scores.clip_embed_images(clip, images)
    txt = scores.clip_embed_texts(clip, texts)
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
    assert scores.clip_score(img, txt) == pytest.approx(expected, rel=1e-5)
    shuffled = float(100 * cos[np.arange(4), [1, 2, 3, 0]].clamp(min=0).mean())
    assert scores.clip_score(img, txt[[1, 2, 3, 0]]) == pytest.approx(shuffled, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Images in: resizing, extractors, Inception architecture


def test_clean_resize_is_float_bicubic():
    im = Image.fromarray(np.random.default_rng(4).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    out = scores.clean_resize(im, 17)
    assert out.shape == (17, 17, 3) and out.dtype == np.float32
    # Not rounded to 8 bits after resampling (what the 'legacy' uint8 resize would do).
    assert not np.allclose(out, np.round(out))
    flat = Image.new("RGB", (20, 30), (10, 200, 30))
    np.testing.assert_allclose(scores.clean_resize(flat, 17)[5, 5], [10, 200, 30], atol=1e-3)


def test_stand_in_extractor_features_separate_image_sets():
    extractor = scores.load_fid_extractor("stand-in")
    rng = np.random.default_rng(5)
    dark = [Image.fromarray(rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)) for _ in range(12)]
    bright = [Image.fromarray(rng.integers(180, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(12)]
    f_dark, logits = scores.extract(extractor, dark, batch_size=5)
    f_bright, _ = scores.extract(extractor, bright, batch_size=5)
    assert f_dark.shape == (12, 32) and logits.shape == (12, 10)
    self_fid = scores.frechet_distance(
        *scores.feature_statistics(f_dark[:6]), *scores.feature_statistics(f_dark[6:])
    )
    cross_fid = scores.frechet_distance(
        *scores.feature_statistics(f_dark), *scores.feature_statistics(f_bright)
    )
    assert cross_fid > 10 * self_fid
    with pytest.raises(SlimsdError, match="allowed"):
        scores.load_fid_extractor("vgg")


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
