"""The distillation config: YAML's boolean words read as words for string keys, and every bad value refused in
one line before any work starts."""

from __future__ import annotations

import pytest

from slimsd.errors import SlimsdError
from slimsd.train.config import CHOICES, DistillConfig, load_config

from helpers import run_cli

# Every spelling YAML 1.1 turns into a boolean that a user may mean as a word.
BOOL_WORDS = ["no", "No", "NO", "off", "Off", "false", "False", "yes", "on", "true", "True", "y", "n"]


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_yaml_boolean_words_are_read_as_the_word_for_every_choice_key(key, tmp_path):
    for word in BOOL_WORDS:
        path = tmp_path / "c.yaml"
        path.write_text(f"{key}: {word}\n")
        for source in ({"path": path}, {"overrides": [f"{key}={word}"]}):
            if word in CHOICES[key]:
                assert getattr(load_config(**source), key) == word
            else:  # still a one-line error that names the word as written and lists the choices
                with pytest.raises(SlimsdError) as e:
                    load_config(**source)
                assert f"{word!r} is not allowed; allowed: {', '.join(CHOICES[key])}" in str(e.value)


def test_mixed_precision_no_in_a_yaml_file_and_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\nema: yes\ncenter_crop: off\nvalidation_prompts: [yes, a cat]\n")
    c = load_config(path)
    assert (c.mixed_precision, c.ema, c.center_crop) == ("no", True, False)  # bool keys keep the booleans
    assert c.validation_prompts == ["yes", "a cat"]  # a list of strings keeps the words
    code, out, _ = run_cli(["distill", "--config", str(path), "mixed_precision=no", "--dry-run"], capsys)
    assert code == 0 and "mixed_precision: 'no'" in out


BAD = [
    (["seed=-1"], "'seed': -1 is out of range; allowed: >= 0 and <= 4294967295"),
    (["seed=4294967296"], "'seed': 4294967296 is out of range"),
    (["validation_prompts=[1, 2]"], "'validation_prompts': expected a list of strings, got [1, 2]"),
    (["adam_beta1=1"], "'adam_beta1': 1.0 is out of range; allowed: >= 0 and < 1"),
    (["adam_beta2=1.5"], "'adam_beta2': 1.5 is out of range"),
    (["learning_rate=.nan"], "'learning_rate': nan is not a finite number"),
    (["lambda_out=.inf"], "'lambda_out': inf is not a finite number"),
    (["lambda_task=0", "lambda_out=0", "lambda_feat=0"], "all 0: nothing to learn"),
    (["mixed_precision=off"], "'mixed_precision': 'off' is not allowed; allowed: no, fp16, bf16"),
    (["overwrite=maybe"], "'overwrite': expected bool"),
    (["overwrite=true", "resume=runs/x/checkpoints/step-00000002"], "overwrite=true starts a new run"),
    (["overwrite=true", "resume=latest"], "overwrite=true starts a new run"),
    (["output_dir=/proc/slimsd-cannot-write-here", "max_steps=1"], "cannot be created"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_one_line_errors_before_any_work(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["distill", "data=shapes:4", "batch_size=2", "tensorboard=false", *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (args, err)
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_a_config_built_in_python_is_checked_too(tmp_path):
    """validation_prompts used to crash at the first validation, after all the training."""
    from slimsd.train.distill import train

    with pytest.raises(SlimsdError, match="expected a list of strings"):
        train(DistillConfig(output_dir=str(tmp_path / "run"), validation_prompts=[1, 2], validation_every=1))
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"teacher: micro-sd\nvalidation_prompts: [\xff\xfe]\n")
    code, _, err = run_cli(["distill", "--config", str(path), "--dry-run"], capsys)
    assert code == 2 and "is not UTF-8 text" in err and len(err.strip().splitlines()) == 1
