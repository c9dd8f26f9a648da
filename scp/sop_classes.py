"""Storage SOP classes pynetdicom does not list: a vendor's private ones, retired and newer standard ones.

pynetdicom 3.0.4 knows 170 storage SOP classes. A modality may propose others: Siemens CT and MR send their
CSA Non-Image Storage (1.3.12.2.1107.5.9.1) with each study, older ultrasound units the retired Ultrasound
Image Storage (1.2.840.10008.5.1.4.1.1.6); pydicom names 12 standard storage classes that pynetdicom lacks. An
SCP that rejects their presentation contexts makes the modality fail the study. So, when an association is
requested, each proposed SOP class that is not listed but is storage-like gets a presentation context in every
syntax the node accepts, and is registered with pynetdicom as a storage class (its dispatch of a C-STORE goes by
the SOP class: an unregistered one gets no response at all).
"""

from __future__ import annotations

import logging
import threading

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import RE_VALID_UID
from pynetdicom import register_uid
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import build_context
from pynetdicom.service_class import StorageServiceClass

from scp import syntaxes

LOGGER = logging.getLogger(__name__)

DICOM_ROOT = "1.2.840.10008."
STORAGE_BRANCH = "1.2.840.10008.5.1.4.1.1."
"""PS3.4 Annex B: the standard's image and object storage SOP classes, including those yet to come."""
MAX_REGISTERED = 1000
"""Unlisted SOP classes one receiving process registers at most: registrations are never freed, and peers
choose the UIDs."""

_registered: set[str] = set()
_lock = threading.Lock()


def is_storage_like(uid: str) -> bool:
    """A private SOP class (a vendor's storage class, as far as a router can tell), one pydicom names a storage
    SOP class, or an unknown one in the standard's storage branch."""
    if len(uid) > 64 or not RE_VALID_UID.fullmatch(uid):
        return False
    if not uid.startswith(DICOM_ROOT):
        return True
    if uid in UID_dictionary:
        name, kind = UID_dictionary[uid][:2]
        return kind == "SOP Class" and name.endswith("Storage")
    return uid.startswith(STORAGE_BRANCH)


def handle_requested(event: Event) -> None:
    """EVT_REQUESTED: support, for this association, each storage-like SOP class it proposes that the node's
    contexts do not list (registered with pynetdicom first)."""
    acceptor = event.assoc.acceptor
    request = event.assoc.requestor.primitive
    if not isinstance(request, A_ASSOCIATE) or event.assoc.is_aborted or event.assoc.is_rejected:
        return  # a connection stopped before its request, or one the access check rejected
    listed = {str(context.abstract_syntax) for context in acceptor.supported_contexts}
    proposed = {str(context.abstract_syntax) for context in request.presentation_context_definition_list}
    added = [
        build_context(uid, list(syntaxes.ACCEPTED))
        for uid in sorted(proposed - listed)
        if is_storage_like(uid) and _register(uid)
    ]
    if added:
        acceptor.supported_contexts = acceptor.supported_contexts + added


def _register(uid: str) -> bool:
    """Register `uid` as a storage SOP class with pynetdicom, once; False past `MAX_REGISTERED`."""
    with _lock:
        if uid in _registered:
            return True
        if len(_registered) >= MAX_REGISTERED:
            LOGGER.warning("not accepting SOP class %s: %d unlisted SOP classes accepted already", uid, MAX_REGISTERED)
            return False
        register_uid(uid, "Unlisted_" + uid.replace(".", "_"), StorageServiceClass)
        _registered.add(uid)
        known = f" ({UID_dictionary[uid][0]})" if uid in UID_dictionary else ""
        LOGGER.info("accepting SOP class %s%s as a storage class", uid, known)
        return True
