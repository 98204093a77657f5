"""The gateway's process loads no model code: importing its deployment (as a Serve replica does) brings in
neither torch nor the engine, and it plans image tokens with the same arithmetic as qwen-vl-utils."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_gateway_deployment_imports_no_torch_and_no_engine() -> None:
    code = (
        "import json, sys\n"
        "import deployments.gateway.service\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'moe_core.engine', 'qwen_vl_utils', 'transformers', 'deployments.models.engines', 'deployments.models.dynamic')))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
