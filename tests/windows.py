"""Main windows for the viewer tests: test settings, shown, closed with their threads checked."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, QThread

from viewer.qt_main_window import QtMainWindow


def window_factory(
    qtbot: Any,
    tmp_path: Path,
    install: Callable[..., None] | None = None,
    install_args: tuple[str, ...] = (),
    extra_threads: Callable[[QtMainWindow], Iterable[QThread]] = lambda _w: (),
    **defaults: Any,
) -> Iterator[Callable[..., QtMainWindow]]:
    """Yield a function that builds and shows main windows; at the end close them all and check
    that no worker thread outlived its window.

    Each window gets a settings file in the test's folder, remembers nothing and opens no modal
    dialog; `defaults` adds window arguments, `install(window, **args)` adds a tool before the
    window is shown (`install_args` names the arguments of `make` meant for it) and
    `extra_threads` names that tool's threads for the final check.
    """
    windows: list[QtMainWindow] = []

    def make(**kwargs: Any) -> QtMainWindow:
        tool_kwargs = {key: kwargs.pop(key) for key in install_args if key in kwargs}
        kwargs.setdefault(
            "settings", QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
        )
        kwargs.setdefault("remember", False)
        kwargs.setdefault("dialogs", False)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        w = QtMainWindow(**kwargs)
        if install is not None:
            install(w, **tool_kwargs)
        w.resize(1200, 800)
        w.show()
        qtbot.waitExposed(w)
        windows.append(w)
        return w

    yield make
    for w in windows:
        threads = [*w.threads, *extra_threads(w)]
        w.close()
        assert all(not t.isRunning() for t in threads), "a worker thread outlived its window"
