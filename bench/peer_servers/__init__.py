"""The servers bench.peers puts side by side: how each is installed, configured and started.

`PEERS` lists them; each one's `start` launches its server on loopback for every model and
returns the `Target`s to load (one per model and request format). The `*_app.py`,
`torchserve_handler.py` and `mlserver_runtime.py` files beside this one run inside the peers'
own virtualenvs (they import the peer, never this project).
"""
