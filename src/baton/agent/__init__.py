"""The per-node agent (``baton agent``): control socket, metrics, structured logs and the ownership watch.

Modules: :mod:`core` (the Agent), :mod:`watcher` (watch mode), :mod:`metrics` (Prometheus rendering),
:mod:`control` (RUN_DIR/agent.sock), :mod:`logs` (text / JSON-lines logging).
"""
