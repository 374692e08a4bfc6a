"""Which Megatron layers LoRA adapts: torch-free, so building a recipe imports no torch."""

MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def default_targets(model) -> list[str]:
    """What a LoRA recipe adapts in ``model`` (a ModelConfig): the attention projections, and the
    dense MLPs where the model has any. Not adapted yet: MoE experts, and MLA's down/up
    projections (megatron-core gathers their outputs inside its attention), so an MLA model
    gets its output projection only."""
    attention = ["linear_proj"] if model.multi_latent_attention else ["linear_qkv", "linear_proj"]
    dense_mlp = not model.num_moe_experts or 0 in (model.moe_layer_freq or [])
    return attention + (["linear_fc1", "linear_fc2"] if dense_mlp else [])
