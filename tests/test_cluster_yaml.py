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
