"""A chat request's messages in the gateway's terms: the text checked, the turns, and each image's source
(a data URL's base64, or the bytes fetched from an allowed host) with the field that holds it. The gateway
checks the images and the limits, the same way for both APIs, and makes the query
(:mod:`deployments.gateway.pipeline`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from deployments.images import ImageInput
from deployments.messages import Turn
from deployments.openai_api.errors import ApiError
from deployments.openai_api.request import (
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
    ImageURL,
    TextPart,
)
from deployments.openai_api.tool_calls import tools_json
from moe_core.config import ApiConfig

__all__ = ["Conversation", "Fetcher", "build_conversation", "fetch_url", "host_allowed"]

_DATA_IMAGE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


#: Fetches an allowed image URL: (url, max_bytes, timeout_s) -> the file's bytes.
Fetcher = Callable[[str, int, float], Awaitable[bytes]]


@dataclass(frozen=True)
class Conversation:
    """A chat request's messages, read: what the gateway's pipeline makes the query of.

    One user message holding a screenshot and then text is the ``/infer`` request (``turns`` empty, so
    the engine adds the configured system prompt, as for ``/infer``); anything else is sent whole as
    ``turns``. ``prompt`` is the last user message's text.
    """

    prompt: str
    turns: tuple[Turn, ...]
    images: tuple[ImageInput, ...]
    tools: str | None
    chars: int  # characters of text in all the messages


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


async def _image(url: str, param: str, api: ApiConfig, max_bytes: int, fetch: Fetcher) -> ImageInput:
    """A data URL's base64, or an allowed host's image; anything else is a 400 naming ``param``."""
    if url.startswith("data:"):
        if not _DATA_IMAGE.match(url):
            raise ApiError(400, f"{param}: expected data:image/<type>;base64,...", param, "invalid_image_url")
        return ImageInput(url.split(",", 1)[1], param)
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
        return ImageInput(await fetch(url, max_bytes, api.image_fetch_timeout_s), param)
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


async def build_conversation(
    req: ChatCompletionRequest,
    api: ApiConfig,
    max_image_bytes: int,
    *,
    needs_image: bool = False,
    fetch: Fetcher = fetch_url,
) -> Conversation:
    """The messages read: their text checked, their turns, and each image's source (fetched when it is
    a URL of an allowed host); ``needs_image``: the routed model, which classifies a screenshot."""
    contents = [_parts(m) for m in req.messages]
    count = sum(isinstance(p, ImagePart) for parts in contents for p in parts)
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
    turns: list[Turn[int]] = []
    images: list[ImageInput] = []
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
            out.append(len(images))
            images.append(await _image(part.url, url_param, api, max_image_bytes, fetch))
        if role == "user":
            prompt = "".join(p for p in out if isinstance(p, str))
        turns.append(Turn(role, tuple(out), _tool_calls(message, i)))
    tools = tools_json(req.tools) if req.tools else None
    whole = tools is not None or not _is_infer_request(turns, prompt)
    chars = sum(len(p.text) for parts in contents for p in parts if isinstance(p, TextPart))
    return Conversation(prompt, tuple(turns) if whole else (), tuple(images), tools, chars)


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
