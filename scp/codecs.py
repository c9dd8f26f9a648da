"""The encoder registry: one `Codec` per target transfer syntax, each a list of plugins tried in order.

pydicom's encoders come first, except for JPEG-LS: CharLS through its C API in imagecodecs' build (scp/charls.py)
writes pydicom's codestream, faster. imagecodecs adds HTJ2K (pydicom 3 decodes it but has no encoder) and stands
in for pyjpegls and openjpeg on the tiny or odd-sized images they reject. A plugin whose package is missing stays
in the table with the names of what is missing (STYLE rule 2), so `check-config` can say what to install.
Which pixel descriptions a syntax may carry is data: pydicom's ENCODING_PROFILES (PS3.5 8.2), plus HTJ2K's,
which PS3.5 8.2.14 makes the same as JPEG 2000's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from scp import charls
from scp.errors import CompressionError

# (Photometric Interpretation after encoding, Samples per Pixel, Pixel Representation, Bits Allocated,
# Bits Stored), as pydicom's ENCODING_PROFILES.
Profile = tuple[str, int, Iterable[int], Iterable[int], Iterable[int]]


@dataclass(frozen=True)
class FrameInfo:
    """How one frame is described in the output dataset (the Image Pixel module, PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    """The value *after* encoding, e.g. YBR_RCT for RGB pixels that get the reversible colour transform."""

    @property
    def frame_bytes(self) -> int:
        """The size of one frame uncompressed (Bits Allocated 8 or more)."""
        return self.rows * self.columns * self.samples_per_pixel * self.bits_allocated // 8

    @property
    def stored_range(self) -> tuple[int, int]:
        """The least and greatest sample value Bits Stored can hold."""
        return charls.stored_range(self.bits_stored, bool(self.pixel_representation))

    def pixel_keywords(self) -> dict[str, Any]:
        """The description as pydicom's encoders and decoders take it, for one frame."""
        keywords: dict[str, Any] = {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "number_of_frames": 1,
        }
        if self.samples_per_pixel > 1:
            keywords["planar_configuration"] = 0
        return keywords


T = TypeVar("T")

EncodeFunction = Callable[[np.ndarray, FrameInfo, Mapping[str, Any]], bytes]
"""Encode one frame, shaped (rows, columns[, samples]) in native byte order, into one codestream."""


@dataclass(frozen=True)
class Plugin:
    """One way to encode a syntax, and the importable modules it needs."""

    name: str
    encode: EncodeFunction
    modules: tuple[str, ...] = ()
    available_check: Callable[[], bool] | None = None
    requires: tuple[str, ...] = ()
    """What to install when `available_check` fails (pydicom's own list of missing dependencies)."""

    def missing(self) -> list[str]:
        """The modules this plugin needs that are not installed (empty when it can run)."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if not missing and self.available_check is not None and not self.available_check():
            missing = list(self.requires or self.modules) or [self.name]
        return missing


@dataclass
class Codec:
    """Everything the node knows about encoding one transfer syntax."""

    syntax: UID
    profiles: list[Profile]
    options: frozenset[str] = frozenset()
    """The codec parameters (config keys) this syntax takes."""
    plugins: list[Plugin] = field(default_factory=list)
    verify_with: tuple[str, ...] = ()
    """pydicom decoding plugins to check lossless output with, fastest first; pydicom's default when none is
    available. Each decodes the bytes actually written; for JPEG-LS that is CharLS again (the encoder's library,
    chosen for speed: ~4x pylibjpeg-libjpeg), for HTJ2K OpenJPEG (an implementation other than the encoder's)."""
    limit: Callable[[FrameInfo], str | None] | None = None
    """Why the libraries cannot code pixels the standard allows (see `_openjpeg_limit`), or None if they can."""

    @property
    def available(self) -> bool:
        return any(not p.missing() for p in self.plugins)

    def unavailable_reason(self) -> str:
        """Why nothing can encode this syntax, naming what to install."""
        wants = "; ".join(f"{p.name} needs {', '.join(p.missing())}" for p in self.plugins)
        return f"no encoder for {self.syntax.name} is available ({wants or 'no plugin registered'})"

    def verify_plugin(self) -> str:
        """The pydicom decoding plugin that verifies this syntax's output ("" for pydicom's default)."""
        available = get_decoder(self.syntax)._available
        return next((name for name in self.verify_with if name in available), "")

    def check(self, info: FrameInfo) -> str | None:
        """Why this syntax cannot carry pixels described by `info` (PS3.5 8.2, then `limit`), or None if it can."""
        for pi, samples, representations, allocated, stored in self.profiles:
            if (
                info.photometric_interpretation == pi
                and info.samples_per_pixel == samples
                and info.pixel_representation in representations
                and info.bits_allocated in allocated
                and info.bits_stored in stored
            ):
                return self.limit(info) if self.limit else None
        sign = "signed" if info.pixel_representation else "unsigned"
        return (
            f"{self.syntax.name} cannot carry {info.photometric_interpretation}, {info.samples_per_pixel} "
            f"sample(s), {sign}, Bits Allocated {info.bits_allocated}, Bits Stored {info.bits_stored} (PS3.5 8.2)"
        )

    def encode(self, frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
        """Encode one frame with the first plugin that succeeds; raise CompressionError naming every failure."""
        return self.with_first_plugin_that_works(lambda plugin: encode_frame(plugin, frame, info, options))

    def with_first_plugin_that_works(self, attempt: Callable[[Plugin], T]) -> T:
        """`attempt(plugin)` with each available plugin in turn until one does not raise PluginFailed.

        Raises CompressionError naming every failure (and what to install for the plugins that are missing).
        """
        failures = []
        for plugin in self.plugins:
            if missing := plugin.missing():
                failures.append(f"{plugin.name}: needs {', '.join(missing)}")
                continue
            try:
                return attempt(plugin)
            except PluginFailed as exc:
                failures.append(f"{plugin.name}: {exc}")
        raise CompressionError(f"{self.syntax.name} encoding failed: " + " | ".join(failures))


class PluginFailed(CompressionError):
    """A plugin could not encode a frame; another plugin may."""


def encode_frame(plugin: Plugin, frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
    """One frame's codestream from `plugin`; PluginFailed says why it could not."""
    try:
        return bytes(plugin.encode(frame, info, options))
    except Exception as exc:  # each plugin fails on its own terms; the next one may not
        raise PluginFailed(f"{type(exc).__name__}: {exc}".strip()) from exc


def _pydicom_plugins(syntax: UID, order: tuple[str, ...] = ()) -> list[Plugin]:
    """pydicom's encoder for `syntax`, one Plugin per pydicom plugin, those named in `order` first."""
    encoder = get_encoder(syntax)
    names = [*order, *(n for n in [*encoder._available, *encoder._unavailable] if n not in order)]

    def plugin(name: str) -> Plugin:
        def encode(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
            return encoder.encode(frame, encoding_plugin=name, **info.pixel_keywords(), **options)

        requires = tuple(encoder._unavailable.get(name, ()))
        return Plugin(f"pydicom/{name}", encode, (), lambda: name in encoder._available, requires)

    return [plugin(name) for name in names]


def _not_narrowed(plugins: list[Plugin]) -> list[Plugin]:
    """pydicom's JPEG-LS encoders declare Bits Stored as the sample precision: for 16-bit words holding at most 8
    bits, decoders other than pydicom's then make 8-bit samples (DCMTK refuses the frame, GDCM aborts); for 8-bit
    words holding fewer than 8, DCMTK refuses it. Those frames are left to the plugins after them."""

    def refusing(plugin: Plugin) -> Plugin:
        def encode(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
            if info.bits_stored < (9 if info.bits_allocated > 8 else 8):
                raise ValueError(
                    f"it would declare {info.bits_stored}-bit samples for Bits Allocated {info.bits_allocated}"
                )
            return plugin.encode(frame, info, options)

        return replace(plugin, encode=encode)

    return [refusing(plugin) for plugin in plugins]


def _bytewise(plugins: list[Plugin]) -> list[Plugin]:
    """RLE codes each byte of a sample as a segment of its own (PS3.5 G.2), whatever Bits Stored says; pydicom's
    RLE encoders given 16-bit words holding at most 8 bits write one segment too few (pylibjpeg-rle refuses,
    pydicom's own writes half-length segments that no decoder reads). They are told every bit is stored."""

    def whole_words(plugin: Plugin) -> Plugin:
        def encode(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
            return plugin.encode(frame, replace(info, bits_stored=info.bits_allocated), options)

        return replace(plugin, encode=encode)

    return [whole_words(plugin) for plugin in plugins]


def _imagecodecs_jpegls(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
    import imagecodecs

    near = options.get("jls_error", 0) or None
    return bytes(imagecodecs.jpegls_encode(charls.unsigned_samples(frame), level=near))


def _charls_jpegls(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
    return charls.encode(frame, info.bits_stored, options.get("jls_error", 0))


def _charls() -> Plugin:
    """CharLS in imagecodecs' build, declaring Bits Stored as pydicom's encoder does (scp/charls.py)."""
    return Plugin("CharLS via imagecodecs' library", _charls_jpegls, ("imagecodecs",), charls.available)


def _imagecodecs_jpeg2k(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
    """OpenJPEG through imagecodecs, with as many resolution levels as the image is big enough for."""
    import imagecodecs

    psnr = None
    if "j2k_cr" in options or len(options.get("j2k_psnr", [])) > 1:
        raise ValueError("this plugin takes a single j2k_psnr quality layer, not j2k_cr or several layers")
    if "j2k_psnr" in options:
        psnr = options["j2k_psnr"][0]
    resolutions = max(1, min(6, int(np.log2(max(1, min(info.rows, info.columns)))) + 1))
    return bytes(
        imagecodecs.jpeg2k_encode(
            np.ascontiguousarray(frame),
            level=psnr,
            codecformat="J2K",
            reversible=psnr is None,
            bitspersample=info.bits_stored,
            resolutions=resolutions,
            mct=info.photometric_interpretation in ("YBR_RCT", "YBR_ICT"),
        )
    )


DEFAULT_HTJ2K_QSTEP = 0.005


def _imagecodecs_htj2k(*, rpcl: bool = False, lossy: bool = False) -> EncodeFunction:
    def encode(frame: np.ndarray, info: FrameInfo, options: Mapping[str, Any]) -> bytes:
        import imagecodecs

        colour_transform = info.photometric_interpretation in ("YBR_RCT", "YBR_ICT")
        qstep = None
        if lossy:
            # The codestream's nominal range is that of the array's dtype, not Bits Stored: rescale so that
            # htj2k_qstep is relative to the range Bits Stored allows.
            qstep = options.get("htj2k_qstep", DEFAULT_HTJ2K_QSTEP) * 2.0 ** (info.bits_stored - info.bits_allocated)
        return bytes(
            imagecodecs.htj2k_encode(
                np.ascontiguousarray(frame),
                qstep,
                rgb=colour_transform if info.samples_per_pixel == 3 else None,
                reversible=not lossy,
                tlm=rpcl or None,  # OpenJPH writes RPCL progression; the RPCL syntax also wants TLM (PS3.5 A.4.11)
            )
        )

    return encode


def _imagecodecs_ready(name: str) -> Callable[[], bool]:
    def check() -> bool:
        import imagecodecs

        return bool(getattr(imagecodecs, name).available)

    return check


def _openjpeg() -> Plugin:
    return Plugin("imagecodecs (OpenJPEG)", _imagecodecs_jpeg2k, ("imagecodecs",), _imagecodecs_ready("JPEG2K"))


def _openjph(encode: EncodeFunction) -> Plugin:
    return Plugin("imagecodecs (OpenJPH)", encode, ("imagecodecs",), _imagecodecs_ready("HTJ2K"))


OPENJPEG_MAX_BITS_STORED = 24
"""JPEG 2000 allows 38 bits stored, but OpenJPEG (this node's JPEG 2000 encoder and verifier, and the decoder of
pydicom and GDCM) keeps at most 24 exactly: pylibjpeg-openjpeg refuses more, and imagecodecs' build made
codestreams of 32 bits stored that decode to other values (unsigned, values up to 2^24 or 2^32)."""


def _openjpeg_limit(info: FrameInfo) -> str | None:
    if info.bits_stored <= OPENJPEG_MAX_BITS_STORED:
        return None
    return (
        f"Bits Stored {info.bits_stored}: OpenJPEG, which encodes and decodes JPEG 2000 here and in pydicom and "
        f"GDCM, keeps at most {OPENJPEG_MAX_BITS_STORED} bits exactly"
    )


def _openjph_limit(info: FrameInfo) -> str | None:
    if info.bits_allocated <= 16:
        return None
    return (
        f"Bits Allocated {info.bits_allocated}: OpenJPH codes the whole {info.bits_allocated}-bit word, which "
        "OpenJPEG, the HTJ2K decoder of pydicom and GDCM, cannot read"
    )


# Verification decoders. JPEG-LS: CharLS's decoder through pyjpegls (~5x the speed of pydicom's default,
# pylibjpeg-libjpeg, measured on 512x512 12-bit CT: 3.5 ms against 17 ms a frame; the encode takes ~5 ms).
# HTJ2K: OpenJPEG through pylibjpeg-openjpeg, an implementation independent of the OpenJPH encoder.
_JPEGLS_VERIFY = ("pyjpegls", "pylibjpeg")
_HTJ2K_VERIFY = ("pylibjpeg",)

_HTJ2K_LOSSLESS_PROFILES = ENCODING_PROFILES[JPEG2000Lossless]
_HTJ2K_LOSSY_PROFILES = ENCODING_PROFILES[JPEG2000]

REGISTRY: dict[UID, Codec] = {
    # GDCM's RLE encoder calls terminate() on some odd-sized RGB images: it is tried last.
    RLELossless: Codec(
        RLELossless,
        ENCODING_PROFILES[RLELossless],
        plugins=_bytewise(_pydicom_plugins(RLELossless, ("pylibjpeg", "pydicom"))),
    ),
    JPEGLSLossless: Codec(
        JPEGLSLossless,
        ENCODING_PROFILES[JPEGLSLossless],
        plugins=[
            _charls(),
            *_not_narrowed(_pydicom_plugins(JPEGLSLossless)),
            Plugin("imagecodecs (CharLS)", _imagecodecs_jpegls, ("imagecodecs",), _imagecodecs_ready("JPEGLS")),
        ],
        verify_with=_JPEGLS_VERIFY,
    ),
    JPEGLSNearLossless: Codec(
        JPEGLSNearLossless,
        ENCODING_PROFILES[JPEGLSNearLossless],
        frozenset({"jls_error"}),
        [
            _charls(),
            *_not_narrowed(_pydicom_plugins(JPEGLSNearLossless)),
            Plugin("imagecodecs (CharLS)", _imagecodecs_jpegls, ("imagecodecs",), _imagecodecs_ready("JPEGLS")),
        ],
        verify_with=_JPEGLS_VERIFY,
    ),
    JPEG2000Lossless: Codec(
        JPEG2000Lossless,
        ENCODING_PROFILES[JPEG2000Lossless],
        plugins=[
            *_pydicom_plugins(JPEG2000Lossless),
            _openjpeg(),
        ],
        limit=_openjpeg_limit,
    ),
    JPEG2000: Codec(
        JPEG2000,
        ENCODING_PROFILES[JPEG2000],
        frozenset({"j2k_cr", "j2k_psnr"}),
        [*_pydicom_plugins(JPEG2000), _openjpeg()],
        limit=_openjpeg_limit,
    ),
    HTJ2KLossless: Codec(
        HTJ2KLossless,
        _HTJ2K_LOSSLESS_PROFILES,
        plugins=[_openjph(_imagecodecs_htj2k())],
        verify_with=_HTJ2K_VERIFY,
        limit=_openjph_limit,
    ),
    HTJ2KLosslessRPCL: Codec(
        HTJ2KLosslessRPCL,
        _HTJ2K_LOSSLESS_PROFILES,
        plugins=[_openjph(_imagecodecs_htj2k(rpcl=True))],
        verify_with=_HTJ2K_VERIFY,
        limit=_openjph_limit,
    ),
    HTJ2K: Codec(
        HTJ2K,
        _HTJ2K_LOSSY_PROFILES,
        frozenset({"htj2k_qstep"}),
        [_openjph(_imagecodecs_htj2k(lossy=True))],
        verify_with=_HTJ2K_VERIFY,
        limit=_openjph_limit,
    ),
}

# Colour after encoding (PS3.5 8.2.4, 8.2.14): JPEG 2000 and HTJ2K apply the reversible (lossless) or
# irreversible (lossy) component transform to RGB; every other codec keeps the source's interpretation.
_COLOUR_TRANSFORM: dict[UID, str] = {
    JPEG2000Lossless: "YBR_RCT",
    HTJ2KLossless: "YBR_RCT",
    HTJ2KLosslessRPCL: "YBR_RCT",
    JPEG2000: "YBR_ICT",
    HTJ2K: "YBR_ICT",
}


def encoded_photometric(syntax: UID, source: str) -> str:
    """Photometric Interpretation of pixels described as `source` once encoded in `syntax`."""
    if source == "RGB" and syntax in _COLOUR_TRANSFORM:
        return _COLOUR_TRANSFORM[syntax]
    return source


def get(syntax: str) -> Codec:
    """The codec for `syntax`; raises CompressionError when the node has none."""
    try:
        return REGISTRY[UID(syntax)]
    except KeyError:
        known = ", ".join(uid.keyword for uid in REGISTRY)
        raise CompressionError(f"the node has no encoder for {UID(syntax).name}; it can encode {known}") from None


def register(codec: Codec) -> None:
    """Add or replace the codec for `codec.syntax` (plugins register here, beside pydicom's)."""
    REGISTRY[codec.syntax] = codec
