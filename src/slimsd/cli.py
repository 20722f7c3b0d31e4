"""The ``slimsd`` command: one sub-command per stage, each thin over its module (``slimsd/commands/``).

Sub-commands load lazily, so ``slimsd presets`` does not pay for importing torch. Every user error ends the
same way: one line on stderr naming the bad value and what is allowed, and exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from slimsd import __version__

# name -> "module:attribute" of the click command
COMMANDS = {
    "presets": "slimsd.commands.presets:presets",
    "inspect": "slimsd.commands.inspect:inspect",
    "compress": "slimsd.commands.compress:compress",
    "distill": "slimsd.commands.distill:distill",
    "finetune": "slimsd.commands.finetune:finetune",
    "export": "slimsd.commands.export:export",
    "quantize": "slimsd.commands.quantize:quantize",
    "cache": "slimsd.commands.cache:cache",
    "data": "slimsd.commands.data:data",
    "generate": "slimsd.commands.generate:generate",
    "ui": "slimsd.commands.ui:ui",
    "bench": "slimsd.commands.bench:bench",
    "eval": "slimsd.commands.eval:eval_",
    "demo": "slimsd.commands.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(module) is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slimsd")
def cli():
    """slimsd: distilled Stable Diffusion. Compress, distill, generate, benchmark, evaluate."""


# Optional packages (pyproject's extras): a command that needs a missing one says which, in one line.
OPTIONAL = {
    "gradio": "ui",
    "gradio_client": "ui",
    "tensorboard": "train",
    "pyarrow": "train",
    "scipy": "eval",
    "matplotlib": "eval",
}


def missing_package(e: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing optional package, or None when the missing module is not one."""
    name = (e.name or "").split(".")[0]
    if name not in OPTIONAL:
        return None
    extra = OPTIONAL[name]
    return f"this needs the optional package {name!r}, which is not installed: pip install 'slimsd[{extra}]'"


def require(*packages: str) -> None:
    """Refuse, before any work, a command whose optional packages are missing (one line naming them)."""
    for name in packages:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            from slimsd.errors import SlimsdError

            raise SlimsdError(missing_package(e) or str(e)) from None


def one_line(message: str) -> str:
    """A message as one line: a library's multi-line reason (tarfile lists every method it tried) is joined."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def fail(message: str, prefix: str = "slimsd") -> None:
    """One line on stderr, exit code 2."""
    click.echo(f"{prefix}: error: {one_line(message)}", err=True)
    sys.exit(2)


def quiet_libraries() -> None:
    """Keep the libraries' progress bars, info chatter and warnings off the user's terminal (errors still
    show). Set before they are imported: huggingface_hub and transformers read these at import time."""
    import os
    import warnings

    # huggingface_hub's bars, and transformers' ("Writing model shards" in every save_pretrained) follow it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings(
        "ignore", module=r"(huggingface_hub|diffusers|transformers|torch|accelerate)(\.|$)"
    )


def main(argv: list[str] | None = None) -> None:
    from slimsd.errors import SlimsdError

    quiet_libraries()
    try:
        cli.main(args=argv, prog_name="slimsd", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted")
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        fail(e.format_message(), prefix=e.ctx.command_path if e.ctx else "slimsd")
    except click.ClickException as e:
        fail(e.format_message())
    except SlimsdError as e:
        fail(str(e))
    except ModuleNotFoundError as e:
        message = missing_package(e)
        if message is None:
            raise
        fail(message)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
