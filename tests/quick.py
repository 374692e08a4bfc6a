"""The quick tier: ``uv run pytest tests -m quick`` (a few minutes on 2 cores).

A contributor's check before a commit, not a replacement for CI's full suite. It
touches every area once: the CLI (start-up and one-line errors), one family end to
end (Llama: config, bit-exact round trip, logits and gradients against transformers,
the convert CLI), one multi-process check (TP=2 training equals one process),
training, data, PEFT, and the docs/layer checks. tests/conftest.py marks these
tests ``quick``; a listed test that no longer exists stops the run.

An entry is a file, a test (all its parameters) or one parametrised case.
"""

QUICK = [
    # the CLI: answers at once; bad input is one line and exit code 2
    "tests/unit_tests/test_cli_startup.py",
    "tests/functional_tests/test_conversion_cli.py::test_missing_folder",
    "tests/functional_tests/test_training.py::test_bad_overrides_exit_2_with_one_line"
    "[train.train_itres=5-did you mean train.train_iters]",
    # one family end to end
    "tests/unit_tests/models/test_conformance.py::test_config_round_trip[llama-base]",
    "tests/unit_tests/models/test_conformance.py::test_round_trip_bit_exact[llama-base-fp32]",
    "tests/unit_tests/models/test_conformance.py::test_logits_match_transformers[llama-base]",
    "tests/unit_tests/models/test_conformance.py::test_gradients_match_transformers[llama-base]",
    "tests/unit_tests/models/test_conformance.py::test_verify_rejects_perturbed_weights[llama]",
    "tests/functional_tests/test_conversion_cli.py::test_cli_round_trip_is_bit_exact",
    # vision-language: logits on images (in-process, seconds)
    "tests/unit_tests/models/test_vision_language.py::test_logits_on_images_match_transformers",
    "tests/unit_tests/models/test_qwen3_vl.py::test_logits_on_images_match_transformers[qwen3_vl]",
    "tests/unit_tests/models/test_llava.py::test_logits_on_images_match_transformers[base]",
    # vision-language SFT: a mixed-size image batch's loss against transformers (seconds)
    "tests/unit_tests/data/test_vision_sft.py::test_mixed_size_batch_loss_matches_transformers",
    # one parallel check; training
    "tests/functional_tests/test_training.py::test_parallel_losses_equal_single_process[tp2]",
    "tests/functional_tests/test_training.py::test_quick_run_trains_logs_and_checkpoints",
    "tests/unit_tests/training/test_config.py",
    "tests/unit_tests/training/test_console.py",
    "tests/unit_tests/test_progress.py",
    # data
    "tests/unit_tests/data/test_sft.py",
    "tests/unit_tests/data/test_preprocess.py::test_documents_are_tokenized_in_order_with_eod",
    "tests/unit_tests/data/test_preprocess.py::test_cli_reports_bad_input_in_one_line_with_exit_2",
    # PEFT
    "tests/unit_tests/peft/test_lora.py::test_target_module_errors",
    "tests/unit_tests/peft/test_lora.py::test_adapted_model_starts_equal_to_base",
    # docs and the import layers
    "tests/unit_tests/docs/test_layers.py",
    "tests/unit_tests/docs/test_examples.py::test_readme_family_table_is_the_registry",
]


def selects(entry: str, nodeid: str) -> bool:
    return nodeid == entry or nodeid.startswith((entry + "::", entry + "["))
