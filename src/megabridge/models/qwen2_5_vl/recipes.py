"""Qwen2.5-VL recipes: none yet. Training vision-language models is not supported yet
(issue 14); sizes and recipes come with it."""

SIZES: dict[str, dict] = {}
