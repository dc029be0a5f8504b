"""ray_config.yaml is a valid Ray cluster-launcher config (schema shipped in the ray wheel)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler

CONFIG = Path(__file__).resolve().parents[1] / "ray_config.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_config_validates_against_ray_schema(config, validator):
    errors = sorted(validator.iter_errors(config), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_config_passes_rays_own_checks(config):
    """Ray's launcher path: fill provider defaults, then its schema + consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_config_content(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"].get("expert_shard", 0) >= 1 for t in workers)
    assert types[config["head_node_type"]]["resources"].get("expert_shard", 0) == 0
    assert any("pip install -e ." in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c)


def _broken(config: dict) -> list[tuple[str, dict]]:
    out = []
    c = copy.deepcopy(config)
    del c["provider"]
    out.append(("no provider", c))
    c = copy.deepcopy(config)
    c["available_node_types"]["expert_worker"]["resources"]["expert_shard"] = "one"
    out.append(("non-integer resource", c))
    c = copy.deepcopy(config)
    del c["available_node_types"]["expert_worker"]["node_config"]
    out.append(("node type without node_config", c))
    c = copy.deepcopy(config)
    c["worker_start_commands"] = c.pop("worker_start_ray_commands")
    out.append(("misspelt key", c))
    c = copy.deepcopy(config)
    c["setup_commands"] = "pip install -e ."
    out.append(("commands not a list", c))
    return out


@pytest.mark.parametrize("case", range(5))
def test_broken_copies_fail(config, validator, case):
    what, broken = _broken(config)[case]
    assert list(validator.iter_errors(broken)), f"{what}: should not validate"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, validator.schema)
