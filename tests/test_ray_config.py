"""ray_config.yaml is a valid Ray cluster-launcher config (schema shipped in the ray wheel); the Ray pin
and the one module allowed to use private Ray APIs (cluster/ray_internal.py) agree."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
import ray.autoscaler

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_config.yaml"
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
    from cluster import ray_internal

    ray_internal.validate_cluster_config(copy.deepcopy(config))


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


def test_ray_pin_is_the_range_ray_internal_accepts():
    """pyproject.toml pins exactly the range cluster/ray_internal.py checks, and the installed Ray is in it."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from cluster import ray_internal

    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    (pin,) = [d for d in deps if d.name == "ray"]
    assert pin.specifier == SpecifierSet(ray_internal.SUPPORTED), (str(pin.specifier), ray_internal.SUPPORTED)
    assert ray.__version__ in pin.specifier


@pytest.mark.parametrize("version", ["2.59.0", "2.61.0", "2.6.0", "3.0.0.dev0", "nightly"])
def test_untested_ray_is_refused_with_a_clear_error(version):
    from cluster import ray_internal

    with pytest.raises(ray_internal.RayVersionError) as err:
        ray_internal.check_version(version)
    msg = str(err.value)
    assert "\n" not in msg and f"ray {version} " in msg and f"pip install 'ray[default]{ray_internal.SUPPORTED}'" in msg


def test_tested_ray_is_accepted():
    from cluster import ray_internal

    for version in ("2.60.0", "2.60.2", "2.60.0rc1", ray.__version__):
        ray_internal.check_version(version)


#: Files that still import a private Ray API themselves, waiting for their owner to switch to
#: cluster/ray_internal.py (cluster/connect.py: resolve_auto -> ray_internal.bootstrap_address).
_NOT_YET_SWITCHED: set[str] = set()


def test_private_ray_apis_only_in_ray_internal():
    """One module may touch ray._private / ray._raylet / ray.autoscaler._private: the one with the version check."""
    private = re.compile(r"\bray\.(?:[a-z_]+\.)*_(?:private|raylet)\b")
    offenders = []
    for path in sorted(REPO.glob("*/**/*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.split("/")[0] in (".venv", "build") or rel in ("cluster/ray_internal.py", "tests/test_ray_config.py"):
            continue
        offenders += [f"{rel}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert [o for o in offenders if o.split(":")[0] not in _NOT_YET_SWITCHED] == [], offenders
    assert {o.split(":")[0] for o in offenders} == _NOT_YET_SWITCHED, "switched: drop it from _NOT_YET_SWITCHED"
