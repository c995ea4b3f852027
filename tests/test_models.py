"""Model registry: aliases, local folders, errors, and the lock-protected embedded conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distalign_ray.errors import DistalignError
from distalign_ray.models import resolve_model


def test_local_folder_and_hub_id(tiny_model_path):
    ref = resolve_model(tiny_model_path)
    assert ref.is_local and ref.path == tiny_model_path
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not hub.is_local


def test_unknown_and_unreadable_models(tmp_path):
    with pytest.raises(DistalignError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DistalignError, match="is not a Hugging Face model folder"):
        resolve_model(str(tmp_path))


@pytest.mark.slow
def test_concurrent_conversion_happens_once_and_atomically(tmp_path):
    """Two processes resolve the embedded alias into an empty cache at once: one converts, the other
    waits on the lock; the result is one complete folder and no temp leftovers."""
    env = dict(os.environ, DISTALIGN_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    code = (
        "from distalign_ray.models import resolve_model, load_model;"
        "r = resolve_model('smollm2-135m'); m = load_model(r);"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert [o[0].strip() for o in outputs] == ["134515008", "134515008"]
    folder = tmp_path / "models"
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m"]
    config = json.loads((folder / "smollm2-135m" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
