"""Update rules: one per editor, sharing keys, targets and statistics; only the update differs."""
from .mose import MOSERule

RULES = {"mose": MOSERule}
