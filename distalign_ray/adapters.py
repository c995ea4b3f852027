"""Adapter folders written by `distalign finetune`: the peft files plus `distalign_meta.json`
(steering ids, categories, dataset, base model, loss mode). An adapter may live in a local folder,
a shared folder or a storage URI (s3://...); readers on any node go through `storage`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distalign_ray import storage
from distalign_ray.errors import DistalignError

META_FILE = "distalign_meta.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_meta(adapter: str | os.PathLike) -> dict:
    location = storage.normalize(adapter)
    meta = storage.join(location, META_FILE)
    if not storage.exists(meta):
        raise DistalignError(f"{adapter} is not a distalign adapter folder (missing {META_FILE})")
    return json.loads(storage.read_text(meta))


def write_adapter_meta(folder: str | os.PathLike, meta: dict) -> None:
    Path(folder, META_FILE).write_text(json.dumps(meta, indent=2))


def adapter_on_this_node(adapter: str | None) -> str | None:
    """A local folder holding `adapter` on the node that calls this (see `storage.local_folder`)."""
    return None if adapter is None else str(storage.local_folder(storage.normalize(adapter)))


def publish_adapter(adapter: str | os.PathLike | None) -> str | None:
    """The adapter's location as workers on any node can read it (copied to storage if needed)."""
    return None if adapter is None else storage.publish_folder(adapter, "adapters")
