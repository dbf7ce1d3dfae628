"""difforge.common: plumbing shared across packages (hash chains, atomic writes, error text, PNG).

Nothing here knows about diffusion; every module imports only the standard library and the
third-party packages it wraps, so any package of ours may import it.
"""
