"""Evaluation protocols and scorers by name: data, free of heavy imports (``slimsd eval --help`` stays fast).

The MS-COCO 30K protocol of BK-SDM (Kim et al. 2023): 30K val2014 captions, 512 px, PNDM 25 steps, guidance 7.5,
seed 1234, images scored after a PIL bicubic resize to 256 px.
"""

FID_EXTRACTORS = ("inception-v3", "stand-in")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"

# Named protocols: settings they fix (explicit options still win, and are recorded in the report).
PROTOCOLS = {
    "bk-sdm-coco30k": {
        "resolution": 512,
        "score_resolution": 256,
        "scheduler": "pndm",
        "steps": 25,
        "guidance": 7.5,
        "seed": 1234,
        "num_prompts": 30000,
    },
}
