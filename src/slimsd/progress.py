"""slimsd's own progress bars (the libraries' bars are off, see :func:`slimsd.load`): on stderr, and only where
stderr is a terminal, so that logs and pipes get the one-line-per-phase output alone."""

from __future__ import annotations


class Progress:
    """A bar fed by ``update_to(done, total)``, the callback shape of :func:`slimsd.run.generate.generate`."""

    def __init__(self, desc: str, disable: bool = False, unit: str = "step"):
        from tqdm.auto import tqdm

        # disable=None: tqdm turns itself off when stderr is not a terminal.
        self._bar = tqdm(
            desc=desc, unit=unit, disable=True if disable else None, dynamic_ncols=True, leave=False
        )

    def update_to(self, done: int, total: int) -> None:
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._bar.close()
