"""The source of `pipeline` as this process loaded it: every module of it, `pipeline/**/*.py` (not the files an
editor keeps beside them), read once when the package is first imported (`pipeline/__init__.py` imports this module),
as bytes keyed by the file's path in the package (`serve.py`, `tracking/steps.py`): `FILES`.

A file edited on disk while the process runs (a `git pull`, an editor) changes nothing the process records of its
code, which is this copy:
- the digests of the code (`pipeline.tracking.code_digest`: tag `train_code`, prepare's cache key);
- the copy of `pipeline/` logged with a model (`write`), which `mlflow models serve` runs;
- the scoring code a logged model's copy is compared with before it is scored (`steps.scoring_code_changes`).
And the process runs this copy too: a module of `pipeline` imported later (`main` imports train, evaluate and register
once its params are checked) is compiled from these bytes, not from the file as it is by then (`SnapshotLoader`).
Each process has its own: a step `mlflow run` starts reads the files as they are when it starts.

No imports beyond the standard library's: reading the files (~0.6 MB, a few ms) is all it costs.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path
from types import MappingProxyType

PACKAGE = __name__.rpartition(".")[0]  # "pipeline"
PACKAGE_DIR = Path(__file__).resolve().parent


def _read(path: Path) -> tuple[bytes, dict]:
    """`path`'s bytes and the stats Python's import checks a cached `.pyc` against (mtime, size) of those bytes.
    A file written while it was read gets mtime 0, which no `.pyc` carries: it is compiled from the bytes read."""
    before = path.stat()
    data = path.read_bytes()
    after = path.stat()
    same = (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size) and after.st_size == len(data)
    return data, {"mtime": after.st_mtime if same else 0, "size": len(data)}


def _modules() -> list[Path]:
    """The package's `*.py` files that are modules of it, each part of their path a Python name: not what editors
    leave beside the files they edit, such as Emacs's lock `.#config.py` (a link to nowhere, which failed every command
    while a file was being edited) or Jupyter's `.ipynb_checkpoints/config-checkpoint.py`."""
    return [path for path in sorted(PACKAGE_DIR.rglob("*.py"))
            if all(part.isidentifier() for part in path.relative_to(PACKAGE_DIR).with_suffix("").parts)]


_read_files = {p.relative_to(PACKAGE_DIR).as_posix(): _read(p) for p in _modules()}
FILES: MappingProxyType[str, bytes] = MappingProxyType({key: data for key, (data, _) in _read_files.items()})
_STATS = {key: stats for key, (_, stats) in _read_files.items()}
del _read_files


def write(folder: str | Path) -> Path:
    """Write `FILES` into `folder`/pipeline, in the package's layout (no `__pycache__`); return that folder: the copy
    of the code a model is logged with (`code/pipeline/` among its artifacts)."""
    root = Path(folder) / PACKAGE
    for key, data in FILES.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


class SnapshotLoader(importlib.machinery.SourceFileLoader):
    """Loads a module of the package from `FILES`, the bytes read at the package's first import, not from the file as
    it is now. Its `.pyc` in `__pycache__` serves where it was compiled from those bytes (the mtime and size they were
    read with). A file made since (not in `FILES`) loads as usual."""

    def __init__(self, fullname: str, path: str):
        super().__init__(fullname, path)
        resolved = Path(path).resolve()
        key = resolved.relative_to(PACKAGE_DIR).as_posix() if resolved.is_relative_to(PACKAGE_DIR) else None
        self.key = key if key in FILES else None

    def get_data(self, path):
        return FILES[self.key] if self.key and path == self.path else super().get_data(path)

    def path_stats(self, path):
        return dict(_STATS[self.key]) if self.key and path == self.path else super().path_stats(path)


def _install() -> None:
    """Have the package's modules load with `SnapshotLoader`. Python's import looks a module of a package up in each
    folder of the package's `__path__` with the finder `sys.path_importer_cache` holds for that folder: for this
    package's folders, one made here. Only imports of the package's own modules ask it; no other import changes."""
    loaders = [(importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
               (SnapshotLoader, importlib.machinery.SOURCE_SUFFIXES),
               (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES)]
    packages = [key.split("/")[:-1] for key in FILES if key.rpartition("/")[2] == "__init__.py"]
    for top in sys.modules[PACKAGE].__path__:
        for parts in packages:
            folder = os.path.join(top, *parts)
            sys.path_importer_cache[folder] = importlib.machinery.FileFinder(folder, *loaders)


_install()
