"""Wait for the service to answer, then print a ready-to-paste curl line with a demo screenshot.

Run beside `serve run` by `make serve`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

import requests


def demo_request(kind: str, out: Path) -> Path:
    from moe_demo.screens import split

    screen = split("heldout", 1, (kind,))[0]
    buf = io.BytesIO()
    screen.image.save(buf, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"image_b64": base64.b64encode(buf.getvalue()).decode(), "prompt": screen.prompt})
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_demo.ready")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--kind", default="calendar", help="screen type of the demo screenshot")
    p.add_argument("--out", type=Path, default=Path(".cache/demo/request.json"))
    p.add_argument("--metrics", help="Ray's Prometheus endpoint, printed for the user")
    args = p.parse_args(argv)
    body = demo_request(args.kind, args.out)
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.timeout:
        try:
            if requests.get(f"{args.url}/healthz", timeout=2).ok:
                r = requests.post(
                    f"{args.url}/infer",
                    data=body.read_bytes(),
                    timeout=60,
                    headers={"content-type": "application/json"},
                )
                if r.ok:
                    break
        except requests.RequestException:
            pass
        time.sleep(1.0)
    else:
        print(f"[ready] service did not answer within {args.timeout:.0f}s", file=sys.stderr)
        return 1
    print(
        f"\n[ready] serving in {time.monotonic() - t0:.1f}s after start; first answer: {r.json()}\n"
        f"[ready] try:  curl -s {args.url}/infer -H 'content-type: application/json' -d @{body}\n"
        f"[ready]       curl -s {args.url}/adapters ; open {args.url}/docs for the OpenAPI schema\n"
        + (
            f"[ready] metrics: curl -s {args.metrics} | grep ray_moe_   (Grafana: k8s/grafana-dashboard.json)\n"
            if args.metrics
            else ""
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
