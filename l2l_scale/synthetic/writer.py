"""Writing simulations to disk: one OME-Zarr image, or an HCS plate of simulated fields."""

from __future__ import annotations

from l2l_scale.errors import ConfigError
from l2l_scale.synthetic.image import _parse_int, simulate


_ROWS = "ABCDEFGH"
_PLATE_COLUMNS = 12


def plate_keys(fields: int, fields_per_well: int = 4) -> list[str]:
    """``row/column/field`` keys for ``fields`` fields, filling wells A/1, A/2, ... row-wise (96-well layout)."""
    keys = []
    for i in range(fields):
        well, field = divmod(i, fields_per_well)
        row, col = divmod(well, _PLATE_COLUMNS)
        if row >= len(_ROWS):
            raise ConfigError(f"{fields} fields do not fit a 96-well plate at {fields_per_well} per well; "
                              "use fewer --fields")
        keys.append(f"{_ROWS[row]}/{col + 1}/{field}")
    return keys


def write_simulation(output, *, structure: str = "actin", size: int | tuple[int, int] = 2048, fields: int = 1,
                     seed: int = 0, n2n: bool = False, drift: tuple[float, float] = (0.0, 0.0), chunks: int = 1024,
                     overwrite: bool = False, command: str | None = None):
    """Simulate and write OME-Zarr: one image, or an HCS plate of ``fields`` fields.

    Field ``i`` uses seed ``seed + i``, so every field is a different scene and a plate is reproducible. Chunks are
    generated and written one at a time (see :func:`simulate`), so memory does not grow with ``size``.

    Parameters
    ----------
    output : path
        The ``.zarr`` to write (temporary sibling + rename, as every l2l-scale output).
    command : str, optional
        The command line for the output's provenance (default: this process's; the CLI passes its own).
    structure, size, seed, n2n, drift, chunks
        As for :func:`simulate`.
    fields : int
        Number of fields; more than one writes a plate with up to 4 fields per well (A/1/0, A/1/1, ...).
    overwrite : bool
        Replace an existing output.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    from l2l_scale.io.output import check_output
    from l2l_scale.io.prov import provenance
    from l2l_scale.io.write import write_image, write_plate

    fields = _parse_int(fields, "fields", "--fields 1")
    if fields < 1:
        raise ConfigError(f"fields={fields} must be at least 1; use --fields 1 for a single image")
    check_output(output, overwrite=overwrite)  # refuse before building anything
    params = dict(structure=structure, size=size, fields=fields, seed=seed, n2n=n2n, drift=list(drift),
                  chunks=chunks)
    prov = provenance(params, None, command=command)
    if fields == 1:
        return write_image(simulate(structure, size, seed=seed, n2n=n2n, drift=drift, chunks=chunks), output,
                           chunks=chunks, provenance=prov, overwrite=overwrite, label=f"simulating {structure}")
    images = {key: simulate(structure, size, seed=seed + i, n2n=n2n, drift=drift, chunks=chunks)
              for i, key in enumerate(plate_keys(fields))}
    return write_plate(images, output, chunks=chunks, provenance=prov, overwrite=overwrite,
                       label=f"simulating {structure}")
