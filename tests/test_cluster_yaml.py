"""cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own schema)."""

from pathlib import Path

import jsonschema
import yaml


def test_cluster_yaml_matches_ray_schema():
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0")
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_cluster_installs_the_gpu_extra_and_passes_mlflow_to_every_node():
    import tomllib
    from pathlib import Path

    root = Path(__file__).parents[1]
    config = yaml.safe_load((root / "cluster.yaml").read_text())
    assert any("[gpu]" in command for command in config["setup_commands"])
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == ["ray[llm]==2.60.0"]  # pins vLLM to the version Ray 2.60 was tested with
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("MLFLOW_TRACKING_URI=http://" in c and "ray start" in c for c in commands)


def test_cluster_ships_a_token_and_shared_storage_to_every_node():
    root = Path(__file__).parents[1]
    config = yaml.safe_load((root / "cluster.yaml").read_text())
    token = "/home/ray/.ray/auth_token"
    assert config["file_mounts"][token] == "~/.ray/auth_token"  # generated before `ray up`
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "RAY_AUTH_MODE=token" in start and f"RAY_AUTH_TOKEN_PATH={token}" in start
        assert "DISTALIGN_STORAGE=/mnt/distalign/storage" in start
    # The shared mount reaches the container, and MLflow keeps its store on it (not in the container).
    assert any("/mnt/distalign:/mnt/distalign" in option for option in config["docker"]["run_options"])
    server = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert "sqlite:////mnt/distalign/" in server and "--artifacts-destination /mnt/distalign/" in server
