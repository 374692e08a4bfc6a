"""Mixtral's tiny test models (see conversion/tiny.py)."""

from megabridge.conversion.tiny import MOE

TINY = {"base": {**MOE, "intermediate_size": 32, "num_local_experts": 4}}
