"""A request of either API as the :class:`~deployments.messages.Query` the model deployments get: the one
path every image goes through at the gateway, and the one place each of the gateway's limits is checked.

Each API reads its own request (``/infer``'s fields in :mod:`deployments.gateway.infer`, the chat messages
in :mod:`deployments.openai_api.conversation`) into a :class:`ParsedRequest`: the text, each image's
source and the field that holds it, the request's own pixel bounds and sampling. :func:`intake` does the
rest, the same for both, off the event loop:

1. the text against ``limits.max_prompt_chars`` (:func:`check_prompt_chars`);
2. the pixel bounds: the config's, narrowed by the request (:func:`pixel_bounds`);
3. each image: decoded from base64 when it came so, checked from its header only (format allowlist,
   bytes, pixels; the pixels are decoded once, in the replica), planned at those bounds (its size on the
   patch grid, its tokens) (:func:`image_plan`);
4. the images' tokens against ``limits.max_prompt_tokens`` (:func:`check_image_tokens`).

The whole prompt's tokens (template and text included) are counted where the tokenizer is: the replica's
engine checks them (:meth:`moe_core.engine.scheduler.Scheduler.check`), and the replica reports a refusal
as a 413 naming the prompt (:func:`deployments.models.engines.engine_refusal`).

A refusal is :class:`Refused`: a :class:`~deployments.schemas.BadInput` naming the field, with the code
OpenAI's error shape reports; each API answers it in its own shape (:func:`deployments.gateway.errors.api_error`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from deployments.errors import BadInput
from deployments.images import ImageInput, check_image, decode_b64
from deployments.messages import Query
from deployments.observability import RequestTrace
from deployments.schemas import ImageInfo
from deployments.settings import GatewaySettings
from moe_core.config import LimitsConfig
from moe_core.generation import SamplingParams, Turn
from moe_core.vision import ImagePlan, PixelBounds, plan

__all__ = [
    "Intake",
    "ParsedRequest",
    "Refused",
    "check_image_tokens",
    "check_prompt_chars",
    "image_plan",
    "intake",
    "pixel_bounds",
    "take",
]


class Refused(BadInput):
    """A request field the gateway refuses: ``code`` is the reason as OpenAI's error shape names it
    (``/infer`` reports the field, the message and the status only)."""

    def __init__(self, field: str, message: str, status: int = 422, code: str = "invalid_value") -> None:
        super().__init__(field, message, status)
        self.code = code


@dataclass(frozen=True)
class ParsedRequest:
    """What an API read from its request, in the pipeline's terms."""

    prompt: str  # the (last) user instruction
    images: Sequence[ImageInput]  # in order of appearance; the routing adapter classifies the last
    images_field: str  # the field that holds the images, named when all of them together are too many tokens
    text_chars: int  # characters of text in the whole request
    text_field: str  # the field that holds the text
    sampling: SamplingParams
    min_pixels: int | None = None  # the request's own bounds (Qwen's per-image override)
    max_pixels: int | None = None
    turns: tuple[Turn, ...] = ()  # a whole conversation; empty: the image and the prompt (as /infer sends)
    tools: str | None = None  # the functions the model may call, as JSON text


@dataclass(frozen=True)
class Intake:
    """A checked request: the query for the model deployments, and what the model sees of each image."""

    query: Query
    images: tuple[ImagePlan, ...]

    @property
    def pixels(self) -> int:
        return sum(p.width * p.height for p in self.images)

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


def check_prompt_chars(chars: int, limits: LimitsConfig, field: str) -> None:
    """The request's text within ``limits.max_prompt_chars`` (a 413 naming ``field``)."""
    if chars > limits.max_prompt_chars:
        raise Refused(
            field,
            f"{chars} characters of text, over the limit of {limits.max_prompt_chars}",
            413,
            "too_large",
        )


def pixel_bounds(limits: LimitsConfig, min_pixels: int | None, max_pixels: int | None) -> PixelBounds:
    """The pixels the model sees of each image: the config's bounds, narrowed by the request's own."""
    try:
        return PixelBounds(limits.min_pixels, limits.max_pixels).narrowed(min_pixels, max_pixels)
    except ValueError as e:  # its first word is the field
        raise Refused(str(e).split(" ", 1)[0], str(e)) from e


def image_plan(source: ImageInput, bounds: PixelBounds, settings: GatewaySettings) -> tuple[bytes, ImagePlan]:
    """One image's bytes, checked from its header, and what the model sees of it at ``bounds``."""
    limits = settings.limits
    try:
        raw = (
            decode_b64(source.data, max_bytes=limits.max_image_bytes, field=source.field)
            if isinstance(source.data, str)
            else source.data
        )
        img = check_image(  # from its header: the pixels are decoded once, in the replica
            raw,
            max_bytes=limits.max_image_bytes,
            max_pixels=limits.max_image_pixels,
            formats=limits.image_formats,
            field=source.field,
        )
    except BadInput as e:
        raise Refused(
            e.field, e.message, e.status, "too_large" if e.status == 413 else "invalid_image"
        ) from e
    try:
        return raw, plan(img.width, img.height, bounds, settings.image_factor)
    except ValueError as e:  # qwen-vl-utils refuses aspect ratios over 200:1
        raise Refused(source.field, f"image is {img.width}x{img.height}: {e}", code="invalid_image") from e


def check_image_tokens(images: Sequence[ImagePlan], limits: LimitsConfig, field: str) -> int:
    """The images' tokens in all, within ``limits.max_prompt_tokens`` (a 413 naming ``field``).

    The gateway's one comparison with that limit: the images alone are known before any replica (the
    whole prompt is checked where it is tokenized, in the replica's engine).
    """
    tokens = sum(p.tokens for p in images)
    if tokens > limits.max_prompt_tokens:
        if len(images) == 1:
            p = images[0]
            what = f"image is {tokens} tokens at {p.model_width}x{p.model_height} (from {p.width}x{p.height})"
        else:
            what = f"the {len(images)} images are {tokens} tokens"
        raise Refused(
            field,
            f"{what}, over the prompt limit of {limits.max_prompt_tokens} tokens; send fewer or smaller "
            "images, or a lower max_pixels",
            413,
            "context_length_exceeded",
        )
    return tokens


def intake(parsed: ParsedRequest, settings: GatewaySettings, request_id: str) -> Intake:
    """Check ``parsed`` and make it the query (blocking: base64 and image headers; see :func:`take`)."""
    limits = settings.limits
    check_prompt_chars(parsed.text_chars, limits, parsed.text_field)
    bounds = pixel_bounds(limits, parsed.min_pixels, parsed.max_pixels)
    images = [image_plan(source, bounds, settings) for source in parsed.images]
    plans = tuple(p for _, p in images)
    tokens = check_image_tokens(plans, limits, parsed.images_field)
    data = tuple(raw for raw, _ in images)
    query = Query(
        data[-1] if data else None,
        parsed.prompt,
        bounds,
        tokens,
        request_id,
        parsed.sampling,
        parsed.turns,
        data if parsed.turns else (),  # a conversation's images; else the one image is ``image``
        parsed.tools,
    )
    return Intake(query, plans)


async def take(parsed: ParsedRequest, settings: GatewaySettings, trace: RequestTrace) -> Intake:
    """:func:`intake`, noted in ``trace``: on a worker thread when there are images to decode (decoding
    never stalls the event loop), inline when there are none (a few comparisons, no thread hop)."""
    if parsed.images:
        taken = await asyncio.to_thread(intake, parsed, settings, trace.request_id)
    else:
        taken = intake(parsed, settings, trace.request_id)
    trace.pixels, trace.image_tokens = taken.pixels, taken.query.image_tokens
    return taken
