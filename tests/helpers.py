"""Test helpers: run the CLI in-process and capture its exit code and output."""

from __future__ import annotations


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``slimsd ARGS``, run in this process."""
    from slimsd.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


# A distillation config that trains in seconds on micro-sd (tests of the trainer and its objectives).
FAST_DISTILL = {
    "teacher": "micro-sd",
    "student": "bk-small",
    "data": "shapes:16",
    "batch_size": 4,
    "learning_rate": 1e-3,
    "checkpoint_every": 0,
    "progress": False,
    "tensorboard": False,
    "resolution": 64,
}
