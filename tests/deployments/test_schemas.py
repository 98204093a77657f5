from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from deployments.schemas import BadInput, InferRequest, decode_image


def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bare_base64_and_data_url() -> None:
    b64 = base64.b64encode(_png()).decode()
    for text in (b64, f"data:image/png;base64,{b64}"):
        raw, img = decode_image(text, max_bytes=10**6, max_pixels=10**6)
        assert img.size == (40, 30) and raw == _png()


@pytest.mark.parametrize(
    ("text", "status", "words"),
    [
        ("not base64 at all!!", 422, "not valid base64"),
        (base64.b64encode(b"hello, not an image").decode(), 422, "not a readable image"),
        (base64.b64encode(_png((2000, 2000))).decode(), 413, "over the limit"),
        ("", 422, "empty image"),
    ],
)
def test_bad_images(text: str, status: int, words: str) -> None:
    with pytest.raises(BadInput) as e:
        decode_image(text, max_bytes=10**6, max_pixels=1000 * 1000)
    assert e.value.field == "image_b64" and e.value.status == status and words in e.value.message


def test_too_many_bytes() -> None:
    with pytest.raises(BadInput, match="larger than"):
        decode_image(base64.b64encode(_png()).decode(), max_bytes=10, max_pixels=10**6)


def test_blank_prompt_rejected() -> None:
    with pytest.raises(ValueError, match="prompt must not be empty"):
        InferRequest(image_b64="x", prompt="   ")
