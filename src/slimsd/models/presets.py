"""Named teachers, students, offline micro models and recipes: hub ids, architectures, published figures.

This file is data. The U-Net configs are diffusers ``UNet2DConditionModel`` configs (only the keys that differ
from diffusers' defaults); the student architectures are *not* written out here: a student is its teacher
plus a recipe (``recipes/*.yaml``), and ``released`` holds the fields of the checkpoint its authors published,
so that the tests can check that the recipe rebuilds exactly that architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from slimsd.errors import unknown

# ---------------------------------------------------------------------------------------------------------------
# Architectures of the full-size components (configs as published with the checkpoints).

SD1_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}

SD2_BASE_UNET = {
    **SD1_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}

CLIP_L_TEXT = {  # openai/clip-vit-large-patch14, text tower
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
OPENCLIP_H_TEXT = {  # SD 2.x text encoder (OpenCLIP ViT-H/14, penultimate layer: 23 layers kept)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
OPENCLIP_BIGG_TEXT = {  # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14, with projection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SD2_BASE_SCHEDULER = {**SD_SCHEDULER, "_class_name": "DDIMScheduler", "clip_sample": False}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "teacher" | "student" | "micro"
    family: str  # "sd" (SD 1.x/2.x layout, 4 stages, one text encoder) | "sdxl"
    hub_id: str | None = None
    teacher: str | None = None  # students: the preset their architecture derives from
    recipe: str | None = None  # students: the recipe that removes blocks from the teacher
    unet: dict | None = None  # teachers and micro models: the U-Net config
    text_encoders: tuple[dict, ...] = ()
    vae: dict | None = None
    scheduler: dict | None = None
    resolution: int = 512  # default image size in pixels
    released: dict = field(default_factory=dict)  # students: architecture fields of the published checkpoint
    published: dict = field(default_factory=dict)  # published figures, with their source
    note: str = ""


_BK_SRC = "BK-SDM (Kim et al., 2023), Table 1 / model cards"

PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


# Teachers ------------------------------------------------------------------------------------------------------
_add(
    Preset(
        "sd-v1.4",
        "teacher",
        "sd",
        "CompVis/stable-diffusion-v1-4",
        unet=SD1_UNET,
        text_encoders=(CLIP_L_TEXT,),
        vae=SD_VAE,
        scheduler=SD_SCHEDULER,
        published={"unet_params": 859_520_964, "unet_macs_512": 338.7e9, "source": _BK_SRC},
    )
)
_add(
    replace(
        PRESETS["sd-v1.4"],
        name="sd-v1.5",
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        published={"unet_params": 859_520_964, "source": "same architecture as sd-v1.4"},
    )
)
_add(
    Preset(
        "sd-v2.1-base",
        "teacher",
        "sd",
        "stabilityai/stable-diffusion-2-1-base",
        unet=SD2_BASE_UNET,
        text_encoders=(OPENCLIP_H_TEXT,),
        vae=SD_VAE,
        scheduler=SD2_BASE_SCHEDULER,
        published={"unet_params": 865_910_724, "source": "stabilityai/stable-diffusion-2-1-base unet"},
    )
)
_add(
    Preset(
        "sdxl-base-1.0",
        "teacher",
        "sdxl",
        "stabilityai/stable-diffusion-xl-base-1.0",
        unet=SDXL_UNET,
        text_encoders=(CLIP_L_TEXT, {**OPENCLIP_BIGG_TEXT, "with_projection": True}),
        vae=SDXL_VAE,
        scheduler=SDXL_SCHEDULER,
        resolution=1024,
        published={"unet_params": 2_567_463_684, "source": "stabilityai/stable-diffusion-xl-base-1.0 unet"},
    )
)

# Students ------------------------------------------------------------------------------------------------------
_BK_BASE = {
    "layers_per_block": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280, 1280],
}
_BK_SMALL = {"layers_per_block": 1, "mid_block_type": None, "block_out_channels": [320, 640, 1280, 1280]}
_BK_TINY = {
    "layers_per_block": 1,
    "mid_block_type": None,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
}


def _student(name: str, hub_id: str, teacher: str, recipe: str, released: dict, **extra) -> None:
    """A student preset: its teacher's family and resolution; its architecture is the teacher plus the recipe."""
    family = PRESETS[teacher].family
    resolution = PRESETS[teacher].resolution
    _add(
        Preset(
            name,
            "student",
            family,
            hub_id,
            teacher=teacher,
            recipe=recipe,
            resolution=resolution,
            released=released,
            **extra,
        )
    )


_student(
    "bk-sdm-base",
    "nota-ai/bk-sdm-base",
    "sd-v1.4",
    "bk-base",
    _BK_BASE,
    published={"unet_params": 579_384_964, "unet_macs_512": 223.8e9, "source": _BK_SRC},
)
_student(
    "bk-sdm-small",
    "nota-ai/bk-sdm-small",
    "sd-v1.4",
    "bk-small",
    _BK_SMALL,
    published={"unet_params": 482_346_884, "unet_macs_512": 217.7e9, "source": _BK_SRC},
)
_student(
    "bk-sdm-tiny",
    "nota-ai/bk-sdm-tiny",
    "sd-v1.4",
    "bk-tiny",
    _BK_TINY,
    published={"unet_params": 323_384_964, "unet_macs_512": 205.0e9, "source": _BK_SRC},
)
_student("bk-sdm-v2-base", "nota-ai/bk-sdm-v2-base", "sd-v2.1-base", "bk-base", _BK_BASE)
_student("bk-sdm-v2-small", "nota-ai/bk-sdm-v2-small", "sd-v2.1-base", "bk-small", _BK_SMALL)
_student(
    "bk-sdm-v2-tiny",
    "nota-ai/bk-sdm-v2-tiny",
    "sd-v2.1-base",
    "bk-tiny",
    {**_BK_TINY, "attention_head_dim": [5, 10, 20]},
)
# Segmind's SD-Small / SD-Tiny (distill-sd, teacher Realistic Vision 4.0, an SD 1.5 fine-tune) use the
# BK-SDM base and tiny block layouts; their published config.json files say so.
_RV4 = "teacher: SG161222/Realistic_Vision_V4.0 (SD 1.5 architecture)"
for _size, _recipe, _layout, _params in (
    ("small", "bk-base", _BK_BASE, 579_384_964),
    ("tiny", "bk-tiny", _BK_TINY, 323_384_964),
):
    _student(
        f"segmind-{_size}-sd",
        f"segmind/{_size}-sd",
        "sd-v1.5",
        _recipe,
        _layout,
        note=_RV4,
        published={"unet_params": _params, "source": f"segmind/{_size}-sd unet/config.json"},
    )


def _segmind_xl(down: list[int], up: list[list[int]]) -> dict:
    """SSD-1B and Vega keep SDXL's residual layers but fewer transformer layers per attention (``up``: the up
    stages' depths, diffusers' ``reverse_transformer_layers_per_block``), and a mid block of one residual layer."""
    return {
        "layers_per_block": 2,
        "mid_block_type": "UNetMidBlock2D",
        "transformer_layers_per_block": down,
        "reverse_transformer_layers_per_block": up,
    }


_student(
    "ssd-1b",
    "segmind/SSD-1B",
    "sdxl-base-1.0",
    "ssd-1b",
    _segmind_xl(down=[1, 2, 4], up=[[4, 4, 10], [2, 1, 1], [1, 1, 1]]),
    published={"unet_params_approx": 1.3e9, "source": "segmind/SSD-1B model card (1.3B U-Net)"},
)
_student(
    "segmind-vega",
    "segmind/Segmind-Vega",
    "sdxl-base-1.0",
    "vega",
    _segmind_xl(down=[1, 1, 2], up=[[2, 2, 2], [1, 1, 1], [1, 1, 1]]),
    published={
        "unet_params_approx": 745e6,
        "down_params_approx": 247e6,
        "mid_params_approx": 31e6,
        "up_params_approx": 460e6,
        "source": "Segmind-Vega model card",
    },
)

# Offline models (no download): micro-sd and micro-sdxl are built from code by slimsd.models.micro; toy-sd is
# micro-sd trained on the shapes world, its weights committed (slimsd.toy.teacher).
# The micro configs are the real ones with the sizes shrunk: the same stages, layers, attention placement, mid
# block and (SDXL) transformer depths and added conditions, so that every recipe applies to them as it does to
# the real models.
MICRO_SD_UNET = {
    **SD1_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 16,
}
MICRO_SDXL_UNET = {
    **SDXL_UNET,
    "sample_size": 8,
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32
    + 6 * 8,  # pooled text (text_encoder_2 projection) + 6 time ids
    "norm_num_groups": 16,
}
MICRO_VAE = {
    **SD_VAE,
    "block_out_channels": [32, 64, 64, 64],  # 4 blocks: 8x down-sampling, as in SD (64 px <-> 8x8 latents)
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 64,
}

_add(
    Preset(
        "micro-sd",
        "micro",
        "sd",
        None,
        unet=MICRO_SD_UNET,
        vae=MICRO_VAE,
        scheduler=SD_SCHEDULER,
        resolution=64,
        note="tiny random-weight SD 1.x layout (4 stages), built offline by slimsd.models.micro",
    )
)
_add(
    Preset(
        "micro-sdxl",
        "micro",
        "sdxl",
        None,
        unet=MICRO_SDXL_UNET,
        vae=MICRO_VAE,
        scheduler=SDXL_SCHEDULER,
        resolution=64,
        note="tiny random-weight SDXL layout (3 stages, two text encoders), built offline by slimsd.models.micro",
    )
)
_add(
    replace(
        PRESETS["micro-sd"], name="toy-sd", note="micro-sd trained on the shapes world (committed weights)"
    )
)

RECIPES: dict[str, str] = {  # recipe name -> the teacher family it applies to
    "bk-base": "sd",
    "bk-small": "sd",
    "bk-tiny": "sd",
    "ssd-1b": "sdxl",
    "vega": "sdxl",
}


def names(*kinds: str) -> list[str]:
    """The model names of the given kinds ("teacher", "student", "micro"), in the order above."""
    return [n for n, p in PRESETS.items() if p.kind in kinds]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise unknown("preset", name, PRESETS)
    return PRESETS[name]


def student_teacher_unet(preset: Preset) -> dict:
    """The U-Net config of a teacher preset; for a student, its teacher's."""
    if preset.kind == "student":
        return get_preset(preset.teacher).unet
    return preset.unet
