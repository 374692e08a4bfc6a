"""Launch a recipe: the same as `megabridge train`, for torchrun and Slurm scripts.

    uv run python -m torch.distributed.run --nproc_per_node=2 \
        scripts/training/run_recipe.py --recipe vanilla_gpt_pretrain_config \
        train.train_iters=5 model.tensor_model_parallel_size=2
"""

import sys

from megabridge.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
