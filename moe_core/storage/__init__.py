"""Shared storage: one interface over local paths and fsspec URLs, with atomic versioned publication.

Layout under the root::

    experts/<name>/<version>/    an expert LoRA adapter (+ deploy_metadata.json, MANIFEST.json)
    experts/<name>/CURRENT       pointer to the version servers load
    router/<name>/<version>/     the routing adapter, same shape
    merged/<name>/<version>/     a merged model (+ merge_metadata.json, MANIFEST.json)
    merged/<name>/CURRENT
    probes/<name>/<version>/     a probe set that verifies merges (probes.json + images)
    state/<name>.json            a small controller state ({"revision": n, "data": ...}), compare-and-swap

A version is written under a fresh name that nothing points to, closed by ``MANIFEST.json`` (sha256 of
every file) written last, re-read and verified, and only then made current by replacing the small
``CURRENT`` pointer in one atomic step (``os.replace`` locally, a single-object PUT on object stores).
A writer killed at any moment therefore leaves the old version current and no version a reader takes.

Pointers and states are written with compare-and-swap (:mod:`moe_core.cas`): a lock file on POSIX roots,
conditional writes (``If-Match`` on the ETag, ``If-None-Match: *``) on S3, checked by a probe write before
the first one. Remote versions are fetched into the node-local cache (:mod:`moe_core.node_cache`), shared
by the replicas on a node and verified against the manifest whenever one is taken.

- :mod:`moe_core.storage.errors`: what storage raises.
- :mod:`moe_core.storage.layout`: kinds, pointer and manifest names, version ids, hashes and checks.
- :mod:`moe_core.storage.base`: the root on its filesystem (fsspec), and its failures as storage errors.
- :mod:`moe_core.storage.reading`: names, versions, manifests, and fetching a version.
- :mod:`moe_core.storage.writing`: publishing a version, moving ``CURRENT``, rolling back, pruning.
- :mod:`moe_core.storage.store`: :class:`~moe_core.storage.store.Storage`, all of the above and the
  controllers' states.
"""
