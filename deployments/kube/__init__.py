"""Generate k8s/: the KubeRay RayService (whose serveConfigV2 is our Serve config) and the merge RayJob.

    python -m deployments.kube --config config/deployment.k8s.yaml --out k8s/
    python -m deployments.kube --config config/deployment.k8s.yaml --check k8s/
    python -m deployments.kube --config config/deployment.k8s-s3.yaml --out k8s/s3/    # storage on S3

``--out``/``--check`` name the directory holding rayservice.yaml, rayjob-merge.yaml and podmonitor.yaml;
one invocation writes (or checks) all three. The two manifests are built from the same pieces (image, env with the Hugging
Face token secret, the shared volume, the H100 node selector and GPU toleration, rayVersion), so they
cannot drift apart. With API keys on in the config (``api.key_file``/``api.key_env``), every RayService
pod gets them from the Secret ``moe-api-keys`` (a mounted folder, so a rotated key applies without a
restart; an environment variable for ``key_env``); the Secret itself is never in the repository.

Two storage variants, chosen by ``storage.url``: a path is the ReadWriteMany volume (k8s/storage.yaml)
mounted there on every pod; ``s3://`` has no shared volume: the GPU worker pods mount the node cache (a
hostPath on the GPU node's local disk, ``storage.cache_dir``; only the GPU nodes are prepared for it), the
head and any CPU worker an emptyDir there instead (they may land on any node); every pod takes the object
store's credentials from the Secret ``moe-s3-credentials`` (optional: with an IAM role instead, annotate
the ServiceAccount this generates) and runs as that ServiceAccount.

Sizing assumptions (Qwen3-VL-8B-Instruct in bf16 on H100 80 GB): ~17 GB of weights per replica, one
replica per GPU; worker pods of 1 GPU, 12 CPUs and 96 GiB of memory (model load, image decoding,
safetensors page cache); the head runs no replicas (num-cpus 0). The merge job's worker takes its GPUs
and CPUs from the config's ``merge:`` section and 96 GiB of memory (see MERGE_WORKER_MEMORY).

- :mod:`deployments.kube.constants`: the names, image, secrets, labels and ports the manifests share.
- :mod:`deployments.kube.pods`: pods, containers, volumes and environment, and the Ray node groups.
- :mod:`deployments.kube.manifests`: the RayService, RayJob, PodMonitor, NetworkPolicy, ServiceAccount.
- :mod:`deployments.kube.generate`: the files as YAML with their headers, and the command line
  (:func:`deployments.kube.generate.main`, run by ``python -m deployments.kube``).
"""
