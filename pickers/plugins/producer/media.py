"""The estimate backend's placeholder tokens for a request's images and videos (llm-d's `estimate.image`,
`estimate.video`): what an encoder turns each into, so a multimodal prompt weighs what it will cost.

An image is `width x height / factor` tokens (dynamic) or a constant (static). Its size is read from the
header of an inline base64 image (a `data:image/...;base64,` URL, an Anthropic base64 source): PNG, JPEG
and GIF, the formats llm-d decodes; any other image, and any remote URL (never fetched), has the default
resolution. A video is `min(frames x tokensPerFrame, maxVideoTokens)`, its duration, resolution and
frame rate from the `x-llm-d-video-*` request headers, else the config, else llm-d's defaults. Audio is
a token per 4 characters of its data, as in llm-d. Every part weighs at least one token.
"""

from __future__ import annotations

import binascii
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from pickers.framework.params import ParameterError, Params
from pickers.framework.request import CHARS_PER_TOKEN, MediaPart

DEFAULT_WIDTH, DEFAULT_HEIGHT = 640, 360  # llm-d's 360p default, for images and video frames
DEFAULT_FACTOR = 1024  # pixels per placeholder token
DEFAULT_DURATION = 10.0  # seconds
DEFAULT_SAMPLE_FPS = 2.0  # llm-d's code (its README table says 1)
DEFAULT_SOURCE_FPS = 24.0
# The header bytes read of an inline image: PNG's and GIF's size is in the first 33 bytes; a JPEG's
# SOF follows its APPn segments (EXIF with a thumbnail can be tens of KiB). Past this, the default.
HEADER_BYTES = 64 * 1024
_B64_CHARS = (HEADER_BYTES + 2) // 3 * 4

VIDEO_FPS_HEADER = "x-llm-d-video-fps"
VIDEO_DURATION_HEADER = "x-llm-d-video-duration-seconds"
VIDEO_RESOLUTION_HEADER = "x-llm-d-video-resolution"


# -- image dimensions from the header bytes ---------------------------------------------------------
def image_size(source: str, inline: bool) -> tuple[int, int] | None:
    """(width, height) of an inline base64 image, or None (a remote URL, another format, bad data)."""
    if not inline:
        if not source.startswith("data:image/"):
            return None
        at = source.find("base64,")
        if at < 0:
            return None
        start = at + len("base64,")
    else:
        start = 0
    head = _b64_prefix(source, start)
    if head is None:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_size(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_size(head)
    return None


def _b64_prefix(source: str, start: int) -> bytes | None:
    """The first HEADER_BYTES decoded bytes of the base64 text from `start` (line breaks skipped, as Go's
    decoder skips them); None when that prefix is not base64."""
    chunk = source[start : start + _B64_CHARS]
    if "\n" in chunk or "\r" in chunk:
        chunk = chunk.replace("\r", "").replace("\n", "")
    if len(chunk) == _B64_CHARS or "=" not in chunk:
        chunk = chunk[: len(chunk) // 4 * 4]  # whole quads only: the rest is past the header
    try:
        return binascii.a2b_base64(chunk, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def _png_size(b: bytes) -> tuple[int, int] | None:
    # signature, then the IHDR chunk: length 13, "IHDR", width, height, 5 more bytes, CRC
    if len(b) < 33 or b[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    if zlib.crc32(b[12:29]) != struct.unpack(">I", b[29:33])[0]:
        return None
    w, h = struct.unpack(">II", b[16:24])
    return (w, h) if 0 < w < 2**31 and 0 < h < 2**31 else None


def _gif_size(b: bytes) -> tuple[int, int] | None:
    if len(b) < 10:
        return None
    w, h = struct.unpack("<HH", b[6:10])
    return (w, h) if w and h else None


_SOF = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive: what Go decodes


def _jpeg_size(b: bytes) -> tuple[int, int] | None:
    i, n = 2, len(b)
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan before any frame header
            return None
        length = (b[i + 2] << 8) | b[i + 3]
        if length < 2:
            return None
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", b[i + 5 : i + 9])
            return (w, h) if w and h else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless, arithmetic-coded: Go refuses these
        i += 2 + length
    return None


# -- the estimators ---------------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class ImageEstimate:
    static_tokens: int | None = None  # static mode: this many per image; None: dynamic
    factor: int = DEFAULT_FACTOR
    width: int = DEFAULT_WIDTH  # when the image's own size is unknown
    height: int = DEFAULT_HEIGHT

    def tokens(self, source: str, inline: bool) -> int:
        if self.static_tokens is not None:
            return max(1, self.static_tokens)
        size = image_size(source, inline)
        w, h = size if size is not None else (self.width, self.height)
        return max(1, w * h // self.factor)


@dataclass(slots=True, frozen=True)
class VideoEstimate:
    static_tokens_per_frame: int | None = None  # tokensPerFrame static mode; None: dynamic
    factor: int = DEFAULT_FACTOR
    strided: bool = False  # frames mode: strided, else sampled
    min_frames: int = 0
    max_frames: int = 0  # 0: uncapped
    sample_fps: float = DEFAULT_SAMPLE_FPS
    temporal_patch_size: int = 0
    source_fps: float = DEFAULT_SOURCE_FPS
    frame_stride: int = 1
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    duration: float = DEFAULT_DURATION
    max_tokens: int = 0  # 0: uncapped

    def tokens(self, headers: Mapping[str, str]) -> int:
        duration = _positive(headers.get(VIDEO_DURATION_HEADER)) or self.duration
        if self.strided:
            fps = _positive(headers.get(VIDEO_FPS_HEADER)) or self.source_fps
            frames = _clamp(int(duration * fps) // self.frame_stride, self.min_frames, self.max_frames)
        else:  # the model's own sampling rate: no header overrides it
            frames = _clamp(int(duration * self.sample_fps), self.min_frames, self.max_frames)
            if self.temporal_patch_size > 1:
                frames //= self.temporal_patch_size
        if self.static_tokens_per_frame is not None:
            per_frame = max(1, self.static_tokens_per_frame)
        else:
            w, h = _resolution(headers.get(VIDEO_RESOLUTION_HEADER)) or (self.width, self.height)
            per_frame = max(1, w * h // self.factor)
        tokens = frames * per_frame
        if self.max_tokens > 0:
            tokens = min(tokens, self.max_tokens)
        return max(1, tokens)


def _clamp(n: int, low: int, high: int) -> int:
    if low > 0:
        n = max(n, low)
    return min(n, high) if high > 0 else n


def _positive(text: str | None) -> float | None:
    """A header's positive number; a missing or malformed one is None (the config's value then)."""
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if 0 < v < float("inf") else None


def _resolution(text: str | None) -> tuple[int, int] | None:
    """`WIDTHxHEIGHT` (or `X`); None when missing or malformed."""
    if not text:
        return None
    at = min((i for i in (text.find("x"), text.find("X")) if i >= 0), default=-1)
    if at <= 0:
        return None
    try:
        w, h = int(text[:at].strip()), int(text[at + 1 :].strip())
    except ValueError:
        return None
    return (w, h) if w > 0 and h > 0 else None


@dataclass(slots=True, frozen=True)
class MediaEstimate:
    """The placeholder tokens of a request's media parts."""

    image: ImageEstimate = ImageEstimate()
    video: VideoEstimate = VideoEstimate()

    def tokens(self, parts: list[MediaPart], headers: Mapping[str, str]) -> int:
        total = 0
        for part in parts:
            if part.kind == "image":
                total += self.image.tokens(part.source, part.inline)
            elif part.kind == "video":
                total += self.video.tokens(headers)
            else:  # audio: its data's characters, a token per 4 (llm-d has no audio estimator)
                total += max(1, -(-part.size // CHARS_PER_TOKEN))
        return total


# -- the config -------------------------------------------------------------------------------------
def media_estimate(estimate: Params) -> MediaEstimate:
    """`estimate.image` and `estimate.video`, as llm-d reads them. A mode's settings are read only in
    that mode, so the other mode's are refused rather than ignored; sizes, factors and rates must be
    positive (llm-d takes 0 or less for its default: here the default is left out)."""
    return MediaEstimate(_image(estimate.section("image")), _video(estimate.section("video")))


def _image(p: Params) -> ImageEstimate:
    mode = p.choice("mode", "dynamic", ("dynamic", "static"))
    width, height = _resolution_param(p.section("defaultResolution"))
    if mode == "static":
        _not_in_mode(p, "dynamic", "static")
        n = _count(p.section("static"), "staticToken", "image")
        return ImageEstimate(static_tokens=n, width=width, height=height)
    _not_in_mode(p, "static", "dynamic")
    factor = p.section("dynamic").integer("factor", DEFAULT_FACTOR, minimum=1)
    return ImageEstimate(factor=factor, width=width, height=height)


def _video(p: Params) -> VideoEstimate:
    width, height = _resolution_param(p.section("defaultResolution"))
    duration = p.number("defaultDuration", DEFAULT_DURATION, positive=True)
    max_tokens = p.integer("maxVideoTokens", 0, minimum=0)
    tpf = p.section("tokensPerFrame")
    static = None
    factor = DEFAULT_FACTOR
    if tpf.choice("mode", "dynamic", ("dynamic", "static")) == "static":
        _not_in_mode(tpf, "dynamic", "static")
        static = _count(tpf.section("static"), "numTokensPerFrame", "video frame")
    else:
        _not_in_mode(tpf, "static", "dynamic")
        factor = tpf.section("dynamic").integer("factor", DEFAULT_FACTOR, minimum=1)
    fr = p.section("frames")
    strided = fr.choice("mode", "sampled", ("sampled", "strided")) == "strided"
    low = fr.integer("minFrames", 0, minimum=0)
    high = fr.integer("maxFrames", 0, minimum=0)
    if high and low > high:
        raise ParameterError(fr.path("minFrames"), f"must not exceed maxFrames ({high}), got {low}")
    video = VideoEstimate(static_tokens_per_frame=static, factor=factor, strided=strided, min_frames=low,
                          max_frames=high, width=width, height=height, duration=duration, max_tokens=max_tokens)  # fmt: skip
    if strided:
        _not_in_mode(fr, "sampled", "strided")
        s = fr.section("strided")
        return replace(video, source_fps=s.number("defaultSourceFPS", DEFAULT_SOURCE_FPS, positive=True),
                       frame_stride=s.integer("frameStride", 1, minimum=1))  # fmt: skip
    _not_in_mode(fr, "strided", "sampled")
    s = fr.section("sampled")
    return replace(video, sample_fps=s.number("sampleFPS", DEFAULT_SAMPLE_FPS, positive=True),
                   temporal_patch_size=s.integer("temporalPatchSize", 0, minimum=0))  # fmt: skip


def _not_in_mode(p: Params, other: str, mode: str) -> None:
    p.refused(other, f"read only in {other} mode, and mode is {mode}")


def _count(p: Params, key: str, what: str) -> int:
    n = p.integer(key, 1, minimum=1)
    if not p.given(key):
        p.warnings.append(f"{p.path(key)} is not set: each {what} counts as 1 placeholder token, as in llm-d")
    return n


def _resolution_param(p: Params) -> tuple[int, int]:
    return p.integer("width", DEFAULT_WIDTH, minimum=1), p.integer("height", DEFAULT_HEIGHT, minimum=1)
