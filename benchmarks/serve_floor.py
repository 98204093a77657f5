"""Ray Serve's own floor for an /infer request's shape, measured beside the real app by
:mod:`benchmarks.serve_bench`.

No ``from __future__ import annotations`` here: FastAPI reads the route's annotations as objects.
"""

from typing import Any

from fastapi import FastAPI, Request
from ray import serve

__all__ = ["floor_app"]


def floor_app() -> Any:
    """Ray Serve's own floor for our request's shape: a FastAPI ingress that reads the same JSON body and
    makes one handle call to a deployment that returns at once, answered as JSON. Nothing of ours runs,
    so what it costs is what any two-deployment Serve graph pays on this machine."""
    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def __call__(self, n: int) -> int:
            return n

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class Edge:
        def __init__(self, echo: Any) -> None:
            self.echo = echo

        @api.post("/infer")
        async def infer(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            return {"task_output": str(await self.echo.remote(len(body)))}

    return Edge.bind(Echo.bind())  # type: ignore[attr-defined]  # Serve's decorator adds bind
