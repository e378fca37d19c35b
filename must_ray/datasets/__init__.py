"""Bring your own data: importers of the standard formats into examples tables, and exporters back."""
