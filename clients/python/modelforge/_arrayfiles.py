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
        ValueError: the file is not one numpy reads without pickle: another format, damaged or truncated, or
            arrays of Python objects (as numpy saves a list of ``str``), which only pickle reads.
    """
    with open(path, "rb") as file:
        try:
            loaded = np.load(file, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded as archive:  # members are read, decompressed and parsed only when asked for
                return {name: archive[name] for name in archive.files}
        except ValueError as exc:
            # numpy refuses to unpickle with plain ValueErrors whose advice, allow_pickle=True, is no option here:
            # pickle runs code from the file. Its messages are all that tells those refusals apart.
            if "Object arrays cannot be loaded" in str(exc):
                raise ValueError(
                    f"{os.fspath(path)} holds an array of Python objects (how numpy saves a list of str), which only "
                    "pickle reads, and pickle is never used here: save strings as a fixed-width unicode ('U') or "
                    "bytes ('S') array, e.g. np.save(path, np.asarray(texts, dtype=str))"
                ) from exc
            if "pickled" in str(exc):  # numpy takes a file with neither signature for a pickle
                raise _unreadable(path, "it starts with neither's signature") from exc
            raise _unreadable(path, str(exc) or type(exc).__name__) from exc
        except Exception as exc:
            # Damaged bytes fail in many ways that no library documents: zipfile.BadZipFile, zlib.error,
            # tokenize.TokenError or SyntaxError from a header, EOFError, OverflowError, NotImplementedError, a
            # MemoryError for a header claiming a huge shape... Each means the file cannot be read as arrays.
            raise _unreadable(path, str(exc) or type(exc).__name__) from exc


def _unreadable(path: str | os.PathLike[str], why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)} is not a .npy or .npz file that numpy reads without pickle: {why}")
