"""One module per stage command; importing this package registers them all, in pipeline order.

A module registers its `Stage` with `ccam.runner.register`; it may also export extra click
commands in a module-level ``COMMANDS`` list (they replace the generated command of that name).
"""

from ccam.stages import prepare

MODULES = [prepare]
