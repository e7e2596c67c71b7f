"""Array files: reading a ``.npy`` or ``.npz`` file of inputs whole, without pickle, for the jobs client and the CLI.

A file that numpy cannot read raises one ValueError that names it, whatever numpy, zipfile or zlib raised inside.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["read"]


def read(path: str | os.PathLike[str]) -> np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]:
    """The array of a ``.npy`` file, or every array of a ``.npz`` archive by name, read into memory now.

    Raises:
        OSError: the file cannot be opened (FileNotFoundError, IsADirectoryError, PermissionError...).
        ValueError: the file is not one numpy reads without pickle: another format, damaged or truncated.
    """
    with open(path, "rb") as file:
        try:
            loaded = np.load(file, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded as archive:  # members are read, decompressed and parsed only when asked for
                return {name: archive[name] for name in archive.files}
        except Exception as exc:
            # Damaged bytes fail in many ways that no library documents: zipfile.BadZipFile, zlib.error,
            # tokenize.TokenError or SyntaxError from a header, EOFError, OverflowError, NotImplementedError, a
            # MemoryError for a header claiming a huge shape... Each means the file cannot be read as arrays.
            raise ValueError(
                f"{os.fspath(path)} is not a .npy or .npz file that numpy reads without pickle: "
                f"{str(exc) or type(exc).__name__}"
            ) from exc
