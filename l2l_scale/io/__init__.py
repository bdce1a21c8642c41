"""Image I/O: OME-Zarr reading (:mod:`.read`) and writing (:mod:`.write`), the output lifecycle (:mod:`.output`),
provenance (:mod:`.prov`), and TIFF ingest (:mod:`.convert`, :mod:`.tiff`)."""

from l2l_scale.io.prov import provenance  # noqa: F401
from l2l_scale.io.read import (  # noqa: F401
    ImageRef,
    list_fields,
    list_images,
    open_image,
    read_info,
    select_channels,
)
from l2l_scale.io.write import write_image, write_plate  # noqa: F401
