"""Load control: SLA windows and the SLA monitor, thermal sources and monitor, and the
mitigation (limits, the concurrency gate) both act through."""
