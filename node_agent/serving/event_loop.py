"""The agent's event loop: uvloop where it is installed (every Linux install of the agent
has it), else asyncio's own.

Per request the loop thread parses HTTP, runs the handler and writes the answer; uvloop's
transports and timers (libuv, in C) take less of that thread than asyncio's selector loop
(measured with bench.peers' harness on the MLP at 5,000 requests/s: the agent's loop thread
144 us of CPU per request against 162), and the loop thread is what bounds a small model's
requests per second. Behaviour is the same: both implement asyncio's event loop API."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the agent: uvloop's if installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
