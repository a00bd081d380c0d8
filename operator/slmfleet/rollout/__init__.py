"""Pure: the rollout step state machine and the promote/rollback decision statistics."""
