"""A short, bounded load test of the served student (docs/serving.md): requests/s and latency.

  python docs/examples/serve_load.py --model out/demo/student/model.pt --concurrency 8 --duration 20

Starts a local Ray instance and the Serve application (jobs/configs/demo.yaml + --set), sends
world images as PNG bytes from ``--concurrency`` client threads for ``--duration`` seconds (or
``--requests`` requests, whichever ends first), then deletes the app. Prints one JSON line.
"""
import argparse
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import requests
from PIL import Image
from ray import serve

from must_ray.cli import DEFAULT_CONFIG
from must_ray.config import load_config
from must_ray.serve.run import start_app
from must_ray.world.render import render_scenes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override, e.g. serve.max_batch_size=8")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(DEFAULT_CONFIG, [f"serve.port={port}"] + args.overrides)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    url = start_app(cfg, args.model)["url"]
    bodies = []
    for scene in render_scenes(0, range(800_000, 800_032), image_size=64, domain="default"):
        buf = io.BytesIO()
        Image.fromarray(scene["image"]).save(buf, "PNG")
        bodies.append(buf.getvalue())
    session = requests.Session()
    session.post(url, data=bodies[0], headers={"Content-Type": "image/png"}, timeout=60).raise_for_status()  # warm
    deadline, latencies, errors = time.time() + args.duration, [], 0

    def one(i: int) -> None:
        nonlocal errors
        if time.time() > deadline:
            return
        t0 = time.perf_counter()
        r = requests.post(url, data=bodies[i % len(bodies)], headers={"Content-Type": "image/png"}, timeout=60)
        latencies.append(time.perf_counter() - t0)
        errors += r.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    serve.shutdown()
    ms = np.array(latencies) * 1000.0
    print(json.dumps({"requests": len(ms), "errors": errors, "concurrency": args.concurrency, "wall_s": round(wall, 2),
                      "requests_per_s": round(len(ms) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
                      "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_batch_size": cfg.serve.max_batch_size,
                      "replicas": cfg.serve.num_replicas}))


if __name__ == "__main__":
    main()
