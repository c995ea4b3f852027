"""The YAML users hand us (specs, configs): reading a file, where every way it can be wrong is one error
line, and writing one value on one line (config listings, `--set` flags)."""

from __future__ import annotations

from pathlib import Path

import yaml

from distalign_ray.errors import DistalignError

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # specs and configs are a few KB; a bigger file is the wrong file


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The file's top-level YAML mapping. `what` names the file in errors ("spec", "config")."""
    path = Path(path)
    if path.is_dir():
        raise DistalignError(f"{what} {path} is a folder, not a YAML file")
    if not path.is_file():
        raise DistalignError(f"{what} file not found: {path}")
    size = path.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise DistalignError(f"{what} {path} is {size / 2**20:.0f} MiB; a {what} is a small YAML file (at most 4 MiB)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DistalignError(f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise DistalignError(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DistalignError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if document is None:
        raise DistalignError(f"{what} {path} is empty")
    if not isinstance(document, dict):
        raise DistalignError(f"{what} {path}: expected a YAML mapping at top level, found {type(document).__name__}")
    return document


def flow_yaml(value) -> str:
    """`value` as one line of YAML (flow style), quoted as a flow collection's item needs."""
    return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1]
