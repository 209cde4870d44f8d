"""Commands that are not pipeline stages (demo, export, review, ...): each module lists its click commands in ``COMMANDS``."""
