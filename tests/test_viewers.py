"""A restored plate opens in a second, independent reader: zarr plus ome-zarr-models' NGFF 0.5 HCS, well and
image models, which list every well and field and lead to the same pixels as l2l-scale's own reader."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from l2l_scale.io import ome_zarr as oz


def test_restored_plate_lists_every_well_and_field_in_ome_zarr_models(tmp_path):
    from ome_zarr_models.v05.hcs import HCS
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.well import Well

    from l2l_scale.model import ModelSpec, build_unet, export_model
    from l2l_scale.predict import predict
    from l2l_scale.synthetic import simulate

    spec = ModelSpec(unet_n_depth=1, unet_n_first=8, unet_kern_size=3)
    model = export_model(build_unet(spec), spec, tmp_path / "m", metadata={"channels": {"input": ["AC-15"]}})
    keys = ["A/1/0", "A/1/1", "B/3/0"]
    fields = {k: xr.DataArray(np.asarray(simulate("actin", 48, seed=i).values), dims=("c", "y", "x"),
                              coords={"c": ["AC-15", "phalloidin", "truth"]}, attrs={"pixel_size": 0.05})
              for i, k in enumerate(keys)}
    oz.write_plate(fields, tmp_path / "plate.zarr", chunks=32)
    out = predict(model, tmp_path / "plate.zarr", tmp_path / "restored.zarr", tile=32)

    root = zarr.open_group(str(out), mode="r")
    hcs = HCS.from_zarr(root)
    listed = []
    for well in hcs.ome_attributes.plate.wells:
        w = Well.from_zarr(root[well.path])
        for image in w.ome_attributes.well.images:
            key = f"{well.path}/{image.path}"
            img = Image.from_zarr(root[key])
            (ms,) = img.ome_attributes.multiscales
            assert [a.name for a in ms.axes] == ["c", "y", "x"]
            level0 = np.asarray(root[f"{key}/{ms.datasets[0].path}"][...])
            np.testing.assert_array_equal(level0, oz.open_image(out, field=key).values)
            assert level0.shape == (1, 48, 48) and np.isfinite(level0).all()
            listed.append(key)
    assert sorted(listed) == keys
    assert {r.name for r in hcs.ome_attributes.plate.rows} == {"A", "B"}
    assert pytest.approx(sorted(c.name for c in hcs.ome_attributes.plate.columns)) == ["1", "3"]
