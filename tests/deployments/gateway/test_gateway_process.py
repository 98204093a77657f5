"""The gateway's process loads no model code: importing its deployment (as a Serve replica does) brings in
neither torch nor the engine, and it plans image tokens with the same arithmetic as qwen-vl-utils."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "modules",
    [
        "deployments.gateway.service",
        "deployments.promotion.controller",  # the promotion controller's process, with no CPU reserved
    ],
)
def test_the_gateway_deployment_imports_no_torch_and_no_engine(modules: str) -> None:
    code = (
        "import json, sys\n"
        f"import {modules}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'moe_core.engine', 'qwen_vl_utils', 'transformers', 'deployments.models.engines', 'deployments.models.dynamic')))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
