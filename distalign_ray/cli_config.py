"""A command's config: its `--config` YAML file, then its flags, then `--set path=value`, validated by the
command's pydantic model. Paths are the file's own keys (`finetune.lora.r`), so the YAML, the flags and
`--set` name a field the same way; `distalign config show` prints every field with its default and description.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel, ValidationError

from distalign_ray.documents import flow_yaml, read_yaml_mapping
from distalign_ray.errors import DistalignError

# Commands whose file holds their fields under a section named after them (one file may hold both).
SECTIONS = ("estimate", "finetune")
COMMANDS = ("estimate", "finetune", "quickstart", "compare", "sweep")


def config_model(command: str) -> type[BaseModel]:
    if command == "estimate":
        from distalign_ray.config import EstimateConfig as model
    elif command == "finetune":
        from distalign_ray.config import FinetuneConfig as model
    elif command == "quickstart":
        from distalign_ray.quickstart import QuickstartConfig as model
    elif command == "compare":
        from distalign_ray.compare.grid import CompareConfig as model
    else:
        from distalign_ray.tuning.sweep import SweepConfig as model
    return model


def _assign(document: dict, path: str, value, origin: str) -> None:
    keys = path.split(".")
    if not all(keys):
        raise DistalignError(f"{origin}: '{path}' is not a field path (e.g. finetune.kl_weight)")
    node = document
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise DistalignError(f"{origin}: {'.'.join(keys[: depth + 1])} is a value, not a section")
    node[keys[-1]] = value


def parse_assignment(text: str) -> tuple[str, object]:
    path, sep, raw = text.partition("=")
    if not sep:
        raise DistalignError(f"--set {text}: expected PATH=VALUE, e.g. --set finetune.kl_weight=2")
    try:
        return path.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise DistalignError(f"--set {text}: the value is not valid YAML") from None


def _validation_message(exc: ValidationError, what: str, prefix: str) -> str:
    first = exc.errors()[0]
    where = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"invalid {what}: unknown field {where} (`distalign config show {what.split()[0]}` lists the fields)"
    return f"invalid {what}: {where}: {first['msg']}"


def validate_config(model_cls: type[BaseModel], values, what: str, prefix: str = ""):
    """`values` validated by `model_cls`; the first problem as one error line."""
    if not isinstance(values, dict):
        raise DistalignError(f"invalid {what}: {prefix.rstrip('.') or 'the file'} must be a mapping of fields")
    try:
        return model_cls.model_validate(values)
    except ValidationError as exc:
        raise DistalignError(_validation_message(exc, what, prefix)) from None


def command_config(command: str, path: str | None, flags: dict[str, object], assignments: list[str]) -> tuple[BaseModel, str | None]:
    """(validated config, shared storage named by the file or `--set storage=`, or None)."""
    document = read_yaml_mapping(path, "config") if path else {}
    if path and command in SECTIONS and command not in document:
        found = ", ".join(sorted(map(str, document)))
        raise DistalignError(
            f"config {path} has no `{command}:` section (top-level keys: {found}); put the {command} fields under `{command}:`"
        )
    for field_path, value in flags.items():
        _assign(document, field_path, value, "flag")
    for text in assignments:
        _assign(document, *parse_assignment(text), origin=f"--set {text}")
    storage = document.pop("storage", None)
    if storage is not None and (not isinstance(storage, str) or not storage):
        raise DistalignError("config: storage must be a folder or a URI")
    origin = f"config {path}" if path else "--set"
    if command not in SECTIONS:
        return validate_config(config_model(command), document, f"{command} config"), storage
    for key in document:
        if key not in SECTIONS:
            raise DistalignError(
                f"{origin}: unknown top-level key '{key}': {command} reads its fields under `{command}:` (e.g. --set {command}.{key}=...)"
            )
    values = document.get(command)
    return validate_config(config_model(command), {} if values is None else values, f"{command} config", f"{command}."), storage


def _field_lines(model: BaseModel, indent: str) -> list[str]:
    fields = type(model).model_fields
    groups = getattr(type(model), "GROUPS", {}) or {"": tuple(fields)}
    lines = []
    for group, names in groups.items():
        if group:
            lines.append(f"{indent}# --- {group} ---")
        lines.extend(_value_lines(model, names, indent))
    return lines


def _value_lines(model: BaseModel, names: tuple[str, ...], indent: str) -> list[str]:
    lines = []
    for name in names:
        field = type(model).model_fields[name]
        value = getattr(model, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:{comment}")
            lines.extend(_field_lines(value, indent + "  "))
        else:
            lines.append(f"{indent}{name}: {flow_yaml(value)}{comment}")
    return lines


def show_config(command: str) -> str:
    """The command's config file with every field at its default, described: a valid `--config` file."""
    model = config_model(command)()
    if command in SECTIONS:
        return "\n".join([f"{command}:", *_field_lines(model, "  ")])
    return "\n".join(_field_lines(model, ""))
