"""The embedded demo: synthetic screens, a routing adapter and expert adapters on the tiny model.

python -m moe_demo build [--config config/deployment.yaml]   # no-op when up to date; also the tiny
                                                              # document-OCR model (chandra)
python -m moe_demo eval                                       # accuracy table from storage (exact match,
                                                              # and character accuracy for ocr)
python -m moe_demo screenshot calendar out.png                # one held-out screen
python -m moe_demo page out.png                               # one held-out document page (chandra's)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moe_core.config import DeploymentConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moe_demo", description="Build and evaluate the embedded demo."
    )
    p.add_argument("--config", default="config/deployment.yaml")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build base model, routing and expert adapters into storage")
    b.add_argument("--work-dir", type=Path, default=Path(".cache/demo"))
    b.add_argument("--steps-scale", type=float, default=1.0, help="scale training steps (tests use less)")
    b.add_argument("--heldout", type=int, default=50, help="held-out screens per type for the accuracy")
    b.add_argument(
        "--attempts", type=int, default=3, help="training seeds per adapter, best on validation kept"
    )
    e = sub.add_parser("eval", help="routing and expert accuracy of what is deployed")
    e.add_argument("--heldout", type=int, default=50)
    s = sub.add_parser("screenshot", help="write one held-out screen as PNG")
    s.add_argument("kind")
    s.add_argument("out", type=Path)
    s.add_argument("--seed", type=int, default=0)
    pg = sub.add_parser("page", help="write one held-out document page as PNG (the chandra model's input)")
    pg.add_argument("out", type=Path)
    pg.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DeploymentConfig.from_file(args.config)
    if args.cmd == "build":
        from moe_demo import flush_subnormals
        from moe_demo.build import build_demo

        flush_subnormals()  # first: the worker threads take it from this one when they start

        report = build_demo(
            cfg,
            args.work_dir,
            steps_scale=args.steps_scale,
            heldout_per_kind=args.heldout,
            attempts=args.attempts,
        )
        print(report.table())
        if cfg.models_enabled:
            from moe_demo.document import build_document_models

            build_document_models(cfg, args.work_dir)  # further models built here: chandra's OCR model
    elif args.cmd == "eval":
        from moe_demo.build import evaluate_demo

        rows = evaluate_demo(cfg, args.heldout)
        print(
            f"{'adapter':<14} {'role':<8} {'n':>5} {'accuracy':>9} {'characters':>10} "
            f"{'base (no adapter)':>18} {'base characters':>16}"
        )
        for r in rows:
            cells = [
                f"{v:.3f}" if isinstance(v, float) else "-"
                for v in (r.get("char_accuracy"), r.get("base_accuracy"), r.get("base_char_accuracy"))
            ]
            print(
                f"{r['name']!s:<14} {r['role']!s:<8} {r['n']!s:>5} {r['accuracy']:>9.3f} {cells[0]:>10} "
                f"{cells[1]:>18} {cells[2]:>16}"
            )
        print(
            "accuracy: routing, or the expert's exact match; characters: 1 - character error rate (reading)"
        )
    elif args.cmd == "page":
        from moe_demo.pages import page_split

        page = page_split("heldout", args.seed + 1)[args.seed]
        page.image.save(args.out)
        print(f"{args.out}: a document page; its text:\n{page.text}")
    else:
        from moe_demo.screens import split

        screen = split("heldout", args.seed + 1, (args.kind,))[args.seed]
        screen.image.save(args.out)
        print(f"{args.out}: {args.kind}, prompt {screen.prompt!r}, answer {screen.answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
