"""Generate the Ray Serve config (config/serve.yaml, KubeRay's serveConfigV2) from config/deployment.yaml.

    python -m deployments.serve_config --config config/deployment.yaml --out config/serve.yaml
    python -m deployments.serve_config --config config/deployment.yaml --check config/serve.yaml
    python -m deployments.serve_config --validate config/serve.yaml     # a hand-edited Serve config

The app's ``args`` hold the config without its live fields; those go into each deployment's
``user_config``, so `serve deploy` after editing them reconfigures replicas in place.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml

from deployments.app import CONTROLLER_NAME, DYNAMIC_NAME, GATEWAY_NAME, LOGGING, user_configs
from moe_core.config import ConfigError, DeploymentConfig, DynamicLive, GatewayLive, LiveModel, PromotionLive

LIVE_MODELS: dict[str, type[LiveModel]] = {
    GATEWAY_NAME: GatewayLive,
    DYNAMIC_NAME: DynamicLive,
    CONTROLLER_NAME: PromotionLive,
}

__all__ = ["APP_NAME", "render", "serve_config", "validate"]

APP_NAME = "moe"
HEADER = (
    "# Generated from {source} by `python -m deployments.serve_config`; do not edit by hand.\n"
    "# Live fields (prefer_merged, fallback_to_dynamic, confidence threshold, dynamic adapters, LRU size)\n"
    "# are deployment user_config: `serve deploy` applies them in place, without restarting replicas.\n"
)


def serve_config(cfg: DeploymentConfig, *, host: str = "0.0.0.0", port: int = 8000) -> dict[str, Any]:
    deployments = [{"name": name, "user_config": live} for name, live in user_configs(cfg).items()]
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": host,
            "port": port,
            "request_timeout_s": cfg.gateway.request_timeout_s * 2,
        },
        "logging_config": dict(LOGGING),
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "args": {"config": cfg.static_dump()},
                "deployments": deployments,
            }
        ],
    }


def render(cfg: DeploymentConfig, source: str = "config/deployment.yaml", **kw: Any) -> str:
    body = yaml.safe_dump(serve_config(cfg, **kw), sort_keys=False, default_flow_style=False, width=120)
    return HEADER.format(source=source) + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.serve_config", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/deployment.yaml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the Serve config here")
    g.add_argument("--check", type=Path, help="fail when this file differs from what would be generated")
    g.add_argument("--validate", type=Path, help="validate a Serve config's app args and user_configs")
    args = p.parse_args(argv)
    if args.validate:
        problems = validate(yaml.safe_load(args.validate.read_text()))
        for line in problems:
            print(f"{args.validate}: {line}", file=sys.stderr)
        return 1 if problems else 0
    return write_or_check(render(DeploymentConfig.from_file(args.config), source=args.config), args)


def validate(doc: dict[str, Any]) -> list[str]:
    """What a replica would refuse in a Serve config: bad app args, bad or inconsistent user_configs."""
    problems: list[str] = []
    for app in doc.get("applications") or []:
        try:
            DeploymentConfig.from_static(app.get("args", {}).get("config", {}))
        except ConfigError as e:
            problems.append(f"application {app.get('name')!r}: {e}")
        live: dict[str, LiveModel] = {}
        for d in app.get("deployments") or []:
            model = LIVE_MODELS.get(d.get("name"))
            if model is None:
                continue
            try:
                live[d["name"]] = model.from_user_config(d.get("user_config"), d["name"])
            except ConfigError as e:
                problems.append(f"application {app.get('name')!r}: {e}")
        gw, dyn = live.get(GATEWAY_NAME), live.get(DYNAMIC_NAME)
        if (
            isinstance(gw, GatewayLive)
            and isinstance(dyn, DynamicLive)
            and gw.dynamic_adapters != dyn.adapters
        ):
            problems.append(
                f"application {app.get('name')!r}: {GATEWAY_NAME} dynamic_adapters {gw.dynamic_adapters} differ "
                f"from {DYNAMIC_NAME} adapters {dyn.adapters} (both come from dynamic.adapters)"
            )
    return problems


def write_or_check(text: str, args: argparse.Namespace) -> int:
    """``--out``: write the generated file; ``--check``: exit 1 with a diff when the file is stale."""
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
        return 0
    current = args.check.read_text() if args.check.exists() else ""
    if current != text:
        lines = difflib.unified_diff(
            current.splitlines(True), text.splitlines(True), str(args.check), "generated"
        )
        print(
            f"{args.check} is out of date with {args.config}; regenerate with --out:\n{''.join(lines)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
