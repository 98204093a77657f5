"""Images from clients: checked at the gateway from their header, decoded once in a model replica.

The gateway needs only an image's format and size (for the allowlist, the pixel limit and the token plan):
:func:`check_image` reads the header and checks the file's structure with the allowlisted decoder, without
decoding pixels. A model replica decodes it, once per process: :class:`DecodedImages` keeps the images it
decoded by content, so a routed request's classification and its answer (and an agent's screenshot sent
again) share one decode. Only the decoders of ``limits.image_formats`` are ever tried, at both places; any
decoder error is the client's bad image (a 4xx naming the field), never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from deployments.errors import BadInput
from moe_core.config import IMAGE_FORMATS

__all__ = [
    "DecodedImages",
    "ImageHeader",
    "ImageInput",
    "check_image",
    "decode_b64",
    "image_key",
    "open_image",
]

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


@dataclass(frozen=True)
class ImageInput:
    """One image of a request as its API read it: the file's bytes (a fetched URL) or its base64 text
    (``/infer``'s field, a data URL; decoded by the gateway's pipeline, off the event loop), and the
    request field that holds it, named in its errors."""

    data: bytes | str
    field: str


@dataclass(frozen=True)
class ImageHeader:
    """What the gateway knows of an image: its format and size, from its header."""

    format: str
    width: int
    height: int


def decode_b64(data: str, *, max_bytes: int, field: str = "image_b64") -> bytes:
    """Base64 (or a data URL) to the image file's bytes; raise :class:`BadInput` naming ``field``."""
    raw_b64 = _DATA_URL.sub("", data.strip(), count=1)
    if len(raw_b64) > (max_bytes * 4) // 3 + 8:
        raise BadInput(field, f"image is larger than {max_bytes} bytes", 413)
    try:
        return base64.b64decode(raw_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(field, f"not valid base64: {e}") from e


def check_image(
    raw: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    formats: Sequence[str] = IMAGE_FORMATS,
    field: str = "image_b64",
) -> ImageHeader:
    """Image file bytes checked without decoding pixels: an allowed format by its header, within the
    byte and pixel limits, its structure checked by the decoder (``verify``); raise :class:`BadInput`."""
    if not raw:
        raise BadInput(field, "empty image")
    if len(raw) > max_bytes:
        raise BadInput(field, f"image is larger than {max_bytes} bytes", 413)
    allowed = list(formats)
    try:
        with Image.open(io.BytesIO(raw), formats=allowed) as probe:
            w, h = probe.size
            if w * h > max_pixels:
                raise BadInput(
                    field, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", 413
                )
            fmt = str(probe.format)
            probe.verify()
    except BadInput:
        raise
    except UnidentifiedImageError as e:
        raise BadInput(field, f"not an image in an accepted format (accepted: {', '.join(allowed)})") from e
    except Exception as e:  # any decoder failure (NotImplementedError, struct.error, ...) is a bad image
        raise BadInput(field, f"bytes are not a readable image: {type(e).__name__}: {e}") from e
    return ImageHeader(fmt, w, h)


def image_key(data: bytes) -> str:
    """An image's content key (what caches of its features and its decode are keyed by)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def open_image(data: bytes, formats: Sequence[str] = IMAGE_FORMATS, field: str = "image") -> Image.Image:
    """Image bytes (checked at the gateway) decoded to a loaded PIL image, with the allowed decoders only."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
        img.load()
    except Exception as e:  # checked at the gateway: a body its header did not give away fails here
        raise BadInput(field, f"bytes are not a readable image: {type(e).__name__}: {e}") from e
    return img


class DecodedImages:
    """The images a replica decoded, by content (an LRU of ``capacity``): each is decoded once per
    process however many steps of a request (routing, the answer) or later turns read it."""

    def __init__(self, capacity: int = 8, formats: Sequence[str] = IMAGE_FORMATS) -> None:
        self.capacity = capacity
        self.formats = tuple(formats)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()
        self.decodes = 0  # images decoded in this process

    def open(self, data: bytes, field: str = "image") -> tuple[Image.Image, str]:
        """The decoded image of ``data`` and its content key."""
        key = image_key(data)
        with self._lock:
            found = self._images.get(key)
            if found is not None:
                self._images.move_to_end(key)
                return found, key
        image = open_image(data, self.formats, field)
        with self._lock:
            self.decodes += 1
            self._images[key] = image
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return image, key
