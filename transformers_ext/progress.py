"""Progress bars without a dependency: the library's long loops (training, importance, subnet evaluation)
report through `progress_bar`, which shows nothing until an application installs a bar factory (the
scripts install a tqdm bar that honours --disable_tqdm; see cli.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable


class SilentBar:
    """The interface the library uses of a tqdm bar, doing nothing."""

    def __init__(self, iterable: Iterable | None = None, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


_factory: Callable[..., object] = SilentBar


def set_progress_bar(factory: Callable[..., object]) -> None:
    """Show the library's progress with `factory(iterable=None, **tqdm_keyword_arguments)` (e.g. tqdm)."""
    global _factory
    _factory = factory


def progress_bar(iterable: Iterable | None = None, **kwargs):
    return _factory(iterable, **kwargs)
