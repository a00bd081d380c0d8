"""The controller: kopf wiring and every piece of I/O around the pure planners (slmfleet.planning)."""
