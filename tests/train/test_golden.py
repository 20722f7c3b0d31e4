"""Golden hashes: every objective, a few steps on the micro models, gives bit for bit the files it gave before
the training loop was split into objective modules (issue 25).

Each run trains 2 optimizer steps in fp32 (``mixed_precision: no``: the default compute dtype of a CPU with
bf16 would make the hashes depend on the machine) and hashes every file of ``final/`` and the weights of the
last checkpoint (the student, its EMA, LCM's target network). JSON files are hashed with the run's temporary
folder (and ``slimsd.json`` with slimsd's version) replaced by fixed words, since both vary between runs for reasons that are not the
computation. The recorded values come from the loop as it was before the split (commit 2c995db, one 537-line
``train()``, plus the sorted LoRA target_modules of the commit that adds this test); ``SLIMSD_RECORD_GOLDEN=1``
also prints the current values (pytest -s).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from slimsd.train.config import DistillConfig, finetune_config, make_config
from slimsd.train.distill import train

from helpers import FAST_DISTILL

TWO_STEPS = {**FAST_DISTILL, "max_steps": 2, "mixed_precision": "no", "data": "shapes:8", "batch_size": 2}
GUIDED = {"guidance_min": 2.0, "guidance_max": 4.0}


def run_config(name: str, out: Path) -> DistillConfig:
    """The config of golden run NAME, writing to OUT."""
    base = {**TWO_STEPS, "output_dir": str(out)}
    if name == "kd-micro-sd":  # every KD term, an EMA, caption dropout, two micro-batches per step
        return make_config(
            base | {"ema": True, "ema_decay": 0.5, "caption_dropout": 0.5, "gradient_accumulation_steps": 2}
        )
    if name == "kd-micro-sdxl":
        return make_config(base | {"teacher": "micro-sdxl", "student": "ssd-1b"})
    if name == "lcm":
        return make_config(base | GUIDED | {"objective": "lcm", "lcm_loss": "huber"})
    if name == "lcm-lora":
        return make_config(base | GUIDED | {"objective": "lcm-lora", "lora_rank": 4})
    if name == "progressive":  # one step per round: the second step learns from the first round's student
        return make_config(base | GUIDED | {"objective": "progressive", "progressive_steps": [8, 4]})
    if name == "finetune-prior":
        keys = {k: v for k, v in base.items() if k not in ("teacher", "student")}
        return finetune_config(
            keys | {"model": "micro-sd", "class_prompt": "a shape", "num_class_images": 2, "class_steps": 2}
        )
    if name == "staged":
        keys = {k: v for k, v in base.items() if k not in ("student", "max_steps")}
        stages = [
            {"recipe": "bk-small", "max_steps": 1},
            {"recipe": "bk-tiny", "max_steps": 1, "teacher": "previous"},
        ]
        return make_config(keys | {"stages": stages})
    raise KeyError(name)


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of OUT/final and of the last checkpoint's weights, by path under OUT."""
    from slimsd import __version__

    files = [p for p in (out / "final").rglob("*") if p.is_file()]
    checkpoints = sorted(out.rglob("checkpoints/step-*"))
    stage_dirs = sorted({c.parent.parent for c in checkpoints})
    for stage in stage_dirs:  # the last checkpoint of each run folder (a plan has one per stage)
        last = sorted((stage / "checkpoints").glob("step-*"))[-1]
        files += sorted(last.glob("*.safetensors"))
    hashes = {}
    for p in sorted(files):
        data = p.read_bytes()
        if p.name == "slimsd.json":  # written as json.dumps(info, indent=1) + "\n": the same bytes, rewritten
            data = (json.dumps(recorded_keys(json.loads(data)), indent=1) + "\n").encode()
            data = data.replace(json.dumps(__version__).encode(), b'"<version>"')
        if p.suffix == ".json":  # diffusers' configs keep the folder they were read from (_name_or_path)
            data = data.decode().replace(str(out), "<out>").encode()
        if p.suffix == ".safetensors":
            data = canonical_safetensors(data)
        hashes[p.relative_to(out).as_posix()] = hashlib.sha256(data).hexdigest()
    return hashes


# The config keys of the recording (DistillConfig at 2c995db). A key added since then appears in slimsd.json's
# record of the config ("distill", "finetune"); it is left out of the hash: with its default, a new key must not
# change these runs' computation, which the weights' hashes check.
# fmt: off
RECORDED_KEYS = {
    "teacher", "student", "objective", "data", "output_dir", "max_steps", "batch_size",
    "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "lr_scheduler", "lr_warmup_steps", "lambda_task", "lambda_out",
    "lambda_feat", "feat_norm", "feature_taps", "resolution", "center_crop", "random_flip", "caption_dropout",
    "checkpoint_every", "keep_last", "resume", "overwrite", "allow_config_change", "stop_at_step",
    "mixed_precision", "seed", "gradient_checkpointing", "use_8bit_adam", "ema", "ema_decay",
    "validation_prompts", "validation_every", "validation_steps", "log_every", "num_workers", "tensorboard",
    "progress", "allow_pickle", "solver_steps", "guidance_min", "guidance_max", "lcm_loss", "huber_c",
    "target_decay", "timestep_scaling", "cond_proj_dim", "lora_rank", "lora_alpha", "lora_targets",
    "sample_steps", "sample_guidance", "progressive_steps", "steps_per_round", "class_prompt",
    "num_class_images", "class_steps", "prior_loss_weight", "stages",
}
# fmt: on
FINETUNE_NAMES = {"model", "rank", "alpha", "target_modules"}  # finetune's names for four of them


def recorded_keys(info: dict) -> dict:
    """slimsd.json with its record of the config cut to the recording's keys."""
    for section in ("distill", "finetune"):
        if section in info:
            info[section] = {k: v for k, v in info[section].items() if k in RECORDED_KEYS | FINETUNE_NAMES}
    return info


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its header's keys sorted: the format's writer (Rust) keeps the metadata in a hash
    map whose order changes from process to process, so the same tensors and metadata give other bytes."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return json.dumps(header, sort_keys=True).encode() + data[8 + size :]


# Recorded from the loop before the split into objective modules: commit 2c995db with write_adapters' sorted
# target_modules (the commit that adds this test).
GOLDEN: dict[str, dict[str, str]] = {
    "kd-micro-sd": {
        "checkpoints/step-00000002/ema.safetensors": "9c00f8ba578f948caa71c4960abe0d020e46a0cd5b48d69bf220a3d48263c188",
        "checkpoints/step-00000002/student.safetensors": "2a86e16cc54420e6de58cad388d7ffd6fa74ffe4e0b68f4811593fd8067f965f",
        "final/model_index.json": "371cd110cb17a4a17183f549a8d6b37749bacdd80e5c031166d5d6ae7ee5ec8d",
        "final/scheduler/scheduler_config.json": "032341bf47c0ba828e8a9839ecb427dfbc82a9ce4b8872d4e4982e819925ba44",
        "final/slimsd.json": "a08657f44cbaf37d8eb4fa327b251a6e5b2672129708ace21f6cdcc435fa9ab7",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "7d24d25f85445f9a9af6216012dcb2f22d04c9eb5566f1c8ceca2556cbe47137",
        "final/unet/diffusion_pytorch_model.safetensors": "2b8728fe2f7f9464752ce35dd4c887fb25efca0119002f82e5d4fe48dce20873",
        "final/vae/config.json": "f899913f94c912e3b072a98e3d45b8d9e67d46870b1ccf681f2f3cfee5991e2d",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
    },
    "kd-micro-sdxl": {
        "checkpoints/step-00000002/student.safetensors": "3ce8707da41a16a6e5a5244676ad04e9d4eb30554058851ee5e3d44781f8a262",
        "final/model_index.json": "ea34826fed1e321773576868b2a742bbc80342bb417e1d231a2fa25300aa7b2b",
        "final/scheduler/scheduler_config.json": "444ce6a8ff6cf2c6880cc8230a70b3fd125374085b3eb62e21a793848b8c2ac6",
        "final/slimsd.json": "07d262fb148bda2cfe306819d34a28e8673c8a1bd1b5584103ccbca89b0d2c3c",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/text_encoder_2/config.json": "76bd7d013f05501f353224319cde1183db5ddd520332336ef265e6e21c4f8bcd",
        "final/text_encoder_2/model.safetensors": "6a3c95a3c9eb06499d6ac1d0074e7672fca4c61b01ff324e1137335624f849aa",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/tokenizer_2/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer_2/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "0bc1428d64a30d1f80e3134efecc615804ce02edd98d8c2f4156d7ab69d019c9",
        "final/unet/diffusion_pytorch_model.safetensors": "a81d2c74d10d477f7dcf2459cb4219b441f7e558901012d721b98f6d2088c5c8",
        "final/vae/config.json": "f899913f94c912e3b072a98e3d45b8d9e67d46870b1ccf681f2f3cfee5991e2d",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
    },
    "lcm": {
        "checkpoints/step-00000002/student.safetensors": "001fcc0c86b9315977f0dd6a7642dc8dcc02e8a886b0c170b868ac8556e1083b",
        "checkpoints/step-00000002/target.safetensors": "56a0b0518a776543472a69ac5c626ae24deadba34a3e1df8b1938c0577503ddb",
        "final/model_index.json": "cfe0cf62a6159abfd8a3c300c24b95233912884ab343f676310b53629c228e3d",
        "final/scheduler/scheduler_config.json": "fbff8e83caa0783bdeeefdf7520739d18d50b29a6e00e0f78578db19fe002aea",
        "final/slimsd.json": "4d8436b9facea1d01603997b3a7126addd7cdc459a4757cfa306f5f9706d7228",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "33b266105eda4e632802744a521a297718069db3619f332d1ae90cd3772aa554",
        "final/unet/diffusion_pytorch_model.safetensors": "d7ecb4b49b6ec7096662ee1e79239a31ebaf06b6ec93a8fce11dbdb76f94cc8a",
        "final/vae/config.json": "f899913f94c912e3b072a98e3d45b8d9e67d46870b1ccf681f2f3cfee5991e2d",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
    },
    "lcm-lora": {
        "checkpoints/step-00000002/student.safetensors": "67d4a5a0ea40ace6f3b5ea38416ab3cef93802215e141c2ad0fa040f82486511",
        "final/model_index.json": "cfe0cf62a6159abfd8a3c300c24b95233912884ab343f676310b53629c228e3d",
        "final/pytorch_lora_weights.safetensors": "0890276ef1cadd4b1e7daf214b2dd50ddf40767231b709ff5c2e41fa4a20a41d",
        "final/scheduler/scheduler_config.json": "fbff8e83caa0783bdeeefdf7520739d18d50b29a6e00e0f78578db19fe002aea",
        "final/slimsd.json": "611c6bbb89bc38a3a8df414effebe4b1ef41078d04defb3ec28d100ce4ba5ecf",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "7d24d25f85445f9a9af6216012dcb2f22d04c9eb5566f1c8ceca2556cbe47137",
        "final/unet/diffusion_pytorch_model.safetensors": "8e41967c94e2b4dd0d936c21117cacfc1047ce24139919ef0e84f8f4d56644eb",
        "final/vae/config.json": "f899913f94c912e3b072a98e3d45b8d9e67d46870b1ccf681f2f3cfee5991e2d",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
    },
    "progressive": {
        "checkpoints/step-00000002/student.safetensors": "359a94999d717db71404dc6ca54cb4e5e938dce1e3ecea820bd88bbdc815f56e",
        "checkpoints/step-00000002/target.safetensors": "359a94999d717db71404dc6ca54cb4e5e938dce1e3ecea820bd88bbdc815f56e",
        "final/model_index.json": "d34ebfa1831c9990a5ed7986d550296516da01394d6eb9a128d444557a84d513",
        "final/scheduler/scheduler_config.json": "3385d3cf04bc5c920e3eb31665704a84139f0789103bf84f93e8175fd8de34f4",
        "final/slimsd.json": "b2b46e32fb702a0557e217b8beb7d265fa0df5aa46f04bfccf45f3574075a98d",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "33b266105eda4e632802744a521a297718069db3619f332d1ae90cd3772aa554",
        "final/unet/diffusion_pytorch_model.safetensors": "959b52828d42a1da79d96a0368ed40f0cc0e1027f5c3e0f5afbd6fbaae739e1d",
        "final/vae/config.json": "f899913f94c912e3b072a98e3d45b8d9e67d46870b1ccf681f2f3cfee5991e2d",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
    },
    "finetune-prior": {
        "checkpoints/step-00000002/student.safetensors": "1a2b8c0e2da387e76036d615743fb7b0f2f756cd8f72bc5508bc43d3971e21ed",
        "final/pytorch_lora_weights.safetensors": "0e05c4d7c2eddfd0d03d6dc0c8250b362178199be5d2a722c383ed9ef9a91595",
        "final/slimsd.json": "545237a74c92eed15a0173e2b040607aefb377cae073767de13de4f9194316ce",
    },
    "staged": {
        "final/model_index.json": "371cd110cb17a4a17183f549a8d6b37749bacdd80e5c031166d5d6ae7ee5ec8d",
        "final/scheduler/scheduler_config.json": "032341bf47c0ba828e8a9839ecb427dfbc82a9ce4b8872d4e4982e819925ba44",
        "final/slimsd.json": "91f519f6d7a61a2f1ada60626e93d6ee94d2dfbaa31521c67c23ce7548201513",
        "final/text_encoder/config.json": "10d5712ca2ba3788285f754294e358e3a3ac5760e8a118e805e61a4401b8a910",
        "final/text_encoder/model.safetensors": "3af1aea41d698c1811e096e2d195de4e8a78852f41fb5b8b24e454b528083c36",
        "final/tokenizer/tokenizer.json": "097eca1d12ec06cfe573c395e0922ca4678762aad4f8c40437bec70e923450d5",
        "final/tokenizer/tokenizer_config.json": "5420545a13c1662f418adc7d9df01d960bf2da73ed099fa2f28b4364f2217484",
        "final/unet/config.json": "2d71a6c5bc39d3391bcd09ca06a4735c644cd024dd86793a2001a774981050a9",
        "final/unet/diffusion_pytorch_model.safetensors": "58e914ffe396f7707e9d15b087687c03ccee6989eda13da2f8268f0f7e5b374a",
        "final/vae/config.json": "ae18ed87851978e55bd469f207307effb5dab50d59fe3fe755c90cf16fd1e7ae",
        "final/vae/diffusion_pytorch_model.safetensors": "fd08a9d51ce94ddef910ecff1c972c4b028ca8f487c3454d85c102d95dbc5a4b",
        "stage-1/checkpoints/step-00000001/student.safetensors": "b1d4dfbf0412e5ba299a72c568737da5f7fa86fd07ae7de994f349d687b2e79f",
        "stage-2/checkpoints/step-00000001/student.safetensors": "0f5403a0f5701c9a7a438a533dcff86798c3058629281e831db20597d01b7d38",
    },
}

RUNS = ["kd-micro-sd", "kd-micro-sdxl", "lcm", "lcm-lora", "progressive", "finetune-prior", "staged"]


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("name", RUNS)
def test_each_objective_gives_the_recorded_files(tmp_path, name):
    out = tmp_path / "run"
    train(run_config(name, out))
    got = file_hashes(out)
    if os.environ.get("SLIMSD_RECORD_GOLDEN"):
        print(f"GOLDEN {name} {json.dumps(got)}")
    assert got == GOLDEN[name]
