"""Gemma 3 multimodal recipes: none yet. Training vision-language models is not supported
yet (issue 14): fine-tune Gemma 3's language model with the gemma3 recipes, which read a
Gemma3ForConditionalGeneration checkpoint text-only."""

SIZES: dict[str, dict] = {}
