import pytest


@pytest.fixture(scope="session")
def single_process_megatron():
    """torch.distributed (gloo, world size 1) and Megatron-Core's parallel state, once."""
    from megabridge import runtime

    runtime.init_distributed()
    runtime.init_model_parallel(1, 1)
    runtime.seed_everything(1234)
    yield


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """The vision-language tests' PNG images (tests/vision_models.py save_images), read only."""
    from tests.vision_models import save_images

    return save_images(tmp_path_factory.mktemp("images"))
