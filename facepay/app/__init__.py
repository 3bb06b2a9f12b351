"""The application layer: command line, demo, supervisor and the offline tools.

They compose the platform (the rest of `facepay`) and the stages (`services/<stage>/`); nothing
below imports them back (`[tool.importlinter]` in pyproject.toml, run by `make test`).
"""
