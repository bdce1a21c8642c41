"""Image I/O: OME-Zarr images and plates (:mod:`.ome_zarr`) and TIFF ingest (:mod:`.convert`)."""

from l2l_scale.io.ome_zarr import (  # noqa: F401
    ImageRef,
    list_fields,
    list_images,
    open_image,
    provenance,
    read_info,
    select_channels,
    write_image,
    write_plate,
)
