"""Ray job entrypoints: `python -m jobs.<name> ...` on the cluster (submitted by `vitpipe submit`)."""
