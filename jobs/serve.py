"""Serve the student on Ray Serve: one HTTP endpoint, an image in, every task's prediction out as JSON.

Examples:
  python jobs/serve.py                                  # the run's student on http://127.0.0.1:8000/
  python jobs/serve.py --model out/student/model.pt --port 8001 --set serve.num_replicas=[1,4]
  ray job submit --working-dir . -- python jobs/serve.py --detach   # a cluster: leave the app running
  curl -s --data-binary @image.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/?size=128'

Replicas, batching and limits come from the config's serve section (docs/serving.md).
The HTTP proxy listens on 127.0.0.1 unless --host / serve.host says otherwise. WARNING: Serve's
HTTP endpoint is not covered by Ray's token auth; another address lets anyone who reaches the
port use the model. Runs until Ctrl-C / SIGTERM, then deletes the application.
"""
import os
import signal
import sys
import time

from must_ray.cli import init_ray, job_parser, load_job_config, run_job
from must_ray.typed_config import ConfigError


def main() -> dict:
    lines = __doc__.splitlines()
    parser = job_parser(lines[0], "\n".join(lines[2:]))
    parser.add_argument("--model", metavar="FILE",
                        help="must-ray model file (default: serve.model, else <paths.root>/<paths.student>/model.pt)")
    parser.add_argument("--host", help="HTTP proxy address (default serve.host = 127.0.0.1; see the warning above)")
    parser.add_argument("--port", type=int, help="HTTP port (default serve.port = 8000)")
    parser.add_argument("--detach", action="store_true",
                        help="deploy and exit, leaving the app on the cluster (needs ray.address / RAY_ADDRESS)")
    args = parser.parse_args()
    flags = {"serve.model": args.model, "serve.host": args.host, "serve.port": args.port}
    cfg = load_job_config(args, [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.detach and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("--detach needs a running cluster (ray.address or RAY_ADDRESS): a local Ray instance "
                          "ends with this job")

    from must_ray.models import check_model_file
    from must_ray.serve.run import served_model_path, start_app, stop_app

    model = served_model_path(cfg)
    check_model_file(model, "--model" if args.model else "serve.model")
    init_ray(cfg, verbose=args.verbose)
    summary = {"job": "serve", **start_app(cfg, model)}
    if args.detach:
        return {**summary, "detached": True}
    print(f"serving {model} at {summary['url']} (Ctrl-C stops)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.time()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop_app(cfg)
    return {**summary, "served_s": round(time.time() - started, 1)}


if __name__ == "__main__":
    run_job(main)
