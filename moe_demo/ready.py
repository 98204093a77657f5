"""Wait for the service to answer, then print a ready-to-paste curl line and an OpenAI SDK example, both
with a demo screenshot.

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

#: The OpenAI SDK example `make serve` writes beside the curl request (``{url}``, ``{png}``, ``{prompt}``).
SDK_EXAMPLE = """\
# The OpenAI SDK against this server: `model` is an expert adapter, the base model, or "auto" (routed).
import base64, os
from openai import OpenAI

client = OpenAI(base_url="{url}/v1", api_key=os.environ.get("MOE_API_KEY", "unused"))
print([m.id for m in client.models.list()])
image = "data:image/png;base64," + base64.b64encode(open({png!r}, "rb").read()).decode()
messages = [{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": image}}}},
    {{"type": "text", "text": {prompt!r}}},
]}}]
out = client.chat.completions.create(model="auto", messages=messages)
print(out.choices[0].message.content, out.model_extra["moe"])   # which expert answered, and how
for chunk in client.chat.completions.create(model="calendar", messages=messages, stream=True):
    for choice in chunk.choices:
        print(choice.delta.content or "", end="", flush=True)
print()
"""


def demo_request(kind: str, out: Path) -> Path:
    from moe_demo.screens import split

    screen = split("heldout", 1, (kind,))[0]
    buf = io.BytesIO()
    screen.image.save(buf, format="PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"image_b64": base64.b64encode(buf.getvalue()).decode(), "prompt": screen.prompt})
    )
    out.with_suffix(".png").write_bytes(buf.getvalue())
    return out


def sdk_example(url: str, request: Path, out: Path) -> Path:
    """An OpenAI SDK script for the demo screenshot of ``request`` (written by :func:`demo_request`)."""
    prompt = json.loads(request.read_text())["prompt"]
    out.write_text(SDK_EXAMPLE.format(url=url, png=str(request.with_suffix(".png")), prompt=prompt))
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
    example = sdk_example(args.url, body, args.out.with_name("openai_example.py"))
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
        f"[ready] OpenAI SDK: {sys.executable} {example}   (chat with the screenshot, then streamed):\n"
        + "".join(f"[ready]   {line}\n" for line in example.read_text().splitlines())
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
