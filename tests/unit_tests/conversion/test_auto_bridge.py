"""AutoBridge.to_megatron_model leaves the caller's process state alone: RNGs and parallel state."""

import random

import pytest
import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megabridge import runtime
from megabridge.conversion.auto_bridge import AutoBridge
from megabridge.conversion.tiny import tiny_config
from megabridge.errors import ConfigError
from tests.hf_models import save_tiny

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    return AutoBridge.from_hf_pretrained(
        save_tiny(tiny_config("llama"), tmp_path_factory.mktemp("llama"))
    )


@pytest.fixture
def no_parallel_state(single_process_megatron):
    """torch.distributed up, but no Megatron parallel state and an unseeded RNG tracker."""
    ps.destroy_model_parallel()
    tensor_parallel.get_cuda_rng_tracker().reset()
    yield
    if not ps.model_parallel_is_initialized():
        runtime.init_model_parallel(1, 1)
    tensor_parallel.get_cuda_rng_tracker().reset()
    with torch.random.fork_rng(devices=[]):
        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def _tracker_state() -> torch.Tensor:
    return tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"].clone()


@pytest.mark.usefixtures("no_parallel_state")
def test_building_keeps_the_callers_rng_and_seeds_only_the_tracker(bridge):
    torch.manual_seed(5)
    random.seed(5)
    torch_before, python_before = torch.random.get_rng_state(), random.getstate()
    bridge.to_megatron_model(seed=7)
    assert torch.equal(torch.random.get_rng_state(), torch_before)
    assert random.getstate() == python_before
    seeded_by_bridge = _tracker_state()

    tensor_parallel.get_cuda_rng_tracker().reset()
    with torch.random.fork_rng(devices=[]):
        tensor_parallel.model_parallel_cuda_manual_seed(7)
    assert torch.equal(seeded_by_bridge, _tracker_state())


@pytest.mark.usefixtures("single_process_megatron")
def test_an_existing_parallel_state_of_another_layout_is_refused_not_replaced(bridge):
    group = ps.get_tensor_model_parallel_group()
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    with pytest.raises(ConfigError) as raised:
        bridge.to_megatron_model(provider)
    assert str(raised.value) == (
        "Megatron's parallel state is already set up for TP=1, PP=1, EP=1; this model asks for "
        "TP=2, PP=1, EP=1: build it with that layout or in a fresh process"
    )
    assert ps.get_tensor_model_parallel_group() is group
