"""Plumbing shared by every layer: error formatting, atomic writes, hash chains, PNG files."""
