from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from deployments.images import DecodedImages, ImageHeader, check_image, decode_b64, open_image
from deployments.schemas import BadInput, InferRequest
from moe_core.config import DeploymentConfig
from tests.helpers import ACCEPTED_FORMATS, REFUSED_FORMATS, image_file


def decode_image(text: str, *, max_bytes: int, max_pixels: int, **kw: object) -> tuple[bytes, ImageHeader]:
    """What the gateway does with an image_b64: its bytes, and its header checked (no pixels decoded)."""
    raw = decode_b64(text, max_bytes=max_bytes, field=str(kw.get("field", "image_b64")))
    return raw, check_image(raw, max_bytes=max_bytes, max_pixels=max_pixels, **kw)  # type: ignore[arg-type]


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bare_base64_and_data_url() -> None:
    b64 = base64.b64encode(_png()).decode()
    for text in (b64, f"data:image/png;base64,{b64}"):
        raw, img = decode_image(text, max_bytes=10**6, max_pixels=10**6)
        assert (img.width, img.height, img.format) == (40, 30, "PNG") and raw == _png()


@pytest.mark.parametrize(
    ("text", "status", "words"),
    [
        ("not base64 at all!!", 422, "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), 422, "not an image in an accepted format"),
        (base64.b64encode(_png((2000, 2000))).decode(), 413, "over the limit"),
        ("", 422, "empty image"),
    ],
)
def test_bad_images(text: str, status: int, words: str) -> None:
    with pytest.raises(BadInput) as e:
        decode_image(text, max_bytes=10**6, max_pixels=1000 * 1000)
    assert e.value.field == "image_b64" and e.value.status == status and words in e.value.message


@pytest.mark.parametrize("fmt", REFUSED_FORMATS)
def test_formats_outside_the_allowlist_are_refused_before_any_decoder(fmt: str) -> None:
    """DDS, TGA, ICO, TIFF, EPS (Ghostscript's way in), PDF, SVG, and a DDS header Pillow's DDS plugin
    raises NotImplementedError on: each a 4xx naming the field, none reaching its decoder."""
    with pytest.raises(BadInput) as e:
        decode_image(base64.b64encode(image_file(fmt)).decode(), max_bytes=10**6, max_pixels=10**6)
    assert e.value.field == "image_b64" and e.value.status == 422, e.value
    assert "accepted: PNG, JPEG, WEBP, GIF, BMP" in e.value.message


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_the_allowlisted_formats_decode(fmt: str) -> None:
    raw, header = decode_image(base64.b64encode(image_file(fmt)).decode(), max_bytes=10**6, max_pixels=10**6)
    assert (header.width, header.height, header.format) == (64, 64, fmt)
    img = open_image(raw)  # the replica's decode
    assert img.size == (64, 64) and img.format == fmt


def test_any_decoder_error_is_a_bad_image_and_the_allowlist_is_configured() -> None:
    """A format let in by config whose decoder raises anything (the DDS plugin's NotImplementedError) is
    a 4xx, not a 500; a name Pillow does not read is refused in the config."""
    raw = image_file("DDS-NO-PIXEL-FORMAT")
    with pytest.raises(BadInput, match="NotImplementedError") as e:  # at the gateway, from the header
        check_image(raw, max_bytes=10**6, max_pixels=10**6, formats=["DDS"], field="messages[0]")
    assert e.value.field == "messages[0]" and e.value.status == 422
    with pytest.raises(BadInput, match="NotImplementedError") as e:  # and in the replica's decoder
        open_image(raw, formats=["DDS"], field="messages[0]")
    assert e.value.field == "messages[0]" and e.value.status == 422
    truncated = _png((64, 64))[:-40]  # a body the header does not give away: the replica's decode says so
    with pytest.raises(BadInput, match="not a readable image"):
        open_image(truncated)
    assert DeploymentConfig(limits={"image_formats": ["png", "tiff"]}).limits.image_formats == ["PNG", "TIFF"]
    with pytest.raises(ValueError, match="not formats Pillow reads"):
        DeploymentConfig(limits={"image_formats": ["PNG", "HEIC"]})


def test_too_many_bytes() -> None:
    with pytest.raises(BadInput, match="larger than"):
        decode_image(base64.b64encode(_png()).decode(), max_bytes=10, max_pixels=10**6)


def test_blank_prompt_rejected() -> None:
    with pytest.raises(ValueError, match="prompt must not be empty"):
        InferRequest(image_b64="x", prompt="   ")


def test_a_replica_decodes_each_image_once() -> None:
    images = DecodedImages(capacity=2)
    a, b, c = _png((40, 30)), _png((50, 30)), _png((60, 30))
    first, key = images.open(a)
    again, same = images.open(a)  # routing, then the answer of the same request
    assert again is first and same == key and images.decodes == 1
    images.open(b)
    images.open(c)  # a is the least recently used of three in an LRU of two: decoded again when it comes back
    assert images.open(a)[0] is not first and images.decodes == 4
