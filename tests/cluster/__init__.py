"""Tests on the share-nothing multi-node stack (one cluster for the whole folder, see conftest.py)."""
