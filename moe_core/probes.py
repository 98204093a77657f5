"""Probe sets: the screenshots and prompts a merge is verified on, kept in storage under ``probes/<name>/``.

A probe set is a folder with ``probes.json`` (``{"probes": [{"image": "0.png", "prompt": "..."}]}``)
and the image files it names, published like any other version (atomic, with a manifest). A merge
of adapter ``A`` uses ``probes/A/`` when it exists, else the configured default set
(``merge.probe_set``); with neither it is refused. Production probes are screenshots of the screens
the adapter serves; the embedded demo publishes its own held-out screens.

    python -m moe_core.probes publish calendar path/to/folder    # folder holds probes.json + images
    python -m moe_core.probes list
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from moe_core.config import DeploymentConfig
from moe_core.storage.errors import StorageError
from moe_core.storage.store import Storage

__all__ = ["PROBES_FILE", "Probe", "load_probes", "publish_probes", "read_probe_folder", "write_probe_folder"]

PROBES_FILE = "probes.json"

Probe = tuple[Image.Image, str]  # (screenshot, prompt)


def write_probe_folder(folder: Path, probes: Sequence[Probe]) -> Path:
    """Write ``probes`` as PNG files and ``probes.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (image, prompt) in enumerate(probes):
        image.save(folder / f"{i:04d}.png")
        entries.append({"image": f"{i:04d}.png", "prompt": prompt})
    (folder / PROBES_FILE).write_text(json.dumps({"probes": entries}, indent=2))
    return folder


def read_probe_folder(folder: Path) -> list[Probe]:
    """Read a probe folder; raise :class:`StorageError` naming what is wrong."""
    try:
        entries = json.loads((folder / PROBES_FILE).read_text())["probes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"{folder}: no readable {PROBES_FILE} ({e})") from e
    probes: list[Probe] = []
    for k, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("prompt"), str)
            or not entry["prompt"].strip()
        ):
            raise StorageError(f"{folder}/{PROBES_FILE}: probe {k} needs a non-empty prompt")
        name = str(entry.get("image", ""))
        path = (folder / name).resolve()
        if not name or path.parent != folder.resolve():
            raise StorageError(f"{folder}/{PROBES_FILE}: probe {k} names image {name!r} outside the folder")
        try:
            with Image.open(path) as im:
                probes.append((im.convert("RGB"), entry["prompt"]))
        except OSError as e:
            raise StorageError(f"{path}: probe {k} is not a readable image ({e})") from e
    if not probes:
        raise StorageError(f"{folder}/{PROBES_FILE}: no probes")
    return probes


def publish_probes(storage: Storage, name: str, probes: Sequence[Probe]) -> str:
    """Publish ``probes`` as the current version of probe set ``name``; returns the version."""
    with tempfile.TemporaryDirectory(prefix="moe-probes-") as tmp:
        return storage.publish("probes", name, write_probe_folder(Path(tmp), probes))


def load_probes(storage: Storage, adapter: str, default: str, n: int) -> tuple[str, list[Probe]]:
    """The first ``n`` probes of ``probes/<adapter>/``, else of ``probes/<default>/``; (set name, probes)."""
    for name in dict.fromkeys((adapter, default)):
        if storage.current_version("probes", name) is not None:
            return name, read_probe_folder(storage.fetch("probes", name)[0])[:n]
    raise StorageError(
        f"no probe set for adapter {adapter!r}: publish one as probes/{adapter}/ or probes/{default}/ "
        f"(python -m moe_core.probes publish NAME FOLDER); a merge is never published unverified"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_core.probes", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/deployment.yaml")
    sub = p.add_subparsers(dest="cmd", required=True)
    pub = sub.add_parser("publish", help="publish a folder (probes.json + images) as probe set NAME")
    pub.add_argument("name")
    pub.add_argument("folder", type=Path)
    sub.add_parser("list", help="list the probe sets in storage")
    args = p.parse_args(argv)
    cfg = DeploymentConfig.from_file(args.config)
    storage = Storage.from_config(cfg.storage)
    try:
        if args.cmd == "publish":
            probes = read_probe_folder(args.folder)
            print(f"{args.name}: {len(probes)} probes, version {publish_probes(storage, args.name, probes)}")
        else:
            for name in storage.names("probes"):
                print(f"{name:<16} {storage.current_version('probes', name)}")
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
