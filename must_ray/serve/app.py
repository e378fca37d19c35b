"""The Serve deployment: one HTTP endpoint, an image in, every task's prediction out (docs/serving.md).

``POST`` the image bytes (``image/*`` or ``application/octet-stream``), or JSON ``{"path": FILE}``
naming a file under ``serve.path_roots``; options ``size``, ``tasks``, ``topk`` as query parameters
(or JSON fields). ``GET`` describes the model. The model runs through the labeller's own teacher
(:class:`must_ray.label.teachers.TeacherSet`, ``kind=checkpoint``, thresholds from ``cfg.tasks``),
so a served prediction is the pseudo label a labelling run would write; images from concurrent
requests share one forward pass (``@serve.batch``).
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from must_ray.config import config_from_dict
from must_ray.images import resize_rgb
from must_ray.serve.encode import encode_prediction, map_size
from must_ray.serve.parse import (
    BadRequest,
    body_kind,
    decode_request_image,
    parse_json_body,
    parse_options,
    read_allowed_file,
    read_body,
)


@serve.deployment
class StudentEndpoint:
    """One replica: the model built once, requests parsed and answered, forward passes batched."""

    def __init__(self, cfg_dict: dict, model_path: str):
        import torch

        from must_ray.label.teachers import TeacherSet, TeacherSpec
        from must_ray.models.export import read_model_header
        from must_ray.tasks import build_tasks

        cfg = config_from_dict(cfg_dict)
        self.settings = cfg.serve
        torch.set_num_threads(int(self.settings.torch_threads or max(1, round(self.settings.num_cpus_per_replica))))
        header = read_model_header(model_path)
        self.classes, self.size = list(header["classes"]), int(header["image_size"])
        self.task_names = list(header["tasks"])
        self.tasks = build_tasks(self.task_names, int(header["num_classes"]), cfg.tasks)
        device = "cuda" if self.settings.num_gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        spec = TeacherSpec(self.task_names, "checkpoint", "student", path=model_path)
        self.model = TeacherSet([spec], cfg, self.classes, self.size, device)
        self.info = {"model": model_path, "backbone": header["backbone"], "tasks": self.task_names,
                     "classes": self.classes, "image_size": self.size, "device": device}
        self.predict_batch.set_max_batch_size(self.settings.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            if request.method == "GET":
                return JSONResponse(self.info)
            if request.method != "POST":
                raise BadRequest(405, f"method {request.method} not allowed: POST an image, or GET the model info")
            image, opts = await self._read(request)
            size = map_size(image.shape[:2], opts.size, self.settings.max_map_pixels)
            labels = await self.predict_batch(resize_rgb(image, self.size))
        except BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        tasks = opts.tasks or self.task_names
        predictions = {t: encode_prediction(self.tasks[t], labels[t], self.classes, image.shape[:2], size, opts.topk)
                       for t in tasks}
        return JSONResponse({"image_size": list(image.shape[:2]), "predictions": predictions})

    async def _read(self, request: Request) -> tuple[np.ndarray, Any]:
        s = self.settings
        kind = body_kind(request.headers.get("content-type"))
        body = await read_body(request.stream(), request.headers.get("content-length"), s.max_request_bytes)
        if kind == "json":
            fields = parse_json_body(body)
            opts = parse_options({**request.query_params, **fields}, self.task_names, extra=("path",))
            body = await asyncio.to_thread(read_allowed_file, fields["path"], s.path_roots, s.max_request_bytes)
        else:
            opts = parse_options(request.query_params, self.task_names)
        return await asyncio.to_thread(decode_request_image, body, s.max_image_pixels), opts

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Images (each ``image_size`` square, uint8) from concurrent requests -> one label dict each."""
        out = await asyncio.to_thread(self.model.predict, np.stack(images))
        return [{t: labels[i] for t, labels in out.items()} for i in range(len(images))]


__all__ = ["StudentEndpoint"]
