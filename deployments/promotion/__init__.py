"""Traffic-aware promotion: the controller deployment (:mod:`.controller`), its Ray-free policy
(:mod:`.policy`), the promotion slots it assigns (:mod:`.slots`, merged deployments whose adapter changes
at runtime) and their autoscaling policy (:mod:`.autoscaling`)."""
