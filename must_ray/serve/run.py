"""Start the Serve application from the config: the HTTP proxy's address, the replicas (fixed or
autoscaled), batching; and stop it. ``jobs/serve.py`` is the command."""
from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from ray import serve

from must_ray.config import Config, ServeConfig
from must_ray.io import MODEL_FILE
from must_ray.serve.app import StudentEndpoint
from must_ray.typed_config import config_to_dict

log = logging.getLogger("must_ray.serve")


def served_model_path(cfg: Config) -> str:
    """The model file the application serves: ``serve.model``, else the run's student."""
    return cfg.serve.model or os.path.join(cfg.paths.resolve("student"), MODEL_FILE)


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from ``serve``: resources, requests in flight, and a fixed replica
    count (``num_replicas: [n, n]``) or autoscaling between ``[min, max]``."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
        "max_ongoing_requests": s.max_ongoing_requests,
    }
    low, high = s.num_replicas
    if low == high:
        options["num_replicas"] = low
    else:
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": s.target_ongoing_requests}
    return options


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_app(cfg: Config, model_path: str) -> dict[str, Any]:
    """Deploy ``model_path`` as application ``serve.app_name`` behind an HTTP proxy on
    ``serve.host:serve.port`` (Ray must be initialised); returns once every replica is ready.
    Serve's HTTP options are cluster-wide: a Serve instance already running keeps its own."""
    s = cfg.serve
    if not is_loopback(s.host):
        log.warning("serve.host=%s: the endpoint accepts connections from other machines, and Serve's HTTP is not "
                    "covered by Ray's token auth; put it behind an authenticating proxy (docs/serving.md)", s.host)
    serve.start(http_options={"host": s.host, "port": s.port})
    app = StudentEndpoint.options(**deployment_options(s)).bind(config_to_dict(cfg), model_path)
    serve.run(app, name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    return {"url": f"http://{s.host}:{s.port}{s.route_prefix}", "app": s.app_name, "model": model_path,
            "replicas": list(s.num_replicas), "max_batch_size": s.max_batch_size}


def stop_app(cfg: Config) -> None:
    """Delete application ``serve.app_name`` (Serve itself keeps running for other applications)."""
    serve.delete(cfg.serve.app_name)


__all__ = ["start_app", "stop_app", "deployment_options", "served_model_path", "is_loopback"]
