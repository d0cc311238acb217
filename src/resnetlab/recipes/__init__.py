"""Named training recipes (YAML). Copy one, edit it, and pass its path as ``--recipe``."""
