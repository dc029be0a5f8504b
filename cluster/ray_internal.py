"""Every private Ray API moeshard uses (``ray._private.*``, ``ray._raylet.*``, ``ray.autoscaler._private``).

Private APIs change between Ray releases without notice, so they live here only, behind one
version check: importing this module with a Ray outside ``SUPPORTED`` (the range the suite was
run with, and what pyproject.toml pins) raises :class:`RayVersionError` instead of failing later
with an AttributeError deep inside a cluster run. Widen the range only after running the test
suite on the new release.

Why the range starts where it does: token authentication (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN_PATH``) arrived in Ray 2.52.0 and was turned on by default for local clusters
in 2.59.0; the tests rely on both, and 2.60.0 is the release they were run with.
"""
from __future__ import annotations

import re
from typing import Any

import ray

from .errors import ClusterError

#: Ray releases this module (and moeshard) is tested with: ``MIN <= (major, minor) < MAX``.
SUPPORTED_MIN = (2, 60)
SUPPORTED_MAX = (2, 61)
#: The same range as a pip specifier, as pyproject.toml must spell it.
SUPPORTED = f">={SUPPORTED_MIN[0]}.{SUPPORTED_MIN[1]},<{SUPPORTED_MAX[0]}.{SUPPORTED_MAX[1]}"


class RayVersionError(ClusterError):
    """The installed Ray is outside the range moeshard's private-API uses are tested with."""


def check_version(version: str) -> None:
    """Raise :class:`RayVersionError` unless Ray ``version`` is in ``SUPPORTED``."""
    m = re.match(r"^(\d+)\.(\d+)", version)
    if m is None or not SUPPORTED_MIN <= (int(m.group(1)), int(m.group(2))) < SUPPORTED_MAX:
        raise RayVersionError(f"ray {version} is installed but moeshard is tested with ray{SUPPORTED} "
                              f"(it uses private Ray APIs): pip install 'ray[default]{SUPPORTED}'")


check_version(ray.__version__)


def reload_auth() -> None:
    """Make Ray re-read its auth mode and token from the environment (both are cached per process)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


def gcs_node_states(address: str, timeout_s: float = 5.0) -> dict[str, bool]:
    """``{node ip: alive}`` for every node the GCS at ``address`` knows, without ``ray.init``.

    A dead and a live node may share an IP (a host restarted): the live one wins. Raises Ray's own
    error (e.g. ``AuthenticationError``) if the GCS refuses this process."""
    from ray._raylet import GcsClient

    alive: dict[str, bool] = {}
    for info in GcsClient(address=address).get_all_node_info(timeout=timeout_s).values():
        ip = info.node_manager_address
        alive[ip] = alive.get(ip, False) or info.state == 0   # 0 = ALIVE in GcsNodeInfo.GcsNodeState
    return alive


def available_resources_per_node() -> dict[str, dict[str, float]]:
    """``{node id: resources free now}`` of the connected cluster."""
    from ray._private.state import available_resources_per_node as per_node

    return per_node()


def bootstrap_address(address: str = "auto") -> str | None:
    """The GCS host:port ``ray.init(address=address)`` would use ("auto": the cluster recorded on this
    machine or ``RAY_ADDRESS``); None if Ray cannot tell."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's cluster-launcher checks on a ``ray up`` config: schema and consistency, then again after
    filling the provider's defaults; returns the filled config."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)
    filled = prepare_config(copy.deepcopy(config))
    validate_config(filled)
    return filled


def ensure_address_file_dir() -> None:
    """Create the folder of Ray's default address file (``/tmp/ray``): ``ray.cluster_utils.Cluster``
    writes ``ray_current_cluster`` there whatever temp dir its nodes use, and fails with
    FileNotFoundError on a machine where no Ray has started with the default temp dir yet."""
    import os

    os.makedirs(os.path.dirname(ray._private.utils.get_ray_address_file(None)), exist_ok=True)
