"""Which code a received file may make tvsprune run: none.

A pruned artifact records the spec of its base model. When that spec names code (a
``file.py:Name`` or ``module:Name``), loading the artifact would import and call whatever
the file's metadata says, so a file received from someone else could choose code to run.
The recorded spec is therefore used only when

- the user names the base model (``--base-model``, the config's ``[model]``, the API's
  ``base=``): their spec is used, not the recorded one; or
- the artifact was written by ``tvsprune prune`` for this user on this machine: prune
  remembers the sha256 of the weights file it wrote, with the spec and the sha256 of the
  model source, in a per-user folder (``$TVSPRUNE_HOME``, default ``~/.cache/tvsprune``),
  which no received file can write.

Specs that name no code (the built-in zoo, ``torchvision:NAME`` / ``timm:NAME`` registry
names) load as recorded.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..artifacts import home

TRUST_DIR = "trusted-artifacts"


def remember(weights_sha256: str, spec: str, kwargs: dict[str, Any], source_sha256: str | None) -> None:
    """Record that this user pruned the artifact whose weights hash to ``weights_sha256`` from ``spec``."""
    from ..artifacts import write_json

    folder = home() / TRUST_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(folder / f"{weights_sha256}.json",
                   {"spec": spec, "kwargs": kwargs, "source_sha256": source_sha256})
    except OSError:  # an unwritable home: the artifact then loads with --base-model only
        import logging

        logging.getLogger(__name__).warning("cannot record the pruned artifact in %s: loading it later will need "
                                            "--base-model", folder)


def recorded(weights_sha256: str) -> dict[str, Any] | None:
    """What :func:`remember` kept for these weights, or None (not pruned here, or by someone else)."""
    path = home() / TRUST_DIR / f"{weights_sha256}.json"
    try:
        if path.stat().st_uid != os.getuid():
            return None
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("spec"), str) else None
