"""The shapes world and its caption-fidelity checker."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from slimsd.errors import SlimsdError
from slimsd.models.micro import load_tokenizer
from slimsd.toy.shapes import (
    PALETTE,
    SHAPES,
    Scene,
    caption_fidelity,
    make_captions,
    make_dataset,
    parse_caption,
    render,
)


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(120, seed=3)


def test_make_dataset_is_deterministic_per_seed():
    a, b, c = make_dataset(6, seed=1), make_dataset(6, seed=1), make_dataset(6, seed=2)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b, strict=True))
    assert [cap for _, cap in a] != [cap for _, cap in c]
    assert a[0][0].size == (64, 64) and a[0][0].mode == "RGB"
    assert make_dataset(2, seed=0, size=32)[0][0].size == (32, 32)


def test_captions_cover_the_world_and_are_whole_tokenizer_words(dataset):
    captions = [c for _, c in dataset]
    scenes = [parse_caption(c) for c in captions]
    assert {s.colour for s in scenes} == set(PALETTE)
    assert {s.shape for s in scenes} == set(SHAPES)
    assert any(s.size for s in scenes) and any(s.position for s in scenes) and any(not s.size for s in scenes)
    tok = load_tokenizer()
    words = {w for c in captions for w in c.split()}
    assert all(len(tok.tokenize(w)) == 1 for w in words), [w for w in words if len(tok.tokenize(w)) != 1]
    assert make_captions(5, seed=3) == make_captions(5, seed=3)


def test_caption_round_trip():
    scene = Scene("red", "cross", "small", "left")
    assert scene.caption == "a small red cross on the left"
    assert parse_caption(scene.caption) == scene
    with pytest.raises(SlimsdError, match="names no colour"):
        parse_caption("a photo of a cat")


def test_fidelity_is_one_on_the_worlds_own_images(dataset):
    r = caption_fidelity([i for i, _ in dataset], [c for _, c in dataset], details=True)
    assert r["fidelity"] == 1.0 and r["colour_accuracy"] == 1.0 and r["shape_accuracy"] == 1.0
    assert r["n"] == len(dataset) and len(r["per_image"]) == len(dataset)


def test_fidelity_survives_blur_like_a_decoder_output(dataset):
    blurred = [i.filter(ImageFilter.GaussianBlur(1.2)) for i, _ in dataset]
    assert caption_fidelity(blurred, [c for _, c in dataset]) >= 0.95


def test_fidelity_is_near_chance_on_shuffled_captions(dataset):
    captions = [c for _, c in dataset]
    shuffled = captions[:]
    random.Random(0).shuffle(shuffled)
    r = caption_fidelity([i for i, _ in dataset], shuffled, details=True)
    chance = 1 / (len(PALETTE) * len(SHAPES))
    assert r["fidelity"] < chance + 0.1
    assert r["colour_accuracy"] < 1 / len(PALETTE) + 0.15 and r["shape_accuracy"] < 1 / len(SHAPES) + 0.15


def test_fidelity_is_low_on_noise_and_blank_images(dataset):
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(40)]
    captions = [c for _, c in dataset[:40]]
    assert caption_fidelity(noise, captions) <= 0.05
    blank = [Image.new("RGB", (64, 64), (255, 255, 255))] * 5
    assert caption_fidelity(blank, captions[:5]) == 0.0


def test_checker_tells_every_colour_and_shape_apart():
    for colour in PALETTE:
        for shape in SHAPES:
            img = render(Scene(colour, shape, "small", "right"))
            r = caption_fidelity([img], [f"a {colour} {shape}"], details=True)["per_image"][0]
            assert (r["colour"], r["shape"]) == (colour, shape)


def test_mismatched_lengths_are_a_user_error():
    with pytest.raises(SlimsdError, match="one caption per image"):
        caption_fidelity([render(Scene("red", "circle"))], [])


# The held-out combinations, written out here rather than read from the module.
HELD_OUT_PAIRS = {("red", "square"), ("green", "triangle"), ("blue", "cross"), ("yellow", "circle")}


def test_held_out_combinations_never_reach_training_data_and_compose_seen_words():
    from slimsd.toy.shapes import HELD_OUT
    from slimsd.train.data import open_source

    assert set(HELD_OUT) == HELD_OUT_PAIRS and len(HELD_OUT) * 6 == len(PALETTE) * len(SHAPES)  # 1 in 6
    # every training set comes through `shapes:N` (the trainer and `slimsd cache`) or make_dataset
    source = open_source("shapes:3000", seed=5)
    training = [parse_caption(source.read(row)[1]) for row in source.rows]
    pairs = {(s.colour, s.shape) for s in training}
    assert not pairs & HELD_OUT_PAIRS
    assert len(pairs) == 20  # every other combination is there
    # ... so each held-out colour and shape was seen, in other combinations
    assert {c for c, _ in HELD_OUT_PAIRS} <= {c for c, _ in pairs} and {s for _, s in HELD_OUT_PAIRS} <= {
        s for _, s in pairs
    }
    held = [parse_caption(c) for c in make_captions(300, seed=1, split="held_out")]
    assert {(s.colour, s.shape) for s in held} == HELD_OUT_PAIRS
    seen = [parse_caption(c) for c in make_captions(300, seed=1)]
    assert not {(s.colour, s.shape) for s in seen} & HELD_OUT_PAIRS
    images = make_dataset(40, seed=2, split="held_out")  # for measuring a VAE; the checker reads them right
    assert caption_fidelity([i for i, _ in images], [c for _, c in images]) == 1.0
    with pytest.raises(ValueError, match="allowed seen, held_out, all"):
        make_captions(1, split="unseen")
