"""A model or adapter a user names: a local folder or a Hub id, and the JSON files read from it.

The one place that tells folders and Hub ids apart by how they are written (the checks before
loading, the adapter reader, ``safemerge eval``), and that reads a small JSON file with a
one-line error.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mergekit_safemerge.errors import SafeMergeError


def looks_local(path: str) -> bool:
    """A path the user clearly meant as a folder: Hub ids look like ``org/name``."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") != 1


def read_json(path: str, label: str) -> Any:
    """The JSON document in ``path``; unreadable or invalid JSON is one line naming ``label``
    and the file."""
    try:
        with open(path, encoding="utf-8") as fp:
            return json.load(fp)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        name = os.path.basename(path)
        raise SafeMergeError(f"{label}: {name} is not valid JSON ({error})") from None
