"""difforge.common: plumbing shared across packages (hash chains, atomic writes, error text, PNG).

Nothing here knows about diffusion; besides the standard library and the third-party packages
it wraps, it imports only `difforge.core.errors`, so any package of ours may import it.
"""
