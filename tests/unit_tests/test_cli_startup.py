"""The CLI answers at once: commands that only list or check arguments import no torch,
Megatron-Core or transformers, and the torch-free listings agree with the registries."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megabridge import catalog, doctor

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "megatron", "transformers", "numpy")
LIGHT_COMMANDS = [
    ["--help"],
    ["models"],
    ["models", "--markdown"],
    ["recipes"],
    ["doctor"],
    ["convert"],  # an argument error
    ["train", "--recipe", "no_such_recipe"],  # a user error
    ["train", "train.train_iters=five"],  # a bad override, found before the training stack loads
    ["convert", "hf-to-megatron", "--help"],
]
# Paths that cannot be used are refused before the command's heavy imports:
# (argv, the one error line's start).
_MISSING, _SRC = "/nonexistent-megabridge/x", str(REPO / "src")
PATH_ERRORS = [
    (["convert", "hf-to-megatron", "--hf-path", _MISSING, "--megatron-path", "out"],
     f"--hf-path {_MISSING} does not exist"),
    (["convert", "megatron-to-hf", "--megatron-path", _SRC, "--hf-path", str(REPO / "tests")],
     f"output {REPO / 'tests'} already exists (pass --overwrite"),
    (["verify", "--hf-path", _SRC, "--megatron-path", _MISSING],
     f"--megatron-path {_MISSING} does not exist"),
    (["export", "--megatron-path", _SRC, "--adapter-path", f"{_SRC}/adapter"],
     f"output {_SRC}/adapter overlaps the input {_SRC}"),
    (["data", "preprocess", "--input", _MISSING, "--tokenizer", _SRC, "--output-prefix", "x"],
     f"--input {_MISSING} does not exist"),
]  # fmt: skip
LIGHT_COMMANDS += [argv for argv, _ in PATH_ERRORS]

# One interpreter runs every command in turn and reports what each left in sys.modules.
_PROBE = """
import contextlib, io, json, sys
from megabridge.cli import main
report = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
    report.append({"argv": argv, "code": code, "heavy": heavy, "out": out.getvalue(),
                   "err": err.getvalue()})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def light_runs():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(LIGHT_COMMANDS), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {" ".join(r["argv"]): r for r in json.loads(result.stdout)}


def test_listing_commands_import_nothing_heavy(light_runs):
    loaded = {argv: r["heavy"] for argv, r in light_runs.items() if r["heavy"]}
    assert not loaded, f"heavy modules imported: {loaded}"


def test_light_commands_answer(light_runs):
    assert light_runs["--help"]["code"] == 0 and "doctor" in light_runs["--help"]["out"]
    assert light_runs["models"]["out"].count("\n") == len(catalog.families())
    assert "vanilla_gpt_pretrain_config" in light_runs["recipes"]["out"]
    assert light_runs["convert"]["code"] == 2
    unknown = light_runs["train --recipe no_such_recipe"]
    assert unknown["code"] == 2
    assert unknown["err"].startswith("megabridge: error: unknown recipe 'no_such_recipe'")
    assert "tested combination" in light_runs["doctor"]["out"]
    bad = light_runs["train train.train_iters=five"]
    assert bad["code"] == 2 and "train.train_iters='five': expected int" in bad["err"]


def test_recipe_listing_is_the_recipe_registry():
    """catalog reads recipes.py files as text; recipes.all_recipes() imports them."""
    from megabridge.recipes import all_recipes, describe_recipe

    assert catalog.recipes() == {name: describe_recipe(name) for name in all_recipes()}


def test_family_listing_is_every_family_folder_with_a_bridge():
    folders = {p.parent.name for p in (REPO / "src/megabridge/models").glob("*/bridge.py")}
    assert {f["family"] for f in catalog.families()} == folders


def _locked(name: str) -> str:
    lock = (REPO / "uv.lock").read_text()
    return re.search(rf'\nname = "{name}"\nversion = "([^"]+)"', lock).group(1)


def test_first_tested_combination_is_the_lock():
    row = doctor.TESTED[0]
    assert {k: row[k] for k in ("torch", "transformers", "megatron-core")} == {
        k: _locked(k) for k in ("torch", "transformers", "megatron-core")
    }


def test_tested_row_matches_versions_only():
    row = doctor.TESTED[0]
    found = {"torch": row["torch"] + "+cu132", "transformers": row["transformers"],
             "megatron-core": row["megatron-core"], "python": row["python"] + ".9"}  # fmt: skip
    assert doctor.tested_row(found) is row
    assert doctor.tested_row({**found, "transformers": "4.0.0"}) is None
    assert doctor.tested_row({**found, "python": "3.99.0"}) is None


def test_readme_compatibility_table_is_doctors():
    readme = (REPO / "README.md").read_text()
    assert doctor.markdown_table() in readme, "regenerate: megabridge doctor --markdown"


@pytest.mark.parametrize("argv, error", PATH_ERRORS, ids=[" ".join(a[:2]) for a, _ in PATH_ERRORS])
def test_unusable_paths_are_refused_before_the_heavy_imports(light_runs, argv, error):
    run = light_runs[" ".join(argv)]
    assert run["code"] == 2 and run["err"].startswith(f"megabridge: error: {error}"), run
    assert run["err"].count("\n") == 1
