"""Helpers of the reliability suite and the limit tests: crafted payloads, raw HTTP, process control, the
budget and report."""
