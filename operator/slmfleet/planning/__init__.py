"""Pure planning: what to apply, delete and write for a model and its rollout, from what was observed.

No I/O, no clock, no kopf or Kubernetes client: everything comes in as data."""
