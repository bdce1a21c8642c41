"""Provenance: the ``l2l_scale`` block every output carries in its attributes (version, command, parameters,
input, creation time, and step-specific entries such as the normalisation or the model)."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line to record: ``l2l-scale ARGV`` for the CLI's arguments, else this process's own."""
    return shlex.join(["l2l-scale", *argv]) if argv is not None else shlex.join(["python", *sys.argv])


def provenance(parameters: Mapping[str, Any] | None = None, inputs: Any = None, *, command: str | None = None,
               **extra: Any) -> dict:
    """Build the ``l2l_scale`` provenance block stored in every output's attributes.

    Parameters
    ----------
    parameters : mapping, optional
        The parameters of the step (JSON-serialisable; paths are turned into strings).
    inputs : str, Path or list, optional
        The input path(s) the output was derived from.
    command : str, optional
        The command line that made the output (default: this process's, see :func:`command_line`).
    **extra
        Further entries, e.g. ``normalization=...`` or ``model=...``.
    """
    from l2l_scale import __version__

    block = {
        "version": __version__,
        "command": command or command_line(),
        "parameters": jsonable(dict(parameters or {})),
        "input": jsonable(inputs),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    block.update(jsonable(extra))
    return block


def jsonable(obj: Any) -> Any:
    """``obj`` with paths, numpy scalars and arrays turned into JSON types (mappings and sequences recursively)."""
    # Exact types first: a field's provenance has hundreds of leaves, and isinstance against the Mapping ABC
    # costs microseconds each (a fifth of planning a plate of small fields).
    t = type(obj)
    if t is str or t is int or t is float or t is bool or obj is None:
        return obj
    if t is dict:
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
