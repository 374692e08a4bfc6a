"""Weight sync in one process: the stream, its buckets, LoRA merged on the fly, the transformers
consumer (fused MoE experts included) and its errors. The 2-process checks (TP / PP / EP,
errors agreed across ranks) are in tests/functional_tests/test_weight_sync.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megabridge.conversion import weight_sync
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.tiny import tiny_config
from megabridge.conversion.verify import megatron_logits, sample_tokens
from megabridge.conversion.weight_sync import HFModelConsumer
from megabridge.errors import ConversionError, UserError
from megabridge.peft import lora
from tests.hf_models import randomize, save_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def llama(tmp_path_factory, single_process_megatron):
    path = save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("llama"))
    bridge = AutoBridge.from_hf_pretrained(path)
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = False
    return path, bridge, bridge.to_megatron_model(cfg)


def _fresh_hf(path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    randomize(model, seed=7)  # nothing left from the folder: the sync must fill it all
    return model.eval()


def test_buckets_are_bounded_and_keep_the_order():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5])]  # fp32: 4 B
    out = list(weight_sync.buckets(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b in out] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    with pytest.raises(UserError, match="bucket_bytes"):
        list(weight_sync.buckets(iter(tensors), bucket_bytes=0))


def test_sync_into_transformers_gives_the_same_logits(llama):
    path, bridge, model = llama
    hf = _fresh_hf(path)
    stats = bridge.sync_weights(model, HFModelConsumer(hf), bucket_bytes=32 << 10)
    assert stats["tensors"] == len(hf.state_dict())
    tokens = sample_tokens(256, 2, 16, seed=0)
    with torch.no_grad():
        got = hf(input_ids=tokens).logits
    assert (got - megatron_logits(model, tokens)[..., :256]).abs().max() < 1e-4


def test_stream_casts_and_can_be_closed_early(llama):
    _, bridge, model = llama
    with bridge.stream_hf_weights(model, dtype=torch.bfloat16) as stream:
        name, tensor = next(stream)
    assert tensor.dtype == torch.bfloat16 and name.startswith("model.")
    assert list(stream) == []  # closed: nothing more comes


def test_consumer_errors_name_the_tensor(llama):
    path, bridge, model = llama
    small = AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=1))
    with pytest.raises(ConversionError, match="has no tensor model.layers.1.") as e:
        bridge.sync_weights(model, HFModelConsumer(small))
    assert str(e.value).startswith("weight sync failed on rank 0:")
    narrow = AutoModelForCausalLM.from_config(tiny_config("llama", intermediate_size=96))
    with pytest.raises(ConversionError, match="shape mismatch for model.layers.0.mlp.gate_proj"):
        bridge.sync_weights(model, HFModelConsumer(narrow))
    consumer = HFModelConsumer(_fresh_hf(path))
    consumer.load_weights([("model.norm.weight", torch.ones(64))])
    with pytest.raises(ConversionError, match="did not fill these transformers tensors"):
        consumer.finish()
    with pytest.raises(UserError, match="dst=3 is not a rank"):
        bridge.stream_hf_weights(model, dst=3)


def test_lora_is_merged_on_the_fly_and_the_model_left_as_it_was(llama):
    path, bridge, model = llama
    settings = {"method": "lora", "dim": 4, "alpha": 8.0, "dropout": 0.0, "seed": 3,
                "target_modules": ["linear_qkv", "linear_fc1"], "base": None}  # fmt: skip
    lora.add_adapters(model, settings)
    try:
        for name, p in model[0].named_parameters():
            if name.endswith("lora_b"):
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        hf = _fresh_hf(path)
        bridge.sync_weights(model, HFModelConsumer(hf))
        tokens = sample_tokens(256, 2, 16, seed=1)
        with torch.no_grad():
            got = hf(input_ids=tokens).logits
        expected = megatron_logits(model, tokens)[..., :256]  # the adapted model's output
        assert (got - expected).abs().max() < 1e-4
        base_only = dict(bridge.stream_hf_weights(model, merge_lora=False))
        original = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        assert torch.equal(
            base_only["model.layers.0.self_attn.q_proj.weight"],
            original.model.layers[0].self_attn.q_proj.weight,
        )
        assert any(lora.is_adapter(n) for n, _ in model[0].named_parameters())  # still adapted
    finally:  # B = 0 then merge: the plain model again, as loaded
        for name, p in model[0].named_parameters():
            if name.endswith("lora_b"):
                p.data.zero_()
        lora.merge_and_unload(model)


def test_consumer_fills_transformers_fused_moe_experts(tmp_path):
    source = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    randomize(source, seed=1)
    source.save_pretrained(str(tmp_path))  # files: one tensor per expert and projection
    files = load_file(str(tmp_path / "model.safetensors"))
    target = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in files
    consumer = HFModelConsumer(target)
    consumer.load_weights(sorted(files.items()))
    consumer.finish()
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


class _LoadWeightsOnly:
    """A consumer with vLLM's protocol alone: the plan yields to it instead of copying."""

    def __init__(self, model):
        self._consumer = HFModelConsumer(model)
        self.load_weights, self.finish = self._consumer.load_weights, self._consumer.finish


@torch.no_grad()
def _logits(hf, tokens):
    return hf(input_ids=tokens).logits


def test_a_plan_reused_across_training_steps_equals_a_fresh_sync(llama):
    path, bridge, model = llama
    saved = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    tokens = sample_tokens(256, 2, 16, seed=2)
    hf, generic = _fresh_hf(path), _fresh_hf(path)
    plans = [bridge.sync_plan(model, HFModelConsumer(hf)),
             bridge.sync_plan(model, _LoadWeightsOnly(generic))]  # fmt: skip
    try:
        for step in range(2):
            with torch.no_grad():  # what an optimizer step does: the same storage, new values
                for p in model[0].parameters():
                    p.add_(
                        torch.randn(p.shape, generator=torch.Generator().manual_seed(step)),
                        alpha=0.01,
                    )
            stats = [plan.sync() for plan in plans]
            fresh = _fresh_hf(path)
            assert bridge.sync_weights(model, HFModelConsumer(fresh)) == stats[0] == stats[1]
            expected = _logits(fresh, tokens)
            assert torch.equal(_logits(hf, tokens), expected)
            assert torch.equal(_logits(generic, tokens), expected)
            assert (expected - megatron_logits(model, tokens)[..., :256]).abs().max() < 1e-4
        assert [plan.builds for plan in plans] == [1, 1]  # worked out once, used twice
    finally:
        with torch.no_grad():
            for n, p in model[0].named_parameters():
                p.copy_(saved[n])


def test_a_plan_is_rebuilt_when_a_tensor_changes_storage(llama):
    path, bridge, model = llama
    hf = _fresh_hf(path)
    plan = bridge.sync_plan(model, HFModelConsumer(hf))
    plan.sync()
    norm = model[0].decoder.final_layernorm.weight
    original = norm.data
    try:
        norm.data = original + 0.5  # a new storage: the plan's views would read the old one
        plan.sync()
        assert torch.equal(hf.model.norm.weight, norm)
        assert plan.builds == 2
        hf.model.norm.weight.data = torch.zeros_like(hf.model.norm.weight)  # the consumer's side
        plan.sync()
        assert torch.equal(hf.model.norm.weight, norm)
        assert plan.builds == 3
        plan.sync()
        assert plan.builds == 3  # nothing moved: kept
    finally:
        norm.data = original


def test_a_plan_casts_like_the_stream(llama):
    """bf16 asked, fp32 on both sides: rounded to bf16 first, as the stream gives it."""
    path, bridge, model = llama
    hf = _fresh_hf(path)
    bridge.sync_plan(model, HFModelConsumer(hf), dtype=torch.bfloat16).sync()
    state = hf.state_dict()
    for name, tensor in bridge.stream_hf_weights(model, dtype=torch.bfloat16):
        assert torch.equal(state[name], tensor.float()), name


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_stacked_experts_are_synced_whole(tmp_path, single_process_megatron, family):
    """GPT-OSS and Llama 4 keep all experts in one HF tensor: the sync yields it once, stacked
    from every expert's parameter, and the synced transformers model has Megatron's logits."""
    path = save_tiny(tiny_config(family), tmp_path)
    bridge = AutoBridge.from_hf_pretrained(path)
    cfg = bridge.to_megatron_provider()
    cfg.bf16 = False
    model = bridge.to_megatron_model(cfg)
    hf = _fresh_hf(path)
    stats = bridge.sync_weights(model, HFModelConsumer(hf), bucket_bytes=32 << 10)
    assert stats["tensors"] == len(hf.state_dict())
    tokens = sample_tokens(256, 2, 16, seed=0)
    vocab = hf.config.vocab_size
    assert (_logits(hf, tokens) - megatron_logits(model, tokens)[..., :vocab]).abs().max() < 1e-4
