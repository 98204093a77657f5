"""``python -m deployments.kube``: write or check the k8s/ manifests (:func:`deployments.kube.generate.main`)."""

import sys

from deployments.kube.generate import main

sys.exit(main())
