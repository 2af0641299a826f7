"""``deltaw serve``: one base model, many LoRA adapters, one OpenAI-compatible HTTP server (issue 5).

    server = DeltawServer(model, tokenizer, "adapters/", ServeSettings(max_batch_size=32))
    with ServerThread(server) as url:                       # or: deltaw serve --base DIR --adapters DIR
        httpx.post(url + "/v1/completions", json={"model": "tech", "prompt": "Hello", "temperature": 0})

Each request names its adapter in ``model``; concurrent requests for different adapters decode in the same
forward steps (continuous batching with per-row adapters, ``deltaw.batching.per_row``). See ``engine`` for the
KV-cache layout, ``scheduler`` for the loop, ``adapters`` for on-demand loading, LRU and path safety, ``app`` for
the routes. FastAPI and uvicorn are imported only when this package is (``pip install 'deltaw[serve]'``).
"""

from .errors import APIError
from .server import DeltawServer, ServerThread, load_base, run_server
from .settings import ServeSettings

__all__ = ["DeltawServer", "ServerThread", "ServeSettings", "APIError", "load_base", "run_server"]
