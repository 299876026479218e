"""Reliability tests (issue #7): fault injection, security checks, scale by simulation, bad input."""
