"""One preprocessing step (qwen-vl-utils' aspect-preserving resize) for serving and training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from moe_core.config import DeploymentConfig
from moe_core.engine import Engine
from moe_core.vision import PixelBounds, plan, prepare
from tests.helpers import screenshot

ROOT = Path(__file__).resolve().parents[2]
K8S = DeploymentConfig.from_file(ROOT / "config" / "deployment.k8s.yaml").limits
BOUNDS = [PixelBounds(K8S.min_pixels, K8S.max_pixels), PixelBounds(4096, 65536), PixelBounds(16384, 16384)]


@pytest.mark.parametrize("bounds", BOUNDS, ids=lambda b: f"{b.min_pixels}-{b.max_pixels}")
@pytest.mark.parametrize("size", [(1920, 1080), (1080, 1920), (2560, 1440), (390, 844)])
def test_aspect_ratio_kept_within_one_patch(size: tuple[int, int], bounds: PixelBounds) -> None:
    w, h = size
    resized = prepare(Image.new("RGB", size, (200, 10, 10)), bounds, patch_size=16)
    rw, rh = resized.size
    assert rw % 32 == 0 and rh % 32 == 0
    # the resized height is the original aspect's height for the resized width, within one 32 px patch
    assert abs(rh - rw * h / w) <= 32, (size, resized.size)
    p = plan(w, h, bounds, 32)
    assert (p.model_width, p.model_height) == resized.size and p.tokens == (rw // 32) * (rh // 32)


@pytest.mark.parametrize("size", [(64, 64), (300, 200), (1920, 1080), (4000, 3000), (100, 3000)])
def test_pixel_bounds_bound_the_token_count(size: tuple[int, int]) -> None:
    bounds = PixelBounds(256 * 32 * 32, 1280 * 32 * 32)
    p = plan(*size, bounds, 32)
    assert p.tokens <= 1280
    assert (
        p.tokens >= 256 or p.model_width * p.model_height >= bounds.min_pixels * 0.8
    )  # floor on the way down
    smaller = plan(*size, PixelBounds(64 * 32 * 32, 256 * 32 * 32), 32)
    assert smaller.tokens <= 256 and smaller.tokens <= p.tokens


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        plan(10, 3000, PixelBounds(4096, 65536), 32)


def test_request_bounds_must_lie_within_the_config() -> None:
    cfg = PixelBounds(4096, 65536)
    assert cfg.narrowed(None, 16384) == PixelBounds(4096, 16384)
    for lo, hi, word in (
        (1024, None, "min_pixels"),
        (None, 10**6, "max_pixels"),
        (32768, 8192, "min_pixels"),
    ):
        with pytest.raises(ValueError, match=f"^{word}"):
            cfg.narrowed(lo, hi)


def test_demo_training_and_serving_see_the_same_inputs(tmp_path: Path) -> None:
    """The demo's feature cache and the serving engine take the same path from screenshot to features;
    fails if either grows its own resize."""
    from moe_demo.train import FeatureBank

    cfg = DeploymentConfig.from_dict(
        {"storage": {"url": str(tmp_path / "s")}, "limits": {"min_pixels": 4096, "max_pixels": 65536}}
    )
    shots = [screenshot(1, (400, 225)), screenshot(2, (225, 400))]  # 16:9 and 9:16
    examples = [(_Screen(im), "Click the button", "click(1, 1)") for im in shots]
    bank = FeatureBank(cfg, examples, system_prompt=cfg.system_prompt)  # type: ignore[arg-type]
    serving = Engine.load(cfg.engine_settings, name="serving")
    for (screen, prompt, _), row in zip(examples, bank.rows, strict=True):
        inputs = serving.encode([screen.image], [prompt])
        p = plan(*screen.image.size, cfg.engine_settings.bounds, cfg.engine_settings.image_factor)
        assert (
            row.grid_thw.tolist()
            == inputs["image_grid_thw"][0].tolist()
            == [1, p.model_height // 16, p.model_width // 16]
        )
        features = serving.image_features(inputs)
        assert torch.allclose(row.image, features.pooler_output[0], atol=1e-6)
        prompt_len = int(inputs["attention_mask"][0].sum())
        assert serving.prompt_tokens(prompt, p.tokens) == prompt_len  # counted without pixels, exactly


class _Screen:
    """Just enough of moe_demo's Screen for the feature cache."""

    def __init__(self, image: Image.Image) -> None:
        self.image, self.kind, self.seed = image, "calendar", 0
        self.text, self.glyphs = "", ()  # not a reading screen


def test_smart_resize_is_qwen_vl_utils_on_every_size() -> None:
    import random

    from qwen_vl_utils import smart_resize as theirs

    from moe_core.vision import smart_resize

    rng = random.Random(0)
    cases = [(rng.randrange(1, 4000), rng.randrange(1, 4000)) for _ in range(5000)]
    cases += [(h, w) for h in (1, 27, 28, 32, 33, 832, 1080) for w in (1, 31, 32, 64, 1504, 1920)]
    for h, w in cases:
        for lo, hi, factor in ((16384, 65536, 32), (3136, 1003520, 28), (200704, 1806336, 32)):
            try:
                want: tuple[int, int] | str = tuple(theirs(h, w, factor, lo, hi))  # type: ignore[assignment]
            except ValueError:
                want = "refused"
            try:
                got: tuple[int, int] | str = smart_resize(h, w, factor, lo, hi)
            except ValueError:
                got = "refused"
            assert got == want, (h, w, lo, hi, factor)
