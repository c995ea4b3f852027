"""Distribution specs: what attribute, over which categories, in which contexts, toward which targets.

A spec is a YAML file (format in docs/specs.md). Loading validates everything and resolves targets to
explicit per-context probability vectors, so nothing downstream has to know how a target was given.
"""

from __future__ import annotations

import csv
import math
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distalign_ray.documents import read_yaml_mapping
from distalign_ray.errors import DistalignError

PROBABILITY_TOLERANCE = 1e-3
TEMPLATE_FIELDS = ("context", "region", "categories", "categories_or", "target")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CsvContexts(_Strict):
    """Contexts read from a CSV file (package data `occupations/uk.csv` or a path next to the spec)."""

    csv: str
    column: str = "occupation"
    counts: dict[str, str] | None = Field(default=None, description="category -> CSV column with counts; used by target kind 'counts'")


class Templates(_Strict):
    """Prompt templates. Placeholders: {context} {region} {categories} {categories_or}; the
    prompt-engineering suffix may also use {target} (the target stated in words)."""

    attribute: list[str] = Field(min_length=1, description="attribute-generation templates (v1, v2, ...)")
    held_out: list[str] = Field(
        default_factory=list,
        description="paraphrases of the attribute question that no method trains on, scored as generalisation (optional)",
    )
    story: str = Field(description="story-generation template (v3)")
    prompt_engineering: str = Field(description="suffix appended to a prompt that states the target")

    @field_validator("attribute", "held_out")
    @classmethod
    def _check_attribute(cls, value: list[str]) -> list[str]:
        for template in value:
            _check_placeholders(template, allow_target=False)
        return value

    @field_validator("story")
    @classmethod
    def _check_story(cls, value: str) -> str:
        _check_placeholders(value, allow_target=False)
        return value

    @field_validator("prompt_engineering")
    @classmethod
    def _check_pe(cls, value: str) -> str:
        _check_placeholders(value, allow_target=True)
        return value


def _check_placeholders(template: str, allow_target: bool) -> None:
    import string

    allowed = set(TEMPLATE_FIELDS) - (set() if allow_target else {"target"})
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field not in allowed:
            raise ValueError(f"unknown placeholder {{{field}}} in template {template!r}; allowed: {sorted(allowed)}")


class SpecFile(_Strict):
    """The YAML document as written by a user (before targets are resolved)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]*$")
    description: str = ""
    attribute: str
    region: str = ""
    categories: list[str] = Field(min_length=2)
    answers: dict[str, str] | None = Field(
        default=None, description="category -> canonical answer text (default: the category capitalised)"
    )
    aliases: dict[str, list[str]] = Field(
        default_factory=dict, description="extra whole words that also count as a category when classifying"
    )
    contexts: list[str] | CsvContexts
    target: Literal["uniform", "counts"] | dict[str, float] | dict[str, dict[str, float]]
    samples_per_context: int = Field(default=100, gt=0)
    system_prompt: str = "You are a helpful assistant. Answer briefly."
    templates: Templates

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, value: list[str]) -> list[str]:
        lowered = [c.strip().lower() for c in value]
        if len(set(lowered)) != len(lowered) or any(not c for c in lowered):
            raise ValueError("categories must be non-empty and distinct (case-insensitive)")
        return lowered

    @model_validator(mode="after")
    def _known_categories(self) -> SpecFile:
        for field_name in ("answers", "aliases"):
            mapping = getattr(self, field_name) or {}
            unknown = set(mapping) - set(self.categories)
            if unknown:
                raise ValueError(f"{field_name} names unknown categories {sorted(unknown)}")
        return self


class DistributionSpec(_Strict):
    """A validated spec with explicit targets: `targets[i][k]` is P(category k | context i)."""

    name: str
    description: str
    attribute: str
    region: str
    categories: list[str]
    answers: dict[str, str]
    aliases: dict[str, list[str]]
    contexts: list[str]
    targets: list[list[float]]
    samples_per_context: int
    system_prompt: str
    templates: Templates
    target_kind: str

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def match_terms(self) -> dict[str, list[str]]:
        """What counts as each category in an answer: its canonical answer text and its aliases
        (an answer such as "On foot" for category `on-foot` is that category)."""
        return {c: [self.answers[c], *self.aliases.get(c, [])] for c in self.categories}

    def target_of(self, context: str) -> list[float]:
        return self.targets[self.contexts.index(context)]

    def subset(self, max_contexts: int | None) -> DistributionSpec:
        """The first `max_contexts` contexts (reference order), for small budgets."""
        if not max_contexts or max_contexts >= len(self.contexts):
            return self
        return self.model_copy(update={"contexts": self.contexts[:max_contexts], "targets": self.targets[:max_contexts]})


def _read_csv_contexts(source: CsvContexts, base_dir: Path | None) -> tuple[list[str], list[dict[str, str]]]:
    if base_dir is not None and (base_dir / source.csv).is_file():
        text = (base_dir / source.csv).read_text(encoding="utf-8")
    else:
        packaged = resources.files("distalign_ray.data").joinpath(source.csv)
        if not packaged.is_file():
            raise DistalignError(f"contexts CSV '{source.csv}' not found (next to the spec or in the package)")
        text = packaged.read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or source.column not in rows[0]:
        raise DistalignError(f"contexts CSV '{source.csv}' has no column '{source.column}'")
    return [row[source.column].strip() for row in rows], rows


def _check_distribution(values: list[float], where: str) -> list[float]:
    if any((not math.isfinite(v)) or v < 0 for v in values):
        raise DistalignError(f"{where}: probabilities must be finite and >= 0, got {values}")
    total = sum(values)
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise DistalignError(f"{where}: target probabilities sum to {total:.4f}, not 1")
    return [v / total for v in values]


def _resolve_targets(spec: SpecFile, contexts: list[str], rows: list[dict[str, str]] | None) -> list[list[float]]:
    k = len(spec.categories)
    if spec.target == "uniform":
        # Exactly 1/K (the reference code rounds to 0.333 for three classes; we do not).
        return [[1.0 / k] * k for _ in contexts]
    if spec.target == "counts":
        counts_map = spec.contexts.counts if isinstance(spec.contexts, CsvContexts) else None
        if rows is None or not counts_map:
            raise DistalignError("target 'counts' needs contexts from a CSV with a 'counts' column map")
        missing = set(spec.categories) - set(counts_map)
        if missing:
            raise DistalignError(f"counts map lacks categories {sorted(missing)}")
        targets = []
        for context, row in zip(contexts, rows):
            try:
                counts = [float(row[counts_map[c]]) for c in spec.categories]
            except (KeyError, ValueError) as exc:
                raise DistalignError(f"context '{context}': bad count value ({exc})") from None
            total = sum(counts)
            if total <= 0 or any(c < 0 for c in counts):
                raise DistalignError(f"context '{context}': counts must be >= 0 with a positive total")
            targets.append([c / total for c in counts])
        return targets
    assert isinstance(spec.target, dict)
    first = next(iter(spec.target.values()), None)
    if isinstance(first, dict):  # per-context targets
        unknown = set(spec.target) - set(contexts)
        if unknown:
            raise DistalignError(f"targets given for unknown contexts {sorted(unknown)}")
        missing = [c for c in contexts if c not in spec.target]
        if missing:
            raise DistalignError(f"no target for contexts {missing}")
        return [_distribution_from_mapping(spec.target[c], spec.categories, f"target of '{c}'") for c in contexts]
    shared = _distribution_from_mapping(spec.target, spec.categories, "target")  # one target for all
    return [list(shared) for _ in contexts]


def _distribution_from_mapping(mapping: dict, categories: list[str], where: str) -> list[float]:
    lowered = {str(key).strip().lower(): value for key, value in mapping.items()}
    unknown = set(lowered) - set(categories)
    if unknown:
        raise DistalignError(f"{where}: unknown category {sorted(unknown)[0]!r} (categories: {categories})")
    return _check_distribution([float(lowered.get(c, 0.0)) for c in categories], where)


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "spec"
    return f"invalid spec {origin}: {location}: {first['msg']}"


def spec_from_dict(document: dict, origin: str = "<dict>", base_dir: Path | None = None) -> DistributionSpec:
    if not isinstance(document, dict):
        raise DistalignError(f"invalid spec {origin}: expected a YAML mapping at top level")
    try:
        raw = SpecFile.model_validate(document)
    except ValidationError as exc:
        raise DistalignError(_format_validation_error(exc, origin)) from None
    rows = None
    if isinstance(raw.contexts, CsvContexts):
        contexts, rows = _read_csv_contexts(raw.contexts, base_dir)
    else:
        contexts = [c.strip() for c in raw.contexts]
    if not contexts or len(set(contexts)) != len(contexts):
        raise DistalignError(f"invalid spec {origin}: contexts must be a non-empty list of distinct names")
    targets = _resolve_targets(raw, contexts, rows)
    answers = {c: (raw.answers or {}).get(c, c[:1].upper() + c[1:]) for c in raw.categories}
    return DistributionSpec(
        name=raw.name,
        description=raw.description,
        attribute=raw.attribute,
        region=raw.region,
        categories=raw.categories,
        answers=answers,
        aliases={c: [a.lower() for a in raw.aliases.get(c, [])] for c in raw.categories},
        contexts=contexts,
        targets=targets,
        samples_per_context=raw.samples_per_context,
        system_prompt=raw.system_prompt,
        templates=raw.templates,
        target_kind=raw.target if isinstance(raw.target, str) else "explicit",
    )


def load_spec_file(path: str | Path) -> DistributionSpec:
    path = Path(path)
    return spec_from_dict(read_yaml_mapping(path, "spec"), origin=str(path), base_dir=path.parent)


def builtin_dataset_names() -> list[str]:
    folder = resources.files("distalign_ray.data").joinpath("datasets")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_dataset(name: str) -> DistributionSpec:
    """A built-in dataset by name (see `distalign datasets list`)."""
    names = builtin_dataset_names()
    if name not in names:
        raise DistalignError(f"unknown dataset '{name}'; known: {', '.join(names)}")
    packaged = resources.files("distalign_ray.data").joinpath("datasets", name + ".yaml")
    document = yaml.safe_load(packaged.read_text(encoding="utf-8"))
    return spec_from_dict(document, origin=f"dataset {name}")


def load_spec(dataset: str | None = None, spec_path: str | None = None) -> DistributionSpec:
    if bool(dataset) == bool(spec_path):
        raise DistalignError("give exactly one of --dataset NAME or --spec FILE.yaml")
    return load_dataset(dataset) if dataset else load_spec_file(spec_path)
