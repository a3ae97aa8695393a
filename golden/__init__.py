"""The golden cases as package data (``darkspec.golden``), found with importlib.resources; see README.md here."""
