"""Unit tests of ``sae_allocators/thresholds.py`` (threshold tracker, export, budgets) in this process
(mutation target ``thresholds``, with test_calibration.py's fast tests)."""
