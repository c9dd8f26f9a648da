"""compressing-scp: a DICOM storage node that compresses images on their way to the archive."""

import logging

__version__ = "0.1.0"
IMPLEMENTATION_CLASS_UID = "2.25.83500491375614110768923199629927902263"
"""The node's Implementation Class UID (PS3.7 D.3.3.2): a UUID-derived UID (PS3.5 B.2), the project having no
registered root. In its association negotiation and in the file meta of what it receives."""
IMPLEMENTATION_VERSION = f"CSCP_{__version__}"
"""Its Implementation Version Name (at most 16 characters)."""

logging.getLogger(__name__).addHandler(logging.NullHandler())
