"""``l2l-scale convert``: TIFF / OME-TIFF (and CZI/ND2/LIF) files to NGFF 0.5 OME-Zarr.

:func:`convert` turns one file into one image, several into a folder of images, or (with a file-name pattern)
into an HCS plate. Files are opened lazily (:func:`l2l_scale.io.tiff.read_tiff`, :mod:`l2l_scale.io.vendor`) and
written through the data layer (:mod:`l2l_scale.io.write`), so the output is written to a temporary sibling path
and renamed at the end (:mod:`l2l_scale.io.output`).
"""

from __future__ import annotations

import glob
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import xarray as xr

from l2l_scale.errors import ConfigError, InputError
from l2l_scale.io.output import atomic_output, check_output
from l2l_scale.io.prov import provenance
from l2l_scale.io.tiff import TIFF_SUFFIXES, forget_handles, image_stem, read_tiff
from l2l_scale.io.write import write_image, write_plate

__all__ = ["convert", "expand_inputs"]


# ----------------------------------------------------------------------------------------------- inputs


def _is_tiff_name(path: Path) -> bool:
    # Skip hidden files: macOS '._name.tif' resource forks are not TIFFs and would fail the whole folder.
    return path.suffix.lower() in TIFF_SUFFIXES and not path.name.startswith(".")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (every ``*.tif``/``*.tiff`` in them, sorted) and globs (sorted) -> a list of files.

    Raises
    ------
    InputError
        An input does not exist, a glob matches nothing, or a folder holds no TIFFs.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for inp in inputs:
        text = str(inp)
        p = Path(text)
        if p.exists():
            matches = [p]
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise InputError(f"{text}: no files match this pattern; check the pattern and quote it in the shell")
        else:
            raise InputError(f"{text}: path does not exist; check the spelling")
        for m in matches:
            if m.is_dir():
                found = sorted(c for c in m.iterdir() if c.is_file() and _is_tiff_name(c))
                if not found:
                    raise InputError(f"{m}: folder holds no .tif/.tiff files; give the folder with the TIFFs")
                files.extend(found)
            else:
                files.append(m)
    unique: list[Path] = []
    seen = set()
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    if not unique:
        raise InputError("no input files given; pass TIFF files, folders or glob patterns")
    return unique


_ROW_RE = re.compile(r"^[A-Za-z]+$")
_WELL_SPLIT = re.compile(r"^([A-Za-z]+|\d+)\W?_?0*(\d+)$")


def _row_name(row: str, file: Path, pattern: str) -> str:
    row = row.strip()
    if row.isdigit() and int(row) > 0:
        # Numeric rows (r01c02 naming): 1 -> A, 26 -> Z, 27 -> AA.
        n, out = int(row), ""
        while n:
            n, r = divmod(n - 1, 26)
            out = chr(65 + r) + out
        return out
    if not _ROW_RE.match(row):
        raise InputError(f"{file}: row {row!r} matched by the plate pattern {pattern!r} is not letters or a "
                         "number; fix the pattern")
    return row.upper()


def _plate_key(file: Path, rx: re.Pattern, pattern: str) -> tuple[str, str]:
    m = rx.search(file.name)
    if not m:
        raise InputError(f"{file}: file name does not match the plate pattern {pattern!r}; fix the pattern or "
                         "remove the file from the inputs")
    g = m.groupdict()
    if g.get("row") is not None and g.get("col") is not None:
        row, col = g["row"], g["col"]
    elif g.get("well") is not None:
        wm = _WELL_SPLIT.match(g["well"].strip())
        if not wm:
            raise InputError(f"{file}: well {g['well']!r} is not like 'B03' or 'B/3'; fix the plate pattern")
        row, col = wm.group(1), wm.group(2)
    else:
        raise InputError(f"{file}: the plate pattern {pattern!r} matched without a row/col or well; make those "
                         "groups non-optional")
    col, field = col.strip(), (g.get("field") or "").strip()
    if not col.isdigit() or not field.isdigit():
        raise InputError(f"{file}: column {col!r} and field {field!r} from the plate pattern {pattern!r} must be "
                         r"numbers; use groups like (?P<col>\d+) and (?P<field>\d+)")
    return f"{_row_name(row, file, pattern)}/{int(col)}", str(int(field))


def _compile_plate(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"plate pattern {pattern!r} is not a valid regular expression ({exc}); fix --plate") from None
    groups = set(rx.groupindex)
    if "field" not in groups or not ({"row", "col"} <= groups or "well" in groups):
        raise ConfigError(f"plate pattern {pattern!r} needs named groups 'row' and 'col' (or 'well') and 'field', "
                          r"e.g. --plate '(?P<row>[A-H])(?P<col>\d+)_f(?P<field>\d+)'")
    return rx


# ----------------------------------------------------------------------------------------------- convert


@contextmanager
def _closing_inputs(files: Sequence[Path]) -> Iterator[None]:
    try:
        yield
    finally:
        forget_handles(files)


def convert(inputs: Sequence[str | Path] | str | Path, output: str | Path, *, plate: str | None = None,
            axes: str | None = None, pixel_size: float | tuple | Mapping | None = None,
            channel_names: Sequence[str] | None = None, chunks: int | None = None,
            overwrite: bool = False, command: str | None = None) -> list[Path]:
    """Convert TIFF / OME-TIFF (and CZI/ND2/LIF, :mod:`l2l_scale.io.vendor`) files to NGFF 0.5 OME-Zarr.

    Parameters
    ----------
    inputs : sequence of str or Path
        Files, folders (their ``*.tif``/``*.tiff``, sorted) and glob patterns (sorted).
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    output : str or Path
        One input file: the image written (e.g. ``out.zarr``). Several files: a folder created here holding
        ``<stem>.zarr`` per file. With ``plate``: the HCS plate.
    plate : str, optional
        A regular expression searched in each file name, with named groups ``row`` and ``col`` (or ``well``)
        and ``field``, e.g. ``(?P<row>[A-H])(?P<col>\\d+)_f(?P<field>\\d+)``; the files become one plate.
    axes, pixel_size, channel_names, chunks
        As in :func:`~l2l_scale.io.tiff.read_tiff`; applied to every file. ``chunks`` is also the written y/x
        chunk size.
    overwrite : bool
        Replace an existing output.

    Returns
    -------
    list of Path
        The written images: ``[output]`` for one image or a plate, every ``output/<stem>.zarr`` for a folder.

    Notes
    -----
    Every input's metadata is read (and checked for truncation) before anything is written. Each output is
    built in a ``.partial`` sibling and renamed when complete, so a failure leaves nothing that looks like a
    finished OME-Zarr, and inputs are only ever opened read-only.
    """
    output = Path(output)
    rx = _compile_plate(plate) if plate is not None else None
    files = expand_inputs(inputs)
    # Refuse an existing or overlapping output before any (possibly long) metadata scan.
    check_output(output, overwrite=overwrite, inputs=files)
    params = {"axes": axes, "pixel_size": pixel_size, "channel_names": channel_names, "chunks": chunks,
              "plate": plate}
    # Open every file first: a bad file among hundreds fails in seconds, not after hours of writing.
    from l2l_scale.io.vendor import is_vendor_file, read_vendor

    images = [read_vendor(f, pixel_size=pixel_size, channel_names=channel_names, chunks=chunks) if is_vendor_file(f)
              else read_tiff(f, axes=axes, pixel_size=pixel_size, channel_names=channel_names, chunks=chunks)
              for f in files]
    write_kw = {"chunks": chunks, "overwrite": overwrite, "inputs": files}

    with _closing_inputs(files):
        if rx is not None:
            fields: dict[tuple[str, str], xr.DataArray] = {}
            origin: dict[tuple[str, str], Path] = {}
            for f, img in zip(files, images):
                key = _plate_key(f, rx, plate)
                if key in fields:
                    raise InputError(f"{f}: well {key[0]} field {key[1]} is also given by {origin[key]}; each "
                                     "(well, field) needs one file, fix the plate pattern or the inputs")
                fields[key], origin[key] = img, f
            write_plate(fields, output, provenance=_provenance(params, files, images, command),
                        label="converting plate", **write_kw)
            return [output]

        if len(files) == 1:
            write_image(images[0], output, provenance=_provenance(params, files, images, command),
                        name=image_stem(files[0]), label=f"converting {files[0].name}", **write_kw)
            return [output]

        names: dict[str, Path] = {}
        for f in files:
            stem = image_stem(f)
            if stem in names:
                raise InputError(f"{f} and {names[stem]} would both be written as {stem}.zarr; rename one or "
                                 "convert them separately")
            names[stem] = f
        written = []
        # The folder as a whole appears only when every image in it is complete.
        with atomic_output(output, overwrite=overwrite, inputs=files) as tmp:
            for f, img in zip(files, images):
                write_image(img, tmp / f"{image_stem(f)}.zarr", provenance=_provenance(params, [f], [img], command),
                            name=image_stem(f), label=f"converting {f.name}", chunks=chunks, inputs=files)
                written.append(output / f"{image_stem(f)}.zarr")
        return written


def _provenance(params: dict, files: Sequence[Path], images: Sequence[xr.DataArray], command: str | None) -> dict:
    sources = {str(f): img.attrs["metadata_source"] for f, img in zip(files, images)}
    return provenance(params, [str(f) for f in files], command=command, metadata_source=sources)
