"""A real HTTP server for the OpenAI-compatible API tests: the `/v1` router (and the Gradio app where asked) in one
FastAPI application, served by uvicorn on a free loopback port in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(service, *, with_gradio: bool = False, **router_options) -> RunningServer:
    import uvicorn
    from fastapi import FastAPI

    from app.openai_api import openai_router

    app = FastAPI()
    app.include_router(openai_router(service, service.settings, **router_options))
    if with_gradio:
        import gradio as gr

        from app import ui

        demo = ui.build_app(service)
        demo.queue(default_concurrency_limit=4, max_size=64)
        app = gr.mount_gradio_app(app, demo, path="", max_file_size=service.max_upload_bytes, allowed_paths=[])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", server, thread)
