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
