"""A node-local cache of versions fetched from a remote storage root, shared by the replicas on one node.

Layout under the cache directory (a hostPath or local NVMe volume in Kubernetes)::

    blobs/<sha256>          one file per distinct content, verified as it was downloaded
    versions/<key>/         a fetched version: hard links to its blobs, MANIFEST.json written last;
                            <key> is the sha256 of the manifest's file table, so a version whose content
                            is already on the node (under any name) is never downloaded again
    locks/<key>.fill        flock, exclusive: one process downloads or repairs a version, the others wait
    locks/<key>.use         flock, shared: held by every process using the version (a :class:`Lease`);
                            the evictor takes it exclusively, without waiting, so a version in use is
                            never evicted. Locks go with their process: a killed replica holds nothing.
    .lock                   flock, exclusive: placing blobs and links, evicting, sweeping (short steps)
    tmp/<key>.<what>-<id>   work in flight, named by the version it is for: a version being built
                            (``build``, hard links to blobs), a download (``blob``), an incomplete
                            version moved aside (``aside``), all written under that version's fill
                            lock; a version being deleted (``evict``), under the cache lock

Every file of a cached version is checked against the manifest's sha256 whenever a replica takes it; a
file that differs (a flipped bit, a truncated write) is downloaded again, a file the manifest does not
name is removed, and a version that lost its ``MANIFEST.json`` is built again (moved aside when no
process uses it, else repaired in place). Files larger than one part are downloaded as parallel ranged
reads (``download_streams`` at a time), hashed and written in order as the parts arrive. Beyond
``max_bytes`` the least recently used versions that no process uses are evicted, then the blobs no
version links to.

What a killed process leaves in ``tmp/`` (a half-built version holding hard links to blobs, a partial
download) is swept when a process starts taking versions and whenever it evicts: an entry whose fill lock
can be taken without waiting has no live writer. Only blobs count against ``max_bytes``; locks, ``tmp/``
and anything else on the volume (``HF_HOME``) do not.

- :mod:`moe_core.node_cache.files`: manifests' file tables, content keys, leases, hashes, locks and links.
- :mod:`moe_core.node_cache.directory`: the cache directory, its locks, and what frees space (eviction,
  sweeping ``tmp/``).
- :mod:`moe_core.node_cache.cache`: :class:`~moe_core.node_cache.cache.NodeCache`, taking a version
  (verified, downloaded once per node, repaired).
"""
