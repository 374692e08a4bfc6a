"""Vision-language SFT of the families beyond Qwen2.5-VL (Qwen3-VL, Qwen3-VL-MoE, Gemma 3,
LLaVA, Mistral 3), each on its tiny random model with its own processor, against transformers.

Per family: a padded micro-batch of images rendered by the family's processor and chat
template gives Megatron per-token losses equal to transformers' on the same batch
(DeepStack and interleaved M-RoPE; Gemma 3's bidirectional image attention; LLaVA's feature
layer; Pixtral's images of three sizes in one micro-batch); a few full SFT steps lower the loss, move every trainable weight, and leave the tower
weights that get no gradient frozen; LoRA on the language model exports a merged model and a
peft adapter that transformers loads, with logits equal to Megatron's.
"""

from __future__ import annotations

import pytest
import torch

from tests.vision_models import (
    colour_question,
    lora_train_and_export,
    save_colour_dataset,
    save_tiny_family_vl,
    train_steps,
)

ATOL = 1e-4
FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "gemma3_vl", "llava", "mistral3"]


def _nightly(*families):
    """FAMILIES, those named left to the nightly set (CI's time budget)."""
    nightly = pytest.mark.skipduringci
    return [pytest.param(f, marks=nightly) if f in families else f for f in FAMILIES]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return save_colour_dataset(tmp_path_factory.mktemp("colours"), count=16)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> its tiny model folder (made on first use)."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_tiny_family_vl(family, tmp_path_factory.mktemp(family) / "hf")
        return made[family]

    return get


def _processor(hf_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(hf_dir), local_files_only=True)


def _batch(hf_dir, data_dir, indices, seq=64):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training.data import sft, vision_sft

    processor = _processor(hf_dir)
    records = [sft.read_records(data_dir / "train.jsonl")[i] for i in indices]
    examples = vision_sft.tokenize(records, processor, seq)
    model_cfg = AutoBridge.from_hf_pretrained(hf_dir).model_config
    data = vision_sft.PaddedVisionSFTDataset(examples, seq, 0, processor, model_cfg)
    return data.collate([data[i] for i in range(len(indices))]), model_cfg


def _hf_inputs(batch, vision: dict) -> dict:
    """transformers' forward inputs for a collated batch."""
    from megabridge.training.step import IMAGE_INPUTS

    inputs = {k: batch[k] for k in ("tokens", *IMAGE_INPUTS) if k in batch}
    inputs["input_ids"] = inputs.pop("tokens")
    is_image = (batch["tokens"] == vision["image_token_id"]).int()
    if "image_grid_thw" in batch:  # Qwen: transformers computes M-RoPE from the image tokens
        inputs["mm_token_type_ids"] = is_image
    if vision["kind"] == "gemma3":  # Gemma 3: image tokens attend to each other both ways
        inputs["token_type_ids"] = is_image
    return inputs


def _megatron_logits(chunk, batch) -> torch.Tensor:
    from megabridge.training.step import IMAGE_INPUTS

    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    return chunk(batch["tokens"], batch["position_ids"], None, **images)  # [b, s, vocab]


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", [*FAMILIES, "llava_pixtral"])
def test_mixed_batch_loss_matches_transformers(family, hf_dirs, data_dir):
    """Three examples (images of different sizes where the processor keeps them), padded:
    Megatron's per-token loss on the answers equals transformers' cross entropy.
    (llava_pixtral: LLaVA with Pixtral-12B's tower, trained through the llava recipes.)"""
    from transformers import AutoModelForImageTextToText

    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.training.step import IMAGE_INPUTS

    hf_dir = hf_dirs(family)
    # Pixtral-12B's tower makes every 4 x 4 patch a token: up to 48 for these images
    batch, model_cfg = _batch(hf_dir, data_dir, [0, 4, 8], seq=128 if "pixtral" in family else 64)
    for key in ("image_grid_thw", "image_sizes"):  # Qwen, Pixtral: three sizes, three grids
        if key in batch:
            assert len({tuple(g) for g in batch[key].tolist()}) == 3
    (chunk,) = AutoBridge.from_hf_pretrained(hf_dir).to_megatron_model()
    images = {k: batch[k] for k in IMAGE_INPUTS if k in batch}
    with torch.no_grad():
        ours = chunk(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], **images)
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        logits = hf(**_hf_inputs(batch, model_cfg.vision)).logits
        theirs = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 3 * 2  # the colour and the turn's end of each answer
    assert (ours[mask] - theirs[mask]).abs().max() <= ATOL


def _config(recipe, hf_dir, data_dir, root, *extra):
    from megabridge.recipes import get_recipe
    from megabridge.training.config import apply_overrides

    return apply_overrides(get_recipe(recipe), [
        f"checkpoint.pretrained_checkpoint={hf_dir}", f"dataset.path={data_dir}",
        "optimizer.lr=1e-2", "scheduler.lr_warmup_iters=0", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_interval=None", "logger.tensorboard=false",
        f"checkpoint.save={root / 'ckpt'}", f"logger.log_dir={root / 'logs'}", *extra,
    ])  # fmt: skip


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", _nightly("qwen3_vl", "qwen3_vl_moe"))
def test_sft_trains_every_weight_that_gets_a_gradient(family, hf_dirs, data_dir, tmp_path):
    """Full SFT: the loss falls over a few steps on the same batch; every trainable weight
    moves (so none waits for a gradient that never comes); the tower's weights that the
    features do not depend on are frozen at build."""
    from megabridge.training import loop

    hf_dir = hf_dirs(family)
    cfg = _config(
        f"{family}_tiny_finetune_config", hf_dir, data_dir, tmp_path, "train.global_batch_size=2"
    )
    s = loop.setup(cfg)
    chunk = s.model[0].module  # inside DDP
    before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    frozen = {n for n, p in chunk.named_parameters() if not p.requires_grad}
    unused = NO_GRADIENT.get(family, ())
    assert frozen == {n for n in before if unused and n.startswith(unused)}, frozen
    assert bool(frozen) == bool(unused)
    losses = train_steps(s, 3, same_batch=True)
    assert losses[-1] < losses[0], losses
    for name, p in chunk.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name in frozen), name


# The tower weights the features never depend on (name prefixes): the tiny LLaVA reads CLIP's
# second-to-last layer (vision_feature_layer -2), so not its last layer nor its post-norm.
NO_GRADIENT = {
    "llava": ("vision.vision_tower.encoder.layers.1.", "vision.vision_tower.post_layernorm.")
}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", _nightly("qwen3_vl_moe"))
def test_lora_exports_merged_and_peft_with_megatron_logits(family, hf_dirs, data_dir, tmp_path):
    """LoRA on the language model only; the merged export and the peft adapter on
    transformers' own model give Megatron's logits on an image."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    hf_dir = hf_dirs(family)
    recipe = f"{family}_tiny_finetune_config".replace("finetune", "lora")
    cfg = _config(recipe, hf_dir, data_dir, tmp_path, "peft.dim=4")
    s = lora_train_and_export(cfg, tmp_path)
    chunk = s.model[0].module  # inside DDP

    batch, model_cfg = _batch(hf_dir, data_dir, [1, 6])
    inputs = _hf_inputs(batch, model_cfg.vision)
    with torch.no_grad():
        ours = _megatron_logits(chunk, batch)
        merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
        merged_logits = merged(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        base_logits = base(**inputs).logits
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(**inputs).logits
    real = batch["tokens"] != 0  # padding's logits are not compared
    assert (merged_logits - ours)[real].abs().max() <= ATOL
    assert (merged_logits - adapter_logits)[real].abs().max() <= ATOL
    assert (merged_logits - base_logits)[real].abs().max() > 1e-3  # the adapters trained
    adapted_names = [n for n, _ in adapted.named_parameters() if ".lora_" in n]
    assert adapted_names and all(".language_model." in n for n in adapted_names), adapted_names
    _generates(merged, hf_dir, data_dir)


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_qwen3_vl_tower_lora_keeps_off_the_padded_mlp_units(data_dir, tmp_path):
    """peft.vision_target_modules on Qwen3-VL with a tower MLP of 60 units (Megatron pads it to
    64). Its MLP is plain GELU, so an adapter on the padded units would bring them to life
    (fc1's B rows, through fc2's A columns): masked, megabridge's adapted model (before
    merging), the merged export in transformers and the peft adapter on transformers' own
    model give the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tests.vision_models import save_tiny_vl

    hf_dir = save_tiny_vl("qwen3_vl", tmp_path / "hf", processor=True,
                          vision={"intermediate_size": 60})  # fmt: skip
    cfg = _config(
        "qwen3_vl_tiny_lora_config",
        hf_dir,
        data_dir,
        tmp_path,
        "peft.dim=4",
        "peft.vision_target_modules=linear_qkv,linear_proj,linear_fc1,linear_fc2",
    )
    batch, model_cfg = _batch(hf_dir, data_dir, [1, 6])
    ours = {}

    def adapted_logits(s):
        chunk = s.model[0].module  # inside DDP
        assert chunk.vision.blocks[0].mlp.linear_fc2.live.shape == (1, 64)
        with torch.no_grad():
            ours["logits"] = _megatron_logits(chunk, batch)

    lora_train_and_export(cfg, tmp_path, adapted_logits)
    inputs = _hf_inputs(batch, model_cfg.vision)
    with torch.no_grad():
        merged_logits = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))(
            **inputs
        ).logits
        base = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(**inputs).logits
    real = batch["tokens"] != 0  # padding's logits are not compared
    assert (merged_logits - ours["logits"])[real].abs().max() <= ATOL
    assert (merged_logits - adapter_logits)[real].abs().max() <= ATOL
    tower = [n for n, _ in adapted.named_parameters() if ".lora_" in n and ".visual." in n]
    assert len(tower) == 3 * 4 * 2  # A and B of qkv, proj, linear_fc1, linear_fc2 in 3 blocks


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("family", ["gemma3_vl", "llava", "mistral3"])
def test_tower_lora_of_clip_siglip_and_pixtral_towers(family, hf_dirs, data_dir, tmp_path):
    """peft.vision_target_modules on the SigLIP (Gemma 3), CLIP (LLaVA) and Pixtral (Mistral
    3) towers, whose q, k and v are separate in transformers: megabridge's adapted model, the
    merged export and the peft adapter on transformers' own model give the same logits, and
    the adapter holds A and B of every projection of every tower layer."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    hf_dir = hf_dirs(family)
    recipe = f"{family}_tiny_lora_config"
    targets = "peft.vision_target_modules=linear_qkv,linear_proj,linear_fc1,linear_fc2"
    cfg = _config(recipe, hf_dir, data_dir, tmp_path, "peft.dim=4", targets)
    batch, model_cfg = _batch(hf_dir, data_dir, [1, 6])
    ours = {}

    def adapted_logits(s):
        with torch.no_grad():
            ours["logits"] = _megatron_logits(s.model[0].module, batch)

    lora_train_and_export(cfg, tmp_path, adapted_logits)
    inputs = _hf_inputs(batch, model_cfg.vision)
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged"))
        merged_logits = merged(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        tower_base = {n: p.clone() for n, p in base.named_parameters() if "vision_tower" in n}
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        adapter_logits = adapted(**inputs).logits
    real = batch["tokens"] != 0  # padding's logits are not compared
    assert (merged_logits - ours["logits"])[real].abs().max() <= ATOL
    assert (merged_logits - adapter_logits)[real].abs().max() <= ATOL
    tower = [n for n, _ in adapted.named_parameters() if ".lora_" in n and "vision_tower" in n]
    layers = model_cfg.vision["num_hidden_layers"]
    per_layer = 6 if family == "mistral3" else 5  # q, k, v, o + gate, up, down / fc1, fc2
    assert len(tower) == layers * (per_layer + 1) * 2, tower
    moved = [n for n, p in merged.named_parameters()
             if n in tower_base and (p - tower_base[n]).abs().max() > 1e-4]  # fmt: skip
    assert moved, "the tower's adapters did not train"


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_qwen3_vl_sft_on_a_clip_an_image_and_text(hf_dirs, tmp_path_factory, tmp_path):
    """Video parts for Qwen3-VL: a padded micro-batch of a 4-frame clip (its temporal patches'
    timestamps in the text), an image and a text-only example gives Megatron per-token losses
    equal to transformers' on the answers (positions, DeepStack on both); a few SFT steps on
    clips, images and text lower the loss."""
    from transformers import AutoModelForImageTextToText

    from megabridge.training import loop
    from megabridge.training.data import sft, vision_sft
    from tests.vision_models import save_mixed_colour_dataset

    hf_dir = hf_dirs("qwen3_vl")
    mixed = save_mixed_colour_dataset(tmp_path_factory.mktemp("mixed"), count=12)
    processor = _processor(hf_dir)
    records = sft.read_records(mixed / "train.jsonl")[3:6]  # clip (4 frames), image, text
    examples = vision_sft.tokenize(records, processor, 96, videos=True)
    assert examples[0].video_grids == ((2, 6, 8),) and examples[0].video_fps == (2.0,)
    s = loop.setup(_config("qwen3_vl_tiny_finetune_config", hf_dir, mixed, tmp_path,
                           "dataset.seq_length=96", "train.global_batch_size=3",
                           "train.micro_batch_size=3"))  # fmt: skip
    data = vision_sft.PaddedVisionSFTDataset(examples, 96, 0, processor, s.cfg.model)
    batch = data.collate([data[i] for i in range(3)])
    visual = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                    "video_grid_thw")}  # fmt: skip
    tokens, vision = batch["tokens"], s.cfg.model.vision
    types = (tokens == vision["image_token_id"]).int() + 2 * (tokens == vision["video_token_id"])
    with torch.no_grad():
        ours = s.model[0].module(tokens, batch["position_ids"], None, labels=batch["labels"],
                                 **visual)  # fmt: skip
        hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir))
        logits = hf(input_ids=tokens, mm_token_type_ids=types.int(), **visual).logits
        theirs = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none"
        )
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 3 * 2  # the colour and the turn's end of each answer
    assert (ours[mask] - theirs[mask]).abs().max() <= ATOL
    losses = train_steps(s, 3)
    assert losses[-1] < losses[0], losses


def _generates(model, hf_dir, data_dir):
    """transformers generates from the model on a chat prompt with one image."""
    from PIL import Image

    processor = _processor(hf_dir)
    messages = colour_question("images/3.png")["messages"]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with Image.open(data_dir / "images/3.png") as image:
        inputs = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
    out = model.generate(**inputs, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def _tower_config(family: str, variant: str, **vision) -> dict:
    import copy

    from megabridge.conversion.registry import bridge_for_family
    from megabridge.models.gemma3_vl import tiny as gemma3_tiny
    from megabridge.models.llava import tiny as llava_tiny
    from megabridge.recipes import sized

    size = copy.deepcopy({"llava": llava_tiny, "gemma3_vl": gemma3_tiny}[family].TINY[variant])
    size["vision_config"].update(vision)
    return sized(bridge_for_family(family), size).vision


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")  # the towers' layers are Megatron layers
@pytest.mark.parametrize(
    "family, variant, vision, unused",
    [
        ("llava", "base", {}, {"encoder.layers.1.", "post_layernorm."}),  # feature layer -2
        ("llava", "siglip_qwen2", {}, {"post_layernorm.", "head."}),  # layers [-1, 1]
        ("gemma3_vl", "base", {"vision_use_head": True}, {"head."}),
    ],
    ids=["clip-second-to-last", "siglip-two-layers-head", "gemma3-head"],
)
def test_towers_freeze_exactly_the_weights_without_gradient(family, variant, vision, unused):
    """A backward through the tower leaves exactly its no_gradient() weights without a
    gradient; freeze() turns those off always, and the projector with the projection."""
    from megatron.core.transformer import TransformerConfig
    from torch import nn

    from megabridge.models import vision as vision_models

    v = _tower_config(family, variant, **vision)
    lm_config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True
    )
    tower = vision_models.TOWERS[v["kind"]](v, lm_config)
    side = v["image_size"]
    tower(torch.randn(2, 3, side, side)).square().sum().backward()
    no_grad = {n for n, p in tower.named_parameters() if p.grad is None}
    expected = {n for n, _ in tower.named_parameters()
                if n.removeprefix("vision_tower.").startswith(tuple(unused))}  # fmt: skip
    assert expected and no_grad == expected
    chunk = nn.Module()
    chunk.vision = tower
    frozen = vision_models.freeze([chunk], language=False, tower=False, projection=True)
    projector = {n for n, _ in tower.named_parameters() if n.startswith("multi_modal_projector.")}
    assert projector and set(frozen) == {f"vision.{n}" for n in expected | projector}


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")  # the tower's blocks are Megatron layers
def test_qwen3_vl_projection_is_its_mergers():
    """freeze_vision_projection freezes Qwen3-VL's merger and DeepStack mergers; the tower
    option the rest of the tower."""
    from megatron.core.transformer import TransformerConfig
    from torch import nn

    from megabridge.conversion.registry import bridge_for_family
    from megabridge.models import vision as vision_models
    from megabridge.models.qwen3_vl import tiny
    from megabridge.recipes import sized

    v = sized(bridge_for_family("qwen3_vl"), tiny.TINY["base"]).vision
    chunk = nn.Module()
    # the tower takes the language model's runtime fields (dtype, init, TP) from its config
    lm_config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True
    )
    chunk.vision = vision_models.TOWERS[v["kind"]](v, lm_config)
    names = {f"vision.{n}" for n, _ in chunk.vision.named_parameters()}
    mergers = {n for n in names if n.startswith(("vision.merger.", "vision.deepstack_merger"))}
    assert len(mergers) == 3 * 6  # the final merger and two DeepStack ones
    assert set(vision_models.freeze([chunk], False, False, projection=True)) == mergers
    for p in chunk.parameters():
        p.requires_grad_(True)
    assert set(vision_models.freeze([chunk], False, True, projection=False)) == names - mergers
