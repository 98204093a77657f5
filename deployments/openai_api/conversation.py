"""A chat request's messages as the :class:`~deployments.messages.Query` the model deployments get:
text checked, images taken from data URLs (or fetched from allowed hosts), verified, and their tokens
planned."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from deployments.images import check_image
from deployments.messages import Query, Turn
from deployments.openai_api.errors import ApiError
from deployments.openai_api.request import (
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    ImageURL,
    TextPart,
    sampling_of,
)
from deployments.schemas import BadInput, ImageInfo
from deployments.settings import GatewaySettings
from deployments.tool_calls import tools_json
from moe_core.config import ApiConfig
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = ["Conversation", "Fetcher", "build_conversation", "fetch_url", "host_allowed"]

_DATA_IMAGE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


#: Fetches an allowed image URL: (url, max_bytes, timeout_s) -> the file's bytes.
Fetcher = Callable[[str, int, float], Awaitable[bytes]]


@dataclass(frozen=True)
class Conversation:
    """A chat request as the model deployments get it, and what the model sees of each image."""

    query: Query
    images: tuple[ImagePlan, ...]

    @property
    def image_info(self) -> list[ImageInfo]:
        return [
            ImageInfo(
                width=p.width,
                height=p.height,
                model_width=p.model_width,
                model_height=p.model_height,
                tokens=p.tokens,
            )
            for p in self.images
        ]


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` is named in ``allowed``, exactly or under a ``*.domain`` wildcard."""
    host = host.lower().rstrip(".")
    for a in allowed:
        if a.startswith("*.") and host.endswith(a[1:]) and host != a[2:]:
            return True
        if host == a:
            return True
    return False


async def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """GET an image from an allowed host: no redirects, at most ``max_bytes``, within ``timeout_s``."""
    import requests

    def get() -> bytes:
        deadline = time.monotonic() + timeout_s
        with requests.get(url, stream=True, timeout=timeout_s, allow_redirects=False) as r:
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code} (redirects are not followed)")
            size = int(r.headers.get("content-length") or 0)
            if size > max_bytes:
                raise OverflowError(f"image is {size} bytes, larger than {max_bytes}")
            data = bytearray()
            for block in r.iter_content(64 * 1024):
                data += block
                if len(data) > max_bytes:
                    raise OverflowError(f"image is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not fetched within {timeout_s:g}s")
            return bytes(data)

    return await asyncio.wait_for(asyncio.to_thread(get), timeout_s + 1.0)


async def _image_bytes(url: str, param: str, api: ApiConfig, max_bytes: int, fetch: Fetcher) -> bytes:
    """A data URL's bytes, or an allowed host's image; anything else is a 400 naming ``param``."""
    if url.startswith("data:"):
        if not _DATA_IMAGE.match(url):
            raise ApiError(400, f"{param}: expected data:image/<type>;base64,...", param, "invalid_image_url")
        b64 = url.split(",", 1)[1]
        if len(b64) > (max_bytes * 4) // 3 + 8:
            raise ApiError(413, f"{param}: image is larger than {max_bytes} bytes", param, "too_large")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{param}: not valid base64: {e}", param, "invalid_image") from e
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{param}: expected a data: URL (or an http(s) URL)", param, "invalid_image_url")
    if not host_allowed(parts.hostname, api.image_url_hosts):
        raise ApiError(
            400,
            f"{param}: image URLs from {parts.hostname!r} are not fetched; send the image as a data URL "
            "(data:image/png;base64,...)"
            + ("" if not api.image_url_hosts else f" or from an allowed host {api.image_url_hosts}"),
            param,
            "image_url_not_allowed",
        )
    try:
        return await fetch(url, max_bytes, api.image_fetch_timeout_s)
    except OverflowError as e:
        raise ApiError(413, f"{param}: {e}", param, "too_large") from e
    except (TimeoutError, ValueError, OSError) as e:
        raise ApiError(400, f"{param}: could not fetch the image: {e}", param, "image_fetch_failed") from e
    except Exception as e:  # requests' own errors (connection refused, bad URL, ...)
        raise ApiError(400, f"{param}: could not fetch the image: {e}", param, "image_fetch_failed") from e


def _parts(message: ChatMessage) -> list[TextPart | ImagePart]:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [TextPart(type="text", text=message.content)]
    return list(message.content)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate parses from JSON but is not text
        raise ApiError(
            400, f"{param}: not valid unicode ({e.reason} at position {e.start})", param, "invalid_value"
        ) from e


def _bounds(req: ChatCompletionRequest, settings: GatewaySettings) -> PixelBounds:
    limits = settings.limits
    try:
        return PixelBounds(limits.min_pixels, limits.max_pixels).narrowed(req.min_pixels, req.max_pixels)
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise ApiError(400, str(e), field, "invalid_value") from e


async def build_conversation(
    req: ChatCompletionRequest,
    settings: GatewaySettings,
    request_id: str,
    *,
    needs_image: bool = False,
    fetch: Fetcher = fetch_url,
) -> Conversation:
    """The messages as a :class:`Query`: checked, images decoded and verified, their tokens planned.

    One user message holding a screenshot and then text is the ``/infer`` request (``turns`` empty, so
    the engine adds the configured system prompt, as for ``/infer``); anything else is sent whole as
    ``turns``. ``image`` is the conversation's last image (what the routing adapter classifies), and
    ``prompt`` the last user message's text.
    """
    api, limits = settings.api, settings.limits
    contents = [_parts(m) for m in req.messages]
    count = sum(isinstance(p, ImagePart) for parts in contents for p in parts)
    chars = sum(len(p.text) for parts in contents for p in parts if isinstance(p, TextPart))
    if chars > limits.max_prompt_chars:
        raise ApiError(
            413,
            f"messages: {chars} characters of text, over the limit of {limits.max_prompt_chars}",
            "messages",
            "too_large",
        )
    if count > api.max_images:
        raise ApiError(
            400,
            f"messages: {count} images, over the limit of {api.max_images}",
            "messages",
            "too_many_images",
        )
    if needs_image and count == 0:
        raise ApiError(
            400,
            f"messages: model {api.routed_model_name!r} routes on a screenshot, and the conversation has none; "
            "send an image or name a model",
            "messages",
            "image_required",
        )
    if not any(m.role == "user" for m in req.messages):
        raise ApiError(400, "messages: at least one user message is required", "messages", "invalid_value")
    bounds = _bounds(req, settings)
    turns: list[Turn[int]] = []
    images: list[bytes] = []
    plans: list[ImagePlan] = []
    prompt = ""
    for i, (message, parts) in enumerate(zip(req.messages, contents, strict=True)):
        role: Literal["system", "user", "assistant", "tool"] = (
            "system" if message.role == "developer" else message.role
        )
        out: list[str | int] = []
        for j, part in enumerate(parts):
            param = f"messages.{i}.content" + (f".{j}" if isinstance(message.content, list) else "")
            if isinstance(part, TextPart):
                _check_text(part.text, param)
                if part.text:
                    out.append(part.text)
                continue
            if role != "user":
                raise ApiError(
                    400, f"{param}: images are only allowed in user messages", param, "invalid_value"
                )
            url_param = (
                f"{param}.image_url.url" if isinstance(part.image_url, ImageURL) else f"{param}.image_url"
            )
            raw = await _image_bytes(part.url, url_param, api, limits.max_image_bytes, fetch)
            plans.append(await asyncio.to_thread(_plan, raw, url_param, bounds, settings))  # off the loop
            out.append(len(images))
            images.append(raw)
        if role == "user":
            prompt = "".join(p for p in out if isinstance(p, str))
        turns.append(Turn(role, tuple(out), _tool_calls(message, i)))
    image_tokens = sum(p.tokens for p in plans)
    if image_tokens > limits.max_prompt_tokens:
        raise ApiError(
            413,
            f"messages: the images are {image_tokens} tokens, over the prompt limit of "
            f"{limits.max_prompt_tokens} tokens; send fewer or smaller images, or a lower max_pixels",
            "messages",
            "context_length_exceeded",
        )
    sampling = sampling_of(req, limits.max_completion_tokens)
    last = images[-1] if images else None
    query = Query(last, prompt, bounds, image_tokens, request_id, sampling)
    tools = tools_json(req.tools) if req.tools else None
    if tools is not None or not _is_infer_request(turns, prompt):
        query = Query(
            last, prompt, bounds, image_tokens, request_id, sampling, tuple(turns), tuple(images), tools
        )
    return Conversation(query, tuple(plans))


def _tool_calls(message: ChatMessage, i: int) -> tuple[tuple[str, str], ...]:
    """An assistant message's tool calls as (name, arguments) for the template."""
    if not message.tool_calls:
        return ()
    if message.role != "assistant":
        param = f"messages.{i}.tool_calls"
        raise ApiError(400, f"{param}: only assistant messages make tool calls", param, "invalid_value")
    for j, call in enumerate(message.tool_calls):
        _check_text(call.function.name, f"messages.{i}.tool_calls.{j}.function.name")
        _check_text(call.function.arguments, f"messages.{i}.tool_calls.{j}.function.arguments")
    return tuple((c.function.name, c.function.arguments) for c in message.tool_calls)


def _is_infer_request(turns: list[Turn[int]], prompt: str) -> bool:
    """One user message: one image, then non-blank text (what /infer sends the engine)."""
    if len(turns) != 1 or turns[0].role != "user":
        return False
    parts = turns[0].parts
    return (
        bool(parts) and parts[0] == 0 and all(isinstance(p, str) for p in parts[1:]) and bool(prompt.strip())
    )


def _plan(raw: bytes, param: str, bounds: PixelBounds, settings: GatewaySettings) -> ImagePlan:
    """Verify the image and plan what the model sees of it (its size on the patch grid, its tokens)."""
    limits = settings.limits
    try:
        img = check_image(  # from its header: the pixels are decoded once, in the replica
            raw,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            formats=limits.image_formats,
            field=param,
        )
    except BadInput as e:
        raise ApiError(
            e.status if e.status == 413 else 400,
            f"{param}: {e.message}",
            param,
            "too_large" if e.status == 413 else "invalid_image",
        ) from e
    try:
        return plan(img.width, img.height, bounds, settings.image_factor)
    except ValueError as e:  # qwen-vl-utils refuses aspect ratios over 200:1
        raise ApiError(400, f"{param}: image is {img.width}x{img.height}: {e}", param, "invalid_image") from e
