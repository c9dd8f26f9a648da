"""The compression core: a Part 10 file in, a re-encoded Part 10 file out, or a reason to pass it through.

Memory stays flat in the instance size: frames are read one at a time from the source file, encoded, verified
and spooled next to the output; the output is then written as a stream (header, encapsulated Pixel Data with a
Basic or Extended Offset Table, fragments, delimiter; PS3.5 A.4). Lossless output keeps the SOP Instance UID
(PS3.2 N.5.2.5.1.1) and every frame is decoded and compared with the source before it is accepted; lossy output
is marked as PS3.3 C.7.6.1.1.5 says.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate, chain
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.encaps import encapsulate
from pydicom.filereader import read_deferred_data_element
from pydicom.filewriter import correct_ambiguous_vr_element, write_dataset, write_file_meta_info
from pydicom.hooks import hooks
from pydicom.pixels import convert_color_space, get_decoder, iter_pixels
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from scp import codecs, syntaxes
from scp.config import CompressSpec
from scp.errors import CompressionError

LOGGER = logging.getLogger(__name__)

_FLOAT_PIXELS = ("FloatPixelData", "DoubleFloatPixelData")
_PIXEL_DATA = 0x7FE00010
_OFFSET_TABLES = (0x7FE00001, 0x7FE00002)  # Extended Offset Table and its Lengths (PS3.3 C.7.6.3.1.8)
_BOT_LIMIT = 2**32 - 1
"""Basic Offset Table offsets are 32-bit: past this, an Extended Offset Table is written instead (PS3.5 A.4)."""
_DEFER = 4096
"""Values larger than this (in bytes) are read from the source file only when written, not held in memory."""
FRAMES_IN_MEMORY = 8 << 20
"""Encoded frames up to this many bytes wait in memory for the header; more go to an unnamed file."""
_DECODED_PHOTOMETRIC = {"YBR_FULL_422": "YBR_FULL", "YBR_ICT": "RGB", "YBR_RCT": "RGB"}
"""What a raw decode yields: subsampling removed, JPEG 2000 component transforms undone by the decoder."""
_UNCOMPRESSED_PREDECESSOR = ("121320", "DCM", "Uncompressed predecessor")
_LOSSY_COMPRESSION = ("113040", "DCM", "Lossy Compression")


@dataclass(frozen=True)
class Result:
    """What happened to one instance. `compressed` False means: forward the source unchanged."""

    compressed: bool
    reason: str
    transfer_syntax: str
    bytes_in: int
    bytes_out: int
    seconds: float
    sop_instance_uid: str = ""
    """SOP Instance UID of the output (new for lossy output unless the rule keeps it)."""
    psnr: float | None = None
    """Lossy only: peak signal-to-noise ratio (dB) of the decoded output against the source, all frames."""
    verify_failed: bool = False
    """True when a lossless result decoded differently from the source and was thrown away."""

    @property
    def ratio(self) -> float:
        return self.bytes_in / self.bytes_out if self.bytes_out else 1.0


class PassThrough(Exception):
    """The instance is forwarded unchanged; the message says why."""


class VerificationError(CompressionError):
    """Decoded lossless output differs from the source pixels."""


@dataclass(frozen=True)
class _Encoded:
    sop_instance_uid: str
    psnr: float | None


def transcode_file(src: Path, dst: Path, spec: CompressSpec) -> Result:
    """Re-encode `src` as `spec` says and write it to `dst`; never raises for a bad image.

    When the result says `compressed=False`, nothing is left at `dst` and the reason says why.
    """
    start = time.perf_counter()
    size_in = 0
    source_syntax = ""
    verify_failed = False
    try:
        size_in = src.stat().st_size
        header = _read_header(src)
        source_syntax = str(header.file_meta.TransferSyntaxUID)
        sop_instance_uid = str(header.get("SOPInstanceUID", ""))
        _check_eligible(header, spec)
        assert spec.syntax is not None
        if spec.syntax.is_compressed:
            encoded = _encode_file(src, header, dst, spec)
        else:
            _write_native(src, header, dst, spec.syntax)
            encoded = _Encoded(sop_instance_uid, None)
        size_out = dst.stat().st_size
        if size_out >= size_in and spec.syntax.is_compressed and not spec.force:
            raise PassThrough(f"the encoded result ({size_out} bytes) is not smaller than the source ({size_in})")
    except PassThrough as exc:
        reason = str(exc)
    except VerificationError as exc:
        verify_failed = True
        reason = str(exc)
        LOGGER.error("%s: %s; forwarding the original", src.name, reason)
    except Exception as exc:  # a bad image must never stop the node: it is forwarded unchanged
        reason = f"{type(exc).__name__}: {exc}"
        LOGGER.warning("%s: cannot re-encode: %s; forwarding the original", src.name, reason)
    else:
        seconds = time.perf_counter() - start
        return Result(
            True, "compressed", str(spec.syntax), size_in, size_out, seconds, encoded.sop_instance_uid, encoded.psnr
        )
    dst.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    return Result(False, reason, source_syntax, size_in, size_in, seconds, verify_failed=verify_failed)


def decompress_file(src: Path, dst: Path, syntax: UID = ExplicitVRLittleEndian) -> None:
    """Write `src` with native pixel data in `syntax` (a little endian one), keeping the SOP Instance UID."""
    header = _read_header(src)
    if header.file_meta.TransferSyntaxUID == syntax:
        shutil.copyfile(src, dst)
        return
    try:
        _write_native(src, header, dst, UID(syntax))
    except Exception:
        dst.unlink(missing_ok=True)
        raise


def _read_header(src: Path) -> Dataset:
    header = pydicom.dcmread(src, defer_size=_DEFER)
    if not header.file_meta.TransferSyntaxUID.is_little_endian:
        _swap_words(header)
    return header


_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(ds: Dataset) -> None:
    """Byte-swap the other-word values of a big endian dataset, which pydicom writes as read (PS3.5 7.3).

    Only those and sequences are decoded: text stays raw (see `_keep_text_as_received`)."""
    for tag in list(ds.keys()):
        if tag == _PIXEL_DATA:  # read frame by frame later; never load it here
            continue
        vr = _vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value:
                _swap_words(item)
        elif (size := _WORD_SIZES.get(vr)) and isinstance(value := ds[tag].value, bytes) and len(value) % size == 0:
            ds[tag].value = np.frombuffer(value, f">u{size}").astype(f"<u{size}").tobytes()


def _vr(ds: Dataset, tag: int) -> str:
    """The VR of an element of `ds`, looked up as pydicom's decoding would (implicit VR, UN), without decoding it."""
    elem = ds.get_item(tag, keep_deferred=True)
    if not isinstance(elem, RawDataElement):
        return str(elem.VR)
    found: dict[str, Any] = {}
    hooks.raw_element_vr(elem, found, ds=ds)
    return str(found["VR"])


_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


def _keep_text_as_received(ds: Dataset, implicit: bool, ancestors: tuple[Dataset, ...] = ()) -> None:
    """Have pydicom write `ds` little endian, with `implicit` VR or not, and every text value as received.

    pydicom decodes the elements it writes in another encoding than read, and those whose reading it deferred, and
    encodes text again in the declared Specific Character Set: bytes invalid in it (Latin-1 under ISO_IR 192, a
    common mislabel) would come out as U+FFFD. Text bytes do not depend on byte order or VR explicitness (PS3.5
    7.3), so where the encoding changes, text elements stay raw, given the VR pydicom would look up where the
    source had none, the others are decoded, and `ds` is declared encoded as it will be written: pydicom then
    writes raw elements as they are, after reading deferred values here in full. A deferred Pixel Data is left
    unread: the streaming writers write it themselves.
    """
    tags = list(ds.keys())
    kept: dict[BaseTag, RawDataElement] = {}
    for tag in tags:
        if isinstance(elem := ds.get_item(tag, keep_deferred=True), RawDataElement) and tag != _PIXEL_DATA:
            kept[tag] = elem
    vrs: dict[BaseTag, str] = {}
    if ds.original_encoding != (implicit, True):
        vrs = {tag: _vr(ds, tag) for tag in kept}
        kept = {tag: raw for tag, raw in kept.items() if vrs[tag] in _TEXT_VRS}
        _decode_elements(ds, [tag for tag in tags if tag not in kept], implicit, (ds, *ancestors))
        ds.set_original_encoding(implicit, True)
    for tag, raw in kept.items():  # last: looking up a private element's VR decodes its private creator
        # ds[tag] = ... would decode a private element
        ds._dict[tag] = _read_deferred(ds, raw)._replace(VR=raw.VR or vrs.get(tag))


def _decode_elements(ds: Dataset, tags: list[BaseTag], implicit: bool, ancestors: tuple[Dataset, ...]) -> None:
    """Decode these elements of `ds` and resolve their ambiguous VRs as pydicom's writer would (PS3.5 A.1 c); a
    sequence's items are prepared by `_keep_text_as_received` in turn."""
    for tag in tags:
        if tag == _PIXEL_DATA and ds.get_item(tag, keep_deferred=True).value is None:
            continue
        correct_ambiguous_vr_element(ds[tag], ds, True, list(ancestors))
        if (elem := ds[tag]).VR == "SQ":
            for item in elem.value:
                _keep_text_as_received(item, implicit, ancestors)


def _read_deferred(ds: Dataset, raw: RawDataElement) -> RawDataElement:
    """`raw` with its value read where pydicom deferred it (from the file, or the inflated data set of a deflated
    one, as pydicom would), but not decoded."""
    if raw.value is not None or not raw.length or not isinstance(ds, FileDataset):
        return raw
    source = ds.filename if ds.buffer is None else cast(BinaryIO, ds.buffer)
    assert source is not None  # _read_header reads a file
    return read_deferred_data_element(ds.fileobj_type, source, ds.timestamp, raw)


def _check_eligible(ds: Dataset, spec: CompressSpec) -> None:
    """Raise PassThrough when this instance is to be forwarded unchanged."""
    source = UID(ds.file_meta.TransferSyntaxUID)
    target = spec.syntax
    if target is None:
        raise PassThrough("the rule keeps the original encoding")
    if "PixelData" not in ds:
        if any(keyword in ds for keyword in _FLOAT_PIXELS):
            raise PassThrough("float pixel data cannot be compressed by any codec in DICOM")
        raise PassThrough("no pixel data")
    if source == target:
        raise PassThrough(f"already encoded as {target.name}")
    if source not in syntaxes.BY_UID:
        raise PassThrough(f"the source syntax {source.name} is not one the node re-encodes")
    source_lossy = not syntaxes.is_lossless(source) or ds.get("LossyImageCompression") == "01"
    if source_lossy and syntaxes.is_lossless(target) and target.is_compressed and not spec.allow_lossy_to_lossless:
        raise PassThrough("the source was lossy compressed; a lossless re-encode would only grow it")
    if ds.get("BitsAllocated") == 1:
        raise PassThrough("1-bit pixel data is not compressed")
    if target.is_compressed:
        codec = codecs.get(target)
        if not codec.available:
            raise PassThrough(codec.unavailable_reason())


def _source_frames(src: Path, header: Dataset) -> tuple[str, Iterator[np.ndarray]]:
    """The photometric interpretation of the decoded frames, and the frames in native byte order.

    Frames are decoded raw (no colour conversion) and native values are kept as stored, even where they lie
    outside Bits Stored: what the codec loses there, verification catches. One frame at a time from the file; a
    deflated source has to be inflated whole first.
    """
    if (native := _native_frames(src, header)) is not None:
        return str(header.PhotometricInterpretation), native
    if header.file_meta.TransferSyntaxUID.is_deflated:
        frames = iter_pixels(pydicom.dcmread(src), raw=True, correct_unused_bits=False)
        decoded = Dataset()
        decoded.PhotometricInterpretation = header.PhotometricInterpretation
    else:
        decoded = Dataset()
        frames = iter_pixels(src, ds_out=decoded, raw=True, correct_unused_bits=False)
    first = next(frames)  # ds_out is filled in once decoding starts
    photometric = str(decoded.get("PhotometricInterpretation", header.PhotometricInterpretation))
    photometric = _DECODED_PHOTOMETRIC.get(photometric, photometric)
    return photometric, (f.astype(f.dtype.newbyteorder("="), copy=False) for f in chain([first], frames))


def _check_pixel_layout(src: Path, header: Dataset) -> None:
    """Raise PassThrough for Pixel Data that reading frame by frame would get wrong; once per instance, before
    the frames are read (by each encoder tried in turn)."""
    _check_frame_count(src, header)
    _check_nested_pixel_data(header)


def _check_frame_count(src: Path, header: Dataset) -> None:
    """Raise PassThrough when Pixel Data holds more frames than Number of Frames says (decoding only those would
    drop the rest of the image without a word), or fewer. Native data shorter than a frame past the last one is
    padding (pydicom's MR_small_padded.dcm), which decoders ignore; an encapsulated source's offset table, when
    it has one, gives its frame count."""
    element = header.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(element, RawDataElement) or header.file_meta.TransferSyntaxUID.is_deflated:
        return
    value = header.get("NumberOfFrames")
    nframes = 1 if value in (None, "") else int(value)
    if nframes < 1:
        raise PassThrough(f"Number of Frames is {nframes}")
    if element.length != syntaxes.UNDEFINED_LENGTH:
        expected = get_expected_length(header, unit="bytes")
        excess = element.length - expected
        if excess < 0 or (excess >= expected // nframes and excess != expected % 2):  # a pad byte may be a frame
            raise PassThrough(
                f"Pixel Data holds {element.length} bytes where {nframes} frame(s) of this size take {expected}"
            )
        return
    tables = [len(header.ExtendedOffsetTable) // 8] if "ExtendedOffsetTable" in header else []
    tables.append(_basic_offset_table_entries(src, element))
    if any(entries not in (0, nframes) for entries in tables):
        raise PassThrough(f"the offset table lists {max(tables)} frames where Number of Frames says {nframes}")


def _check_nested_pixel_data(ds: Dataset) -> None:
    """Raise PassThrough when an item (an Icon Image Sequence's, say) holds encapsulated Pixel Data: it is in the
    source's syntax, and written unchanged under another it would be mislabelled and break the whole file."""
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        _check_items(ds)


def _check_items(ds: Dataset) -> None:
    """Only sequences are parsed on the way: every other element stays as read."""
    for tag in list(ds.keys()):  # tags: iterating a Dataset would parse every element
        if tag == _PIXEL_DATA or ds.get_item(tag, keep_deferred=True).VR != "SQ":
            continue
        for item in ds[tag].value:
            nested = item.get_item(_PIXEL_DATA, keep_deferred=True)
            if nested is not None and _undefined_length(nested):
                raise PassThrough(f"{ds[tag].name} holds compressed pixel data of its own")
            _check_items(item)


def _undefined_length(element: RawDataElement | pydicom.DataElement) -> bool:
    if isinstance(element, RawDataElement):
        return element.length == syntaxes.UNDEFINED_LENGTH
    return element.is_undefined_length


def _basic_offset_table_entries(src: Path, element: RawDataElement) -> int:
    """How many offsets the Basic Offset Table (the first item of encapsulated Pixel Data) holds."""
    if element.value is not None:
        item = element.value[:8]
    else:
        with src.open("rb") as file:
            file.seek(element.value_tell)
            item = file.read(8)
    if len(item) < 8:
        raise CompressionError("encapsulated Pixel Data ends before its offset table")
    return int(struct.unpack("<4xI", item)[0]) // 4


_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_NATIVE_DTYPES = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2", (32, 0): "<u4", (32, 1): "<i4"}


def _native_frames(src: Path, header: Dataset) -> Iterator[np.ndarray] | None:
    """The frames of little endian native Pixel Data read straight from the file, as pydicom's raw decode gives
    them (stored values, interleaved samples); None where that decode has more to do (subsampled YBR, big endian,
    deflated, encapsulated, or a value shorter than Number of Frames says, which it reports)."""
    element = header.get_item(_PIXEL_DATA, keep_deferred=True)
    if (
        header.file_meta.TransferSyntaxUID not in _NATIVE_SYNTAXES
        or not isinstance(element, RawDataElement)
        or element.length == syntaxes.UNDEFINED_LENGTH
        or "422" in str(header.get("PhotometricInterpretation", ""))
        or not header.get("Rows")
        or not header.get("Columns")
    ):
        return None
    rows, columns, samples = int(header.Rows), int(header.Columns), int(header.get("SamplesPerPixel", 1))
    name = _NATIVE_DTYPES.get((header.get("BitsAllocated"), header.get("PixelRepresentation")))
    nframes = int(header.get("NumberOfFrames") or 1)
    if name is None or nframes < 1:
        return None
    dtype = np.dtype(name)
    if element.length < nframes * rows * columns * samples * dtype.itemsize:
        return None
    planar = samples > 1 and header.get("PlanarConfiguration") == 1
    shape = (samples, rows, columns) if planar else (rows, columns, samples) if samples > 1 else (rows, columns)
    return _read_frames(src, element, nframes, dtype, shape, planar)


def _read_frames(
    src: Path, element: RawDataElement, nframes: int, dtype: np.dtype[Any], shape: tuple[int, ...], planar: bool
) -> Iterator[np.ndarray]:
    """Frame by frame from the file, or from the value pydicom read already (values below its defer size)."""
    size = math.prod(shape) * dtype.itemsize
    with src.open("rb") if element.value is None else io.BytesIO(element.value) as file:
        file.seek(element.value_tell if element.value is None else 0)
        for index in range(nframes):
            buffer = bytearray(size)
            if file.readinto(buffer) != size:
                raise CompressionError(f"{src.name}: the file ends in frame {index + 1} of {nframes}")
            frame = np.frombuffer(buffer, dtype).reshape(shape)
            yield frame.transpose(1, 2, 0) if planar else frame


def _frame_info(header: Dataset, photometric: str) -> codecs.FrameInfo:
    return codecs.FrameInfo(
        rows=int(header.Rows),
        columns=int(header.Columns),
        samples_per_pixel=int(header.SamplesPerPixel),
        bits_allocated=int(header.BitsAllocated),
        bits_stored=int(header.BitsStored),
        pixel_representation=int(header.PixelRepresentation),
        photometric_interpretation=photometric,
    )


def _encode_file(src: Path, header: Dataset, dst: Path, spec: CompressSpec) -> _Encoded:
    """Encode every frame with the first plugin that encodes them all, then assemble `dst`.

    The frames of one instance never mix plugins: their codestreams may differ in ways a decoder of the whole
    instance does not expect (pyjpegls writes Bits Stored as the JPEG-LS sample precision, imagecodecs the
    container's size, and pydicom decides how to read signed samples once for all frames).
    """
    assert spec.syntax is not None
    _check_pixel_layout(src, header)
    return codecs.get(spec.syntax).with_first_plugin_that_works(
        lambda plugin: _encode_with(plugin, src, header, dst, spec)
    )


def _encode_with(plugin: codecs.Plugin, src: Path, header: Dataset, dst: Path, spec: CompressSpec) -> _Encoded:
    """Encode every frame into a spool next to `dst`, verifying as it goes, then assemble `dst`."""
    assert spec.syntax is not None
    target = spec.syntax
    codec = codecs.get(target)
    lossless = syntaxes.is_lossless(target)
    decoded_photometric, frames = _source_frames(src, header)
    if not lossless and decoded_photometric == "YBR_FULL":
        # Lossy output loses more than the rounding of the conversion anyway; RGB is the form every lossy
        # profile and IOD accepts, and JPEG 2000 gives it the irreversible component transform (YBR_ICT).
        frames = (convert_color_space(frame, "YBR_FULL", "RGB") for frame in frames)
        decoded_photometric = "RGB"
    info = _frame_info(header, codecs.encoded_photometric(target, decoded_photometric))
    if problem := codec.check(info):
        raise PassThrough(problem)
    body = _unchanged_body(src, header, info) if lossless else None
    options = spec.encoder_options()
    decoder = get_decoder(target)
    verify_plugin = codec.verify_plugin()
    squared_error = 0.0
    samples = 0
    lengths: list[int] = []
    # Small outputs stay in memory; past FRAMES_IN_MEMORY the frames go to an unnamed file next to dst.
    with tempfile.SpooledTemporaryFile(FRAMES_IN_MEMORY, dir=str(dst.parent)) as fragments:
        for index, frame in enumerate(frames):
            encoded = codecs.encode_frame(plugin, frame, info, options)
            if not lossless or spec.verify:
                decoded = _decode(decoder, encoded, info, index, verify_plugin)
                if lossless and not np.array_equal(decoded, frame):
                    raise VerificationError(
                        f"lossless verification failed: frame {index} decoded from {target.name} differs "
                        "from the source pixels"
                    )
                if not lossless:
                    _check_within_bits_stored(decoded, info, index)
                    _check_max_error(decoded, frame, options.get("jls_error"), index)
                    squared_error += float(np.sum((decoded.astype(np.float64) - frame) ** 2))
                    samples += frame.size
            fragments.write(encoded + b"\0" * (len(encoded) % 2))  # fragments have even length (PS3.5 A.4)
            lengths.append(len(encoded) + len(encoded) % 2)
        _prepare_header(header, target, info, len(lengths), src)
        psnr = None
        if not lossless:
            _mark_lossy(header, spec, len(lengths) * info.frame_bytes / sum(lengths))
            peak = float(2**info.bits_stored - 1)
            mse = squared_error / max(samples, 1)
            psnr = math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)
            if psnr < spec.min_psnr:
                raise PassThrough(f"the lossy result's PSNR {psnr:.1f} dB is below min_psnr {spec.min_psnr:g} dB")
        fragments.seek(0)
        _write_encapsulated(dst, header, fragments, lengths, body)
    return _Encoded(str(header.SOPInstanceUID), psnr)


def _decode(decoder: Decoder, encoded: bytes, info: codecs.FrameInfo, index: int, plugin: str = "") -> np.ndarray:
    """Decode one frame just encoded, as an archive would (pydicom's decoders, no colour conversion).

    `plugin` names the pydicom decoding plugin (the codec's verification decoder); "" lets pydicom choose.
    """
    try:
        # pydicom annotates as_array's **kwargs as DecodeOptions where it means Unpack[DecodeOptions]
        decoded, _ = decoder.as_array(
            encapsulate([encoded]),
            as_rgb=False,  # type: ignore[arg-type]
            decoding_plugin=plugin,
            **info.pixel_keywords(),
        )
    except Exception as exc:
        raise codecs.PluginFailed(f"frame {index} cannot be decoded back from {decoder.UID.name}: {exc}") from exc
    return decoded


def _check_within_bits_stored(decoded: np.ndarray, info: codecs.FrameInfo, index: int) -> None:
    """Raise PluginFailed when lossy output decodes to values Bits Stored cannot hold.

    A codestream declaring the container's precision (imagecodecs' OpenJPH and CharLS) lets the codec's error
    overshoot the range near its ends: a reader taking the low Bits Stored bits would turn black padding white
    and white metal black, while the error itself looks small. Another plugin may declare Bits Stored instead.
    """
    low, high = info.stored_range
    if decoded.size and (int(decoded.min()) < low or int(decoded.max()) > high):
        raise codecs.PluginFailed(
            f"frame {index} decodes to values in [{decoded.min()}, {decoded.max()}], outside the range Bits Stored "
            f"{info.bits_stored} allows ([{low}, {high}])"
        )


def _check_max_error(decoded: np.ndarray, frame: np.ndarray, bound: int | None, index: int) -> None:
    """Raise PluginFailed when near-lossless output breaks its promise: no sample off by more than `bound`.

    A codec taking signed samples for unsigned ones (imagecodecs' CharLS) wraps the error of the range's ends
    around: -32768 comes back as 32767. A handful of such samples keeps the PSNR high, so only this catches it.
    """
    if bound is None or not decoded.size:
        return
    error = int(np.max(np.abs(decoded.astype(np.int64) - frame.astype(np.int64))))
    if error > bound:
        raise codecs.PluginFailed(f"frame {index} decodes with a sample off by {error}, more than jls_error {bound}")


def _pixel_data_bytes(src: Path, header: Dataset) -> int:
    """The length of the source's Pixel Data value, encapsulated or native (the file's size if it cannot tell)."""
    element = header.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.value is not None:
        return len(element.value)
    if isinstance(element, RawDataElement) and element.value_tell:
        return src.stat().st_size - element.value_tell
    return src.stat().st_size


def _prepare_header(header: Dataset, target: UID, info: codecs.FrameInfo, nframes: int, src: Path) -> None:
    """Set what the target syntax dictates (PS3.5 8.2), and keep a lossy source (the file `src`) marked as lossy."""
    _carry_lossy_history(header, src, nframes * info.frame_bytes)
    header.file_meta.TransferSyntaxUID = target
    header.PhotometricInterpretation = info.photometric_interpretation
    if info.samples_per_pixel > 1:
        header.PlanarConfiguration = 0
    for tag in _OFFSET_TABLES:
        if tag in header:
            del header[tag]


def _carry_lossy_history(header: Dataset, src: Path, native_bytes: int) -> None:
    """An image once lossy compressed stays marked so, whatever it is written as next (PS3.3 C.7.6.1.1.5).

    A source (the file `src`) in a lossy syntax whose header does not say so gets Lossy Image Compression 01, and
    its own step (method, and the ratio of `native_bytes` to the source's Pixel Data) is recorded, as DCMTK and
    GDCM do when they decompress it. A header saying 00 is believed only where the syntax can also carry a
    reversible stream.
    """
    syntax = syntaxes.BY_UID.get(UID(header.file_meta.TransferSyntaxUID))
    ratios, methods = _paired_history(header, syntax)
    flag = header.get("LossyImageCompression")
    if syntax is None or syntax.lossless or flag == "01" or (flag == "00" and syntax.may_be_reversible):
        return
    header.LossyImageCompression = "01"
    approximate_ratio = native_bytes / max(_pixel_data_bytes(src, header), 1)  # read only for a lossy source
    header.LossyImageCompressionRatio = [*ratios, f"{approximate_ratio:.4g}"]
    header.LossyImageCompressionMethod = [*methods, syntax.lossy_method]


def _paired_history(header: Dataset, syntax: syntaxes.Syntax | None) -> tuple[list[Any], list[Any]]:
    """Lossy Image Compression Ratio and Method as lists of one length (their values go pairwise), so that a
    step appended to both stays a pair. Many lossy files give a ratio and no method: the method missing is the
    source syntax's own when it is lossy, else unknown (an empty value); a ratio missing is unknown.
    """
    ratios, methods = _values(header, "LossyImageCompressionRatio"), _values(header, "LossyImageCompressionMethod")
    if len(ratios) != len(methods):
        known = syntax.lossy_method if syntax is not None and syntax.lossy_method else ""
        methods += [known] * (len(ratios) - len(methods))
        ratios += [""] * (len(methods) - len(ratios))
        header.LossyImageCompressionRatio, header.LossyImageCompressionMethod = ratios, methods
    return ratios, methods


def _mark_lossy(header: Dataset, spec: CompressSpec, ratio: float) -> None:
    """Lossy Image Compression, Ratio and Method, Image Type DERIVED, a new UID (PS3.3 C.7.6.1.1.5).

    The new UID is derived from the source's and the encoding (syntax and options): an instance processed again
    (after a crash, or a failed commit retried) yields the same image under the same UID, which an archive takes
    as a duplicate, not as a second image.
    """
    assert spec.syntax is not None
    method = syntaxes.BY_UID[spec.syntax].lossy_method
    assert method is not None
    header.LossyImageCompression = "01"
    ratios, methods = _paired_history(header, None)  # the source syntax's method is in already (_prepare_header)
    header.LossyImageCompressionRatio = [*ratios, f"{ratio:.4g}"]
    header.LossyImageCompressionMethod = [*methods, method]
    if "ImageType" in header:
        header.ImageType = ["DERIVED", *_values(header, "ImageType")[1:]]
    description = f"Lossy compression {method} ratio {ratio:.4g}:1"
    previous = str(header.get("DerivationDescription", ""))
    header.DerivationDescription = (f"{previous}; {description}" if previous else description)[:1024]
    earlier = [
        item for item in header.get("DerivationCodeSequence", []) if item.get("CodeValue") != _LOSSY_COMPRESSION[0]
    ]
    header.DerivationCodeSequence = [*earlier, _code(*_LOSSY_COMPRESSION)]
    if spec.keep_sop_instance_uid:
        return
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [_code(*_UNCOMPRESSED_PREDECESSOR)]
    header.SourceImageSequence = Sequence([*header.get("SourceImageSequence", []), reference])
    encoding = [str(spec.syntax), *(f"{key}={value}" for key, value in sorted(spec.encoder_options().items()))]
    header.SOPInstanceUID = generate_uid(entropy_srcs=[str(header.SOPInstanceUID), *encoding])
    header.file_meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID


def _values(ds: Dataset, keyword: str) -> list[Any]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | pydicom.multival.MultiValue) else [value]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _split_trailing(header: Dataset) -> Dataset:
    """Remove and return the elements after Pixel Data (padding, signatures), written after it again: as read, in
    the header's encoding and character set."""
    trailing = Dataset(parent_encoding=header._character_set)
    implicit, little = header.original_encoding
    trailing.set_original_encoding(implicit, little, header.original_character_set)
    tags = list(header.keys())
    for tag in [t for t in tags if t >= _PIXEL_DATA]:
        elem = header.get_item(tag, keep_deferred=True)
        if tag > _PIXEL_DATA:  # ds[tag] = ... would decode a private element
            trailing._dict[tag] = _read_deferred(header, elem) if isinstance(elem, RawDataElement) else elem
        del header[tag]
    return trailing


@dataclass(frozen=True)
class _Span:
    path: Path
    start: int
    end: int


_LONG_HEADER_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
"""Explicit VRs whose element header is 12 bytes long, not 8 (PS3.5 7.1.2)."""


def _unchanged_body(src: Path, header: Dataset, info: codecs.FrameInfo) -> _Span | None:
    """Where the source's data set lies in `src` (from after its file meta to Pixel Data) when the output's is the
    same bytes: an explicit VR little endian source none of whose elements the target syntax changes (PS3.5 8.2:
    Photometric Interpretation, Planar Configuration, the offset tables). None otherwise, or when the offsets
    pydicom saw do not add up."""
    if (
        header.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
        or header.get("PhotometricInterpretation") != info.photometric_interpretation
        or (info.samples_per_pixel > 1 and header.get("PlanarConfiguration") != 0)
        or any(tag in header for tag in _OFFSET_TABLES)
        or not len(header)
    ):
        return None
    pixel = header.get_item(_PIXEL_DATA, keep_deferred=True)
    first = header.get_item(min(header.keys()), keep_deferred=True)
    group_length = header.file_meta.get("FileMetaInformationGroupLength")
    group_length_element = header.file_meta.get_item(0x00020000, keep_deferred=True)
    if not isinstance(pixel, RawDataElement) or pixel.VR not in ("OB", "OW") or group_length is None:
        return None
    meta_end = _value_offset(group_length_element) + 4 + int(group_length)
    start = _value_offset(first) - (12 if first.VR in _LONG_HEADER_VRS else 8)
    if start != meta_end or not start < pixel.value_tell - 12:
        return None
    return _Span(src, start, pixel.value_tell - 12)


def _value_offset(element: object) -> int:
    """Where an element's value starts in the file it was read from (-1 when unknown, e.g. an element built here)."""
    offset = element.value_tell if isinstance(element, RawDataElement) else getattr(element, "file_tell", None)
    return -1 if offset is None else int(offset)


def _write_file_meta(out: BinaryIO, header: Dataset) -> None:
    """Preamble, DICM and the file meta information, as pydicom's dcmwrite writes them (PS3.10 7.1)."""
    meta = header.file_meta
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        if value := header.get(keyword):
            setattr(meta, meta_keyword, value)
    out.write((header.preamble or b"\0" * 128) + b"DICM")
    fp = pydicom.filebase.DicomFileLike(out)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)


def _write_encapsulated(
    dst: Path, header: Dataset, fragments: IO[bytes], lengths: list[int], body: _Span | None = None
) -> None:
    """Header, then encapsulated Pixel Data: offset table item, one fragment per frame, delimiter (PS3.5 A.4).

    The header's data set is copied from `body` when given, byte for byte, instead of written by pydicom."""
    trailing = _split_trailing(header)
    offsets = list(accumulate((8 + n for n in lengths[:-1]), initial=0))  # each fragment's item header is 8 bytes
    extended = offsets[-1] + 8 + lengths[-1] > _BOT_LIMIT
    if extended:  # PS3.3 C.7.6.3.1.8: the Basic Offset Table is then empty
        body = None  # the header gains elements: pydicom writes it
        header.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
        header.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)
        table = b""
    else:
        table = struct.pack(f"<{len(offsets)}I", *offsets)
    with dst.open("wb") as out:
        if body is None:
            _keep_text_as_received(header, implicit=False)
            pydicom.dcmwrite(out, header, enforce_file_format=True)
        else:
            _write_file_meta(out, header)
            with body.path.open("rb") as source:
                source.seek(body.start)
                _copy(source, out, body.end - body.start)
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, syntaxes.UNDEFINED_LENGTH))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(table)) + table)
        for length in lengths:
            out.write(struct.pack("<HHI", 0xFFFE, 0xE000, length))
            _copy(fragments, out, length)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        _write_trailing(out, trailing, implicit=False)


def _copy(src: IO[bytes], dst: BinaryIO, length: int, chunk: int = 1 << 20) -> None:
    while length:
        data = src.read(min(chunk, length))
        if not data:
            raise CompressionError("the frame spool ended early")
        dst.write(data)
        length -= len(data)


def _write_trailing(out: BinaryIO, trailing: Dataset, implicit: bool) -> None:
    if len(trailing):
        _keep_text_as_received(trailing, implicit)
        fp = pydicom.filebase.DicomFileLike(out)
        fp.is_little_endian = True
        fp.is_implicit_VR = implicit
        write_dataset(fp, trailing)


def _write_native(src: Path, header: Dataset, dst: Path, syntax: UID) -> None:
    """Write every frame uncompressed, little endian, interleaved (PS3.5 8.1.1, A.1, A.2)."""
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise CompressionError(f"cannot write native pixel data as {syntax.name}; use a little endian syntax")
    if header.get("BitsAllocated") == 1 or "PixelData" not in header:
        _write_native_whole(src, dst, syntax)
        return
    _check_pixel_layout(src, header)
    photometric, frames = _source_frames(src, header)
    info = _frame_info(header, photometric)
    nframes = int(header.get("NumberOfFrames") or 1)
    frame_bytes = info.frame_bytes
    length = nframes * frame_bytes
    _prepare_header(header, syntax, info, nframes, src)
    trailing = _split_trailing(header)
    implicit = syntax == ImplicitVRLittleEndian
    with dst.open("wb") as out:
        _keep_text_as_received(header, implicit)
        pydicom.dcmwrite(out, header, enforce_file_format=True)
        if implicit:
            out.write(struct.pack("<HHI", 0x7FE0, 0x0010, length + length % 2))
        else:
            vr = b"OW" if info.bits_allocated > 8 else b"OB"
            out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + length % 2))
        written = 0
        for frame in frames:
            data = frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(data) != frame_bytes:
                raise CompressionError(f"a decoded frame has {len(data)} bytes, expected {frame_bytes}")
            out.write(data)
            written += len(data)
        if written != length:
            raise CompressionError(f"decoded {written // frame_bytes} frames, Number of Frames says {nframes}")
        out.write(b"\0" * (length % 2))
        _write_trailing(out, trailing, implicit)


def _write_native_whole(src: Path, dst: Path, syntax: UID) -> None:
    """Rewrite with pydicom as a whole: bit-packed (1-bit) data, which is small, and datasets without encapsulable
    Pixel Data (none at all, or Float/Double Float Pixel Data, which are never compressed), which only change
    their encoding."""
    ds = pydicom.dcmread(src)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = syntax
    _keep_text_as_received(ds, syntax == ImplicitVRLittleEndian)
    ds.save_as(dst, enforce_file_format=True)
