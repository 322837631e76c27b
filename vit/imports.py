"""Work deferred until a module is imported (a post-import hook), so that `import vit` stays light.

Registering the presets with timm needs timm, whose import (torchvision's models included) costs seconds; `vit`
registers them when timm is imported, by whomever, or at once when it is imported already.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from collections.abc import Callable


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once module `name` is imported: now if it is already, else right after its import ends."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    """A finder that finds nothing itself: it lets the other finders find module `name` and has its loader call
    `callback` after executing it, then steps aside."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once only, and out of the way of the search below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute, callback = loader.exec_module, self.callback

        def exec_module(module) -> None:
            execute(module)
            del loader.exec_module  # the loader's own method again
            try:
                callback()
            except Exception as e:  # the module itself imported fine: it stays usable
                warnings.warn(f"after importing {fullname}: {type(e).__name__}: {e}", stacklevel=2)

        loader.exec_module = exec_module
        return spec
