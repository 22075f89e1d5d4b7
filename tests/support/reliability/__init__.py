"""Helpers of the reliability suite: crafted payloads, raw HTTP, process control, the budget and report."""
