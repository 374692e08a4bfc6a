"""Gemma 3 multimodal (Gemma3ForConditionalGeneration) as a vision-language model, against
transformers' own classes.

A tiny random model (models/gemma3_vl/tiny.py: 1-layer SigLIP, Gemma 3's 4-layer language
model with a sliding window of 4) with its own processor, and generated images: config
round trip, bit-exact HF -> Megatron -> HF, logits on text and image positions within 1e-4
(also with attention chunks smaller than an image), the bidirectional image attention
needed for that, perturbed tower and projector weights rejected, and the text-only reading.
"""

from __future__ import annotations

import pytest
import torch

from megabridge.conversion.tiny import tiny_config
from tests import conversion_checks as checks
from tests.vision_models import save_tiny_gemma3_vl

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_gemma3_vl(tmp_path_factory.mktemp("gemma3_vl") / "hf")


@pytest.mark.unit
def test_config_round_trip():
    checks.config_round_trip(tiny_config("gemma3_vl"))


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_round_trip_bit_exact(tmp_path):
    from megabridge.conversion.auto_bridge import AutoBridge

    source = save_tiny_gemma3_vl(tmp_path / "hf", dtype=torch.bfloat16, max_shard_size=30_000)
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model()
    vision = [n for n, _ in model[0].named_parameters() if n.startswith("vision.")]
    # embeddings, post-norm, a Megatron-Core layer (q, k, v fused), projector
    assert len(vision) == 3 + 2 + 12 + 2, vision
    bridge.save_hf_pretrained(model, tmp_path / "back")
    checks.assert_same_hf_folder(source, tmp_path / "back")


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize("chunk", [512, 3], ids=["whole", "chunks-of-3"])
def test_logits_on_images_match_transformers(hf_dir, images, chunk, monkeypatch):
    """Chunks of 3 queries split every image (4 tokens): a query must still see the image's
    later tokens in the next chunk."""
    from megabridge.conversion import image_inputs
    from megabridge.conversion.verify import verify
    from megabridge.models import torch_layers

    monkeypatch.setattr(torch_layers, "ATTENTION_CHUNK", chunk)
    result = verify(hf_dir, images=images)
    assert result.ok and result.max_abs_diff <= ATOL and result.top1_agreement == 1.0, result
    samples = image_inputs.image_samples(hf_dir, images, {"kind": "gemma3"})
    assert [int((s.input_ids == 252).sum()) for s in samples] == [4, 4, 4]
    assert all(
        torch.equal(s.hf_extra["token_type_ids"], (s.input_ids == 252).long()) for s in samples
    )


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_causal_attention_on_images_would_not_match(hf_dir, images):
    """The bidirectional image attention is what makes the image positions agree."""
    from megabridge.conversion import image_inputs
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.verify import hf_image_logits, megatron_image_logits

    bridge = AutoBridge.from_hf_pretrained(hf_dir)
    provider = bridge.to_megatron_provider()
    provider.bidirectional_image_attention = False
    vision = provider.vision
    samples = image_inputs.image_samples(hf_dir, images, vision)
    causal = megatron_image_logits(bridge.to_megatron_model(provider), samples, vision)
    reference = hf_image_logits(hf_dir, samples, vision, torch.float32, "cpu")
    image = torch.cat([s.input_ids == 252 for s in samples], dim=1)[0]
    assert (causal - reference)[:, image].abs().max() > 1e-3
    # the text before the first image (<start_of_image>) sees no image token: it agrees
    first = int(image.nonzero()[0])
    assert (causal - reference)[:, :first].abs().max() <= ATOL


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
@pytest.mark.parametrize(
    "tensor", ["vision_tower.encoder.layers.0.mlp.fc2", "multi_modal_projector.mm_input_projection"]
)
def test_verify_rejects_perturbed_vision_weights(hf_dir, images, tensor, tmp_path):
    from megabridge.conversion.verify import verify

    bad_hf = checks.perturbed_copy(hf_dir, tmp_path / "bad_hf", tensor=tensor)
    bad = verify(hf_dir, checks.to_megatron_checkpoint(bad_hf, tmp_path / "bad"), images=images)
    assert not bad.ok and bad.max_abs_diff > 1e-3, bad


@pytest.mark.unit
def test_text_only_reading_is_gemma3(hf_dir):
    from megabridge.conversion.auto_bridge import AutoBridge
    from megabridge.conversion.registry import bridge_for_family

    text = AutoBridge.from_hf_pretrained(hf_dir, text_only=True)
    assert text.family.family == "gemma3" and text.model_config.vision is None
    expected = bridge_for_family("gemma3").model_config(tiny_config("gemma3_vl").text_config)
    assert text.model_config == expected
    full = AutoBridge.from_hf_pretrained(hf_dir)
    assert full.family.family == "gemma3_vl" and full.model_config.bidirectional_image_attention


@pytest.mark.unit
@pytest.mark.usefixtures("single_process_megatron")
def test_verifies_text_only(hf_dir):
    """text_only: the language model alone against transformers' on random tokens."""
    from megabridge.conversion.verify import verify

    result = verify(hf_dir, text_only=True)
    assert result.ok and result.max_abs_diff <= ATOL, result


@pytest.mark.system
@pytest.mark.skipduringci  # a 2-process launch: a minute on a loaded 2-core machine
def test_logits_on_images_at_pp2(hf_dir, images):
    """Every stage builds the image blocks from the tokens; the tower is on the first. (TP=2:
    test_vision_language.py test_vision_towers_at_tp2, one launch for all towers.)"""
    images_args = [a for p in images for a in ("--image", str(p))]
    code, result = checks.verify_cli(hf_dir, nproc=2, extra=["--pp", "2", *images_args])
    assert code == 0 and result["max_abs_diff"] <= ATOL, result
