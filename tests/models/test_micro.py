"""The offline micro models: deterministic, offline, and shaped like SD 1.x and SDXL."""

import torch

from slimsd.models.micro import build_micro, load_tokenizer
from slimsd.models.presets import SD1_UNET, SDXL_UNET

STRUCTURE = ("down_block_types", "up_block_types", "mid_block_type", "layers_per_block")


def test_micro_models_are_deterministic(micro_sd):
    again = build_micro("micro-sd")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(micro_sd, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_micro_sd_has_the_block_structure_of_sd1(micro_sd):
    cfg = micro_sd.unet.config
    for key in STRUCTURE:
        assert cfg[key] == SD1_UNET[key], key
    assert micro_sd.vae.config.block_out_channels.__len__() == 4  # 8x down-sampling, as in SD
    assert micro_sd.unet.config.cross_attention_dim == micro_sd.text_encoder.config.hidden_size


def test_micro_sdxl_has_the_block_structure_of_sdxl(micro_sdxl):
    cfg = micro_sdxl.unet.config
    for key in (*STRUCTURE, "transformer_layers_per_block", "addition_embed_type"):
        assert cfg[key] == SDXL_UNET[key], key
    te1, te2 = micro_sdxl.text_encoder, micro_sdxl.text_encoder_2
    assert type(te2).__name__ == "CLIPTextModelWithProjection"
    assert cfg.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert (
        cfg.projection_class_embeddings_input_dim
        == te2.config.projection_dim + 6 * cfg.addition_time_embed_dim
    )


def test_fixture_tokenizer_knows_the_toy_words_and_any_text():
    tok = load_tokenizer()
    ids = tok("a small red circle").input_ids
    assert len(ids) == 6  # start, four whole words, end
    assert tok.decode(tok("Zebra #42!").input_ids, skip_special_tokens=True).replace(" ", "") == "zebra#42!"


def test_micro_sdxl_generates_offline(micro_sdxl):
    out = micro_sdxl(
        "a blue square",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out)).all()
