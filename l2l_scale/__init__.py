"""l2l-scale: Label2label image restoration at facility scale.

Public API
----------
open_image, write_image, open_plate, list_fields, write_plate  (from :mod:`l2l_scale.io`)
simulate                                                      (from :mod:`l2l_scale.synthetic`)
"""

__version__ = "0.1.0"

from l2l_scale.errors import L2LError  # noqa: E402,F401
