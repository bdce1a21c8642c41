"""Vendor formats in ``convert`` through bioio: CZI written with pylibCZIrw (the writer bioio-czi's own tests
use), read lazily and converted to NGFF 0.5; missing plugins get one line naming what to install."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from l2l_scale.cli import main
from l2l_scale.io.read import open_image


def _write_czi(path, data, names, pixel_um):
    from pylibCZIrw import czi as pyczi

    with pyczi.create_czi(str(path), exist_ok=True) as w:
        for c in range(data.shape[0]):
            w.write(data=data[c], plane={"C": c, "T": 0, "Z": 0})
        w.write_metadata(document_name=path.stem, channel_names=dict(enumerate(names)),
                         scale_x=pixel_um * 1e-6, scale_y=pixel_um * 1e-6)


def test_convert_reads_czi_lazily(tmp_path):
    pytest.importorskip("bioio_czi", reason="CZI needs the [formats] extra (bioio, bioio-czi with pylibCZIrw)")
    from l2l_scale.io.vendor import read_vendor
    from l2l_scale.synthetic import simulate

    data = np.asarray(simulate("actin", (70, 90), seed=3).isel(c=[0, 1]).values)
    czi = tmp_path / "field.czi"
    _write_czi(czi, data, ["AC-15", "phalloidin"], 0.065)
    lazy = read_vendor(czi)
    assert isinstance(lazy.data, da.Array) and lazy.dims == ("c", "y", "x")
    assert main(["convert", str(czi), str(tmp_path / "field.zarr"), "--chunks", "32", "--scheduler", "threads"]) == 0
    img = open_image(tmp_path / "field.zarr")
    assert list(img.coords["c"].values) == ["AC-15", "phalloidin"]
    assert img.attrs["pixel_size"]["y"] == pytest.approx(0.065) and img.attrs["pixel_size"]["x"] == pytest.approx(0.065)
    np.testing.assert_array_equal(img.values, data)


def test_missing_plugin_names_what_to_install(tmp_path, capsys):
    pytest.importorskip("bioio", reason="with bioio absent every vendor file names the [formats] extra instead")
    try:
        import bioio_lif  # noqa: F401
        pytest.skip("bioio-lif is installed here, so a .lif file is readable")
    except ImportError:
        pass
    lif = tmp_path / "scan.lif"
    lif.write_bytes(b"not really a lif")
    assert main(["convert", str(lif), str(tmp_path / "o.zarr"), "--scheduler", "threads"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bioio-lif" in err and "bioformats2raw" in err, err
    assert not (tmp_path / "o.zarr").exists()
