"""chandra-ocr's own client, unchanged, run as its users run it: ``python -m tests.e2e.chandra_client
OUT.json PAGE.png...`` with ``VLLM_API_BASE`` (and optionally ``VLLM_MODEL_NAME``) in the environment, as
chandra-ocr's settings read them. Writes each page's markdown, chunks, raw answer and error flag."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from chandra.model import InferenceManager
    from chandra.model.schema import BatchInputItem
    from PIL import Image

    out, pages = Path(argv[0]), [Path(p) for p in argv[1:]]
    manager = InferenceManager(method="vllm")
    batch = [BatchInputItem(image=Image.open(p).convert("RGB"), prompt_type="ocr_layout") for p in pages]
    t0 = time.perf_counter()
    results = manager.generate(batch)
    seconds = time.perf_counter() - t0
    rows = [
        {"markdown": r.markdown, "chunks": r.chunks, "raw": r.raw, "error": r.error, "tokens": r.token_count}
        for r in results
    ]
    out.write_text(json.dumps({"seconds": seconds, "pages": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
