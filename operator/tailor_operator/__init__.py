"""Tailor operator: reconciles Dataset and FineTuneJob into runs."""
