"""moe_core: the shared core of moe-inference-server (config, storage, model loading, engine, registry).

Imports no Ray Serve code; both ``deployments`` and ``merge_jobs`` build on it. Import from the
submodules (``moe_core.config``, ``moe_core.engine``, ...): the package itself imports nothing, so
``python -m moe_core.registry`` runs its module once.
"""
