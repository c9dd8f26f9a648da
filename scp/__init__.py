"""compressing-scp: a DICOM storage node that compresses images on their way to the archive."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
