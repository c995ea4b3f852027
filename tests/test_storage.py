"""Shared storage: folders published once by content, complete or absent, fetched to a node's cache;
URIs go through pyarrow filesystems (a file:// URI stands in for a bucket here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distalign_ray import storage
from distalign_ray.adapters import adapter_on_this_node, publish_adapter, read_adapter_meta, write_adapter_meta
from distalign_ray.errors import DistalignError


def _adapter(folder: Path, weights: bytes = b"w1") -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    write_adapter_meta(folder, {"categories": ["male", "female"], "steering_token_ids": [32, 33]})
    return folder


def test_one_machine_needs_no_copies(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.STORAGE_ENV, raising=False)
    monkeypatch.setenv("DISTALIGN_HOME", str(tmp_path / "home"))
    adapter = _adapter(tmp_path / "a")
    assert storage.storage_root() == str(tmp_path / "home")
    assert publish_adapter(adapter) == str(adapter)


@pytest.mark.parametrize("as_uri", [False, True])
def test_publish_copies_once_by_content_and_nodes_fetch_it(tmp_path, monkeypatch, as_uri):
    root = (tmp_path / "shared").as_uri() if as_uri else str(tmp_path / "shared")
    monkeypatch.setenv(storage.STORAGE_ENV, root)
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "node-cache"))
    adapter = _adapter(tmp_path / "head-only" / "steered")
    published = publish_adapter(adapter)
    assert published.startswith(root) and "/adapters/steered-" in published
    assert publish_adapter(adapter) == published  # same content: no second copy
    assert len(list((tmp_path / "shared" / "adapters").iterdir())) == 1
    assert read_adapter_meta(published)["steering_token_ids"] == [32, 33]
    local = Path(adapter_on_this_node(published))
    assert (local / "adapter_model.safetensors").read_bytes() == b"w1"
    if as_uri:  # fetched into the node's cache, once
        assert tmp_path / "node-cache" in local.parents
        assert adapter_on_this_node(published) == str(local)
    (adapter / "adapter_model.safetensors").write_bytes(b"w2")  # new content: a new location
    assert publish_adapter(adapter) != published
    assert publish_adapter(published) == published  # already in storage


def test_a_uri_folder_without_its_marker_is_never_read(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTALIGN_CACHE", str(tmp_path / "cache"))
    half = tmp_path / "bucket" / "half"
    _adapter(half)  # files present, completion marker missing: an interrupted upload
    with pytest.raises(DistalignError, match="incomplete"):
        storage.local_folder(half.as_uri())
    assert not [p for p in (tmp_path / "cache" / "storage").iterdir() if p.is_dir()]  # no folder, only its lock


def test_a_path_this_node_cannot_see_is_one_clear_error(tmp_path):
    with pytest.raises(DistalignError, match="not visible on node .*shared storage"):
        adapter_on_this_node(str(tmp_path / "only-on-the-head"))


def test_storage_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DistalignError, match="not writable"):
        storage.use_storage(str(tmp_path / "file" / "below-a-file"))
    with pytest.raises(DistalignError, match="cannot be opened|not writable"):
        storage.use_storage("nosuchscheme://bucket/prefix")


def test_cli_storage_flag_and_config_key(tmp_path, monkeypatch):
    """`--storage` wins over a config file's `storage:`, which wins over DISTALIGN_STORAGE."""
    from distalign_ray.cli import build_parser, load_config

    monkeypatch.setenv(storage.STORAGE_ENV, str(tmp_path / "env"))
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {tmp_path / 'from-config'}\nfinetune: {{epochs: 2}}\n")
    argv = ["finetune", "--dataset", "gender-uk-real", "--output", "o", "--config", str(config)]
    assert load_config(build_parser().parse_args(argv), "finetune").epochs == 2
    assert storage.storage_root() == str(tmp_path / "from-config")
    load_config(build_parser().parse_args(["--storage", str(tmp_path / "flag"), *argv]), "finetune")
    assert storage.storage_root() == str(tmp_path / "flag")
