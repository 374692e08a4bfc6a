"""Train from a recipe in Python: the same as `megabridge train --recipe ... key=value`.

    uv run python examples/1_pretrain_with_overrides.py
    uv run python -m torch.distributed.run --nproc_per_node=2 examples/1_pretrain_with_overrides.py \
        model.tensor_model_parallel_size=2
"""

import sys

from megabridge import runtime
from megabridge.recipes import get_recipe
from megabridge.training.config import apply_overrides
from megabridge.training.loop import train


def main() -> None:
    cfg = get_recipe("llama_tiny_pretrain_config")  # a plain function returning a ConfigContainer
    cfg.train.train_iters = 10  # change fields directly...
    apply_overrides(cfg, sys.argv[1:])  # ...or with the command line's dotted overrides
    try:
        state = train(cfg)
    finally:
        runtime.shutdown()
    print(f"done at iteration {state.iteration}; checkpoints in {cfg.checkpoint.save}")


if __name__ == "__main__":
    main()
