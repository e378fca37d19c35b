"""Ray's own log noise, off by default; the jobs' ``--verbose`` keeps Ray's defaults.

Quiet means, with Ray 2.60's own switches: no Ray Data execution plan per dataset
(``DataContext.print_on_execution_start``), no Ray Data progress bars or their periodic dumps
into a non-interactive log (``DataContext.enable_progress_bars``; the project draws its own
progress line per step), no Ray Data INFO lines on the console (its ``ray-data.log`` file keeps
them), no Ray Train ``Reporting training result ...`` line per report (a worker-process setup
hook raises that logger to WARNING), no Ray Train INFO lines on the console from its controller
and workers (``RunConfig(logging_config=LoggingConfig(log_level=...))``, :func:`train_log_level`;
Ray Train's system log files keep everything), no Ray Data INFO lines from Ray Data's own actors
(the data coordinator of a training run: the setup hook), and no token-authentication notice on every start of a
local cluster (Ray enables token authentication by default and says so each time; the notice's
logger is raised to ERROR, the behaviour stays Ray's), and no warning per second from Ray Train's
placement-group cleaner that it cannot reach Ray's state API (a local instance runs without the
dashboard that serves it, and goes down with its driver, placement groups included; the setup hook
raises that logger to ERROR). The hook also gives every worker its own cluster's address
(``RAY_ADDRESS``), so Ray's state-API clients in workers never stop at "found multiple active Ray
instances" when a developer runs two. Warnings and errors of every worker still reach the driver.
Importing this module imports no Ray.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

SETUP_HOOK = "must_ray.ray_logs.quiet_worker"
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TRAIN_REPORT_LOGGER_FILE = os.path.join("train", "v2", "_internal", "execution", "context.py")
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray(verbose: bool, local: bool) -> Optional[dict[str, Any]]:
    """Turn Ray's log noise off in this driver (unless ``verbose``); returns the ``runtime_env``
    for ``ray.init`` that quiets the worker processes too (None when there is nothing to add).
    ``local``: this process starts its own Ray (then Ray's token-auth notice is silenced)."""
    if verbose:
        return None
    if local:
        logging.getLogger(TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    from ray.data import DataContext
    from ray.util.debug import log_once

    global _QUIET
    _QUIET = True
    ctx = DataContext.get_current()
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # Ray Data's one-time notice that bars are off
    _quiet_ray_data_console()
    if _job_sets_setup_hook():
        return None
    return {"worker_process_setup_hook": SETUP_HOOK}


_QUIET = False


def train_log_level() -> str:
    """The console level of Ray Train's own logs for this driver's runs: WARNING once
    :func:`quiet_ray` quieted Ray, else Ray's default INFO."""
    return "WARNING" if _QUIET else "INFO"


def _quiet_ray_data_console() -> None:
    """Ray Data's console handler to WARNING in this process (its log file keeps INFO)."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers, which this then adjusts

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def quiet_worker() -> None:
    """Ray worker-process setup hook: Ray Train's per-report INFO line, its placement-group
    cleaner's state-API warnings and Ray Data's console INFO lines off (other warnings stay); the
    worker's own cluster address in ``RAY_ADDRESS`` for Ray's state-API clients."""
    import ray

    path = os.path.join(os.path.dirname(ray.__file__), TRAIN_REPORT_LOGGER_FILE)
    logging.getLogger(path).setLevel(logging.WARNING)
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    worker = ray._private.worker.global_worker
    if worker.mode == ray.WORKER_MODE and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    _quiet_ray_data_console()


def _job_sets_setup_hook() -> bool:
    """True when ``ray job submit`` gave this driver a runtime env with its own setup hook (Ray
    refuses to merge two)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    try:
        injected = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    except json.JSONDecodeError:
        return False
    env = injected.get("runtime_env") or {}
    return isinstance(env, dict) and "worker_process_setup_hook" in env
