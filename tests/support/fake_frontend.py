"""A gunicorn app for host tests behind the real proxy (support.serving): the front end with
the fake bridge, its volume scripted by support.bridge.Kernel. An open mounts it, in this
worker's memory (the stack runs one worker)."""

from __future__ import annotations

from support.bridge import FakeBridge, Kernel

from luksctl.api import create_frontend_app, frontend


def create():
    kernel = Kernel()
    frontend.volume_status = kernel.volume_status  # what tests/api's `kernel` fixture patches
    return create_frontend_app(bridge=FakeBridge(kernel))
