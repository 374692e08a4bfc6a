"""megabridge: Hugging Face <-> Megatron-Core."""
