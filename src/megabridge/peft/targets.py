"""Which Megatron layers LoRA adapts: torch-free, so building a recipe imports no torch."""

import re

from megabridge.conversion import registry
from megabridge.errors import ConfigError, UserError
from megabridge.models.specs import resolve_impl

MEGATRON_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
# the language model's layers (a vision tower's same-named ones are peft.vision_target_modules')
_MAPPED = re.compile(r"^decoder\.layers\.\*\.(?:self_attention|mlp)\.(linear_\w+)\.weight$")


def default_targets(model) -> list[str]:
    """What a LoRA recipe adapts in ``model`` (a ModelConfig): the attention projections, and the
    dense MLPs where the model has any. Not adapted yet: MoE experts, and MLA's down/up
    projections (megatron-core gathers their outputs inside its attention), so an MLA model
    gets its output projection only."""
    attention = ["linear_proj"] if model.multi_latent_attention else ["linear_qkv", "linear_proj"]
    dense_mlp = not model.num_moe_experts or 0 in (model.moe_layer_freq or [])
    return attention + (["linear_fc1", "linear_fc2"] if dense_mlp else [])


def hf_names_by_target(family) -> dict[str, tuple[str, ...]]:
    """Megatron layer -> the HF module names fused into it, read from the family's mappings."""
    found: dict[str, tuple[str, ...]] = {}
    for mapping in family.MAPPINGS:
        m = _MAPPED.search(mapping.megatron)
        if m and m.group(1) in MEGATRON_TARGETS and ".experts." not in mapping.megatron:
            found[m.group(1)] = tuple(
                h.removesuffix(".weight").rsplit(".", 1)[-1] for h in mapping.hf
            )
    return found


def _family_names(family: str, hf_names: list[str]) -> dict[str, tuple[str, ...]]:
    try:
        return hf_names_by_target(registry.bridge_for_family(family))
    except UserError:
        raise ConfigError(
            f"peft.target_modules: HF names ({', '.join(hf_names)}) need a family with an HF "
            f"bridge, and model.family={family!r} has none; use Megatron names "
            f"({', '.join(MEGATRON_TARGETS)})"
        ) from None


def resolve_targets(names: list[str], family: str) -> list[str]:
    """The Megatron layers that ``names`` (Megatron or HF names) select, in model order."""
    if not names:
        raise ConfigError(
            f"peft.target_modules is empty; choose from {', '.join(MEGATRON_TARGETS)}"
        )
    chosen = {n for n in names if n in MEGATRON_TARGETS}
    hf = [n for n in dict.fromkeys(names) if n not in MEGATRON_TARGETS]
    if hf:
        groups = _family_names(family, hf)
        known = [leaf for leaves in groups.values() for leaf in leaves]
        unknown = [n for n in hf if n not in known]
        if unknown:
            raise ConfigError(
                f"peft.target_modules: unknown {', '.join(map(repr, unknown))}; expected Megatron "
                f"names ({', '.join(MEGATRON_TARGETS)}) or HF names of the {family} family "
                f"({', '.join(known)})"
            )
        for layer, leaves in groups.items():
            named = [leaf for leaf in leaves if leaf in hf]
            if named and len(named) < len(leaves):
                missing = [leaf for leaf in leaves if leaf not in hf]
                raise ConfigError(
                    f"peft.target_modules names {', '.join(named)} but not {', '.join(missing)}: "
                    f"Megatron fuses {', '.join(leaves)} into one layer ({layer}), adapted as a "
                    f"whole with one shared A; name all of them, or {layer}"
                )
            if named:
                chosen.add(layer)
    return [t for t in MEGATRON_TARGETS if t in chosen]


def _vision_target_problems(p, model) -> list[str]:
    """What is wrong with ``peft.vision_target_modules`` (whether the tower has Megatron-Core
    layers is known once it is built: lora.add_adapters says so)."""
    if not p.vision_target_modules:
        return []
    unknown = [n for n in p.vision_target_modules if n not in MEGATRON_TARGETS]
    if unknown:
        return [
            f"peft.vision_target_modules: unknown {', '.join(map(repr, unknown))}; expected "
            f"Megatron names ({', '.join(MEGATRON_TARGETS)})"
        ]
    if model.vision is None:
        return ["peft.vision_target_modules: the model has no vision tower"]
    if p.method == "dora":
        return [
            "peft.vision_target_modules with peft.method=dora is not supported yet (the "
            "tower's zero-padded MLP units have no direction to normalise); use peft.method=lora"
        ]
    return []


def config_problems(cfg) -> list[str]:
    """What is wrong with ``cfg.peft`` (for training/config.py's validate)."""
    p, problems = cfg.peft, []
    if p.dim < 1:
        problems.append(f"peft.dim={p.dim} must be >= 1")
    if p.alpha <= 0:
        problems.append(f"peft.alpha={p.alpha} must be > 0")
    if not 0.0 <= p.dropout < 1.0:
        problems.append(f"peft.dropout={p.dropout} must be in [0, 1)")
    try:
        resolve_targets(p.target_modules, cfg.model.family)
    except ConfigError as e:
        problems.append(str(e))
    problems += _vision_target_problems(p, cfg.model)
    try:
        impl = resolve_impl(cfg.model)
    except ConfigError:
        impl = None  # the model's own validation names this problem
    if impl == "transformer_engine":
        problems.append(
            f"peft.method={p.method} needs model.transformer_impl=torch (or local): the adapters "
            "wrap Megatron-Core's own parallel linears, and TE's layer-norm-fused linear_qkv "
            "never exposes the normalised input they read"
        )
    return problems
