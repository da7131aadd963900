"""The configs shipped with moegrok (package data, installed as moegrok.configs): `moegrok run NAME` takes
NAME.yaml from here when NAME is not a file (moegrok.training.config.resolve_config)."""
