"""The import boundaries docs/design.md promises, checked on the source so they stay true."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "memlens"
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"

# Modules whose import must not pull in torch (readers, metrics, the command line).
TORCH_FREE = ["memlens", "memlens.errors", "memlens.rundir", "memlens.prompts", "memlens.metrics", "memlens.maps",
              "memlens.evaluate", "memlens.report", "memlens.cli", "memlens.mitigation.cli", "memlens.testbed.cli",
              "memlens.testbed.items"]


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(("memlens", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def all_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def calls(tree: ast.Module, dotted: str) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if isinstance(f.value, ast.Name) and f"{f.value.id}.{f.attr}" == dotted:
                return True
    return False


def test_torch_free_modules_import_no_torch():
    code = "import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) + \
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n" \
        "assert not bad, bad\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_help_answers_without_torch():
    code = ("import sys\nfrom memlens.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert not e.code\nassert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for command in ("scan", "evaluate", "report", "demo", "mitigate", "testbed"):
        assert command in done.stdout


def test_typer_only_in_command_modules():
    for name, tree in modules().items():
        if "typer" in all_imports(tree):
            assert name.endswith(".cli") or name == "memlens.cli", f"{name} imports typer; commands live in cli.py"


# Training entry points of the organism still set threads and seeds themselves (integrator's files; see the
# report of issue 12). Everything else leaves process-wide state to the command line.
PROCESS_STATE_ALLOWED = {"memlens.cli", "memlens.testbed.cli"}


@pytest.mark.parametrize("call", ["torch.set_num_threads", "torch.manual_seed", "logging.basicConfig"])
def test_library_modules_leave_process_state_alone(call):
    for name, tree in modules().items():
        # The tiny-pipeline builders seed inside torch.random.fork_rng (checked below), which restores the state.
        if name in PROCESS_STATE_ALLOWED or name in TESTING_BUILDERS and call == "torch.manual_seed":
            continue
        assert not calls(tree, call), f"{name} calls {call}"


# These seed torch only inside torch.random.fork_rng (tested: the caller's RNG state is unchanged).
TESTING_BUILDERS = {"memlens.testing", "memlens.testing_dit", "memlens.testbed.train", "memlens.testbed.clip"}


@pytest.mark.parametrize("family", ["sd1", "pixart", "sd3", "flux"])
def test_testing_builders_keep_the_global_rng(family):
    import torch

    from memlens.testing import tiny_pipeline
    from memlens.testing_dit import tiny_dit_pipeline

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    (tiny_pipeline if family == "sd1" else tiny_dit_pipeline)(family)
    assert torch.equal(torch.rand(3), expected)


def test_mitigation_and_testbed_training_do_not_import_each_other():
    mods = modules()
    assert "memlens.testbed.train" not in all_imports(mods["memlens.mitigation.training"])
    assert not any(m.startswith("memlens.mitigation") for m in all_imports(mods["memlens.imagefolder"]))


def test_one_atomic_write_in_src():
    # One implementation of write-to-temp + rename: memlens.rundir.atomic_write (and the rename of the organism's
    # ground-truth folder, a whole-folder swap).
    users = [name for name, tree in modules().items() if calls(tree, "os.replace")]
    assert users == ["memlens.rundir"], users


def test_every_module_has_a_room_in_design_md():
    text = DESIGN.read_text(encoding="utf-8")
    for name in modules():
        leaf = name.split(".")[-1]
        if leaf.startswith("_") or name in ("memlens", "memlens.__main__"):
            continue
        assert f"{leaf}.py" in text or f"{leaf}/" in text, f"docs/design.md does not mention {name}"


def test_design_md_torch_free_list_matches():
    text = DESIGN.read_text(encoding="utf-8")
    for m in ("rundir", "metrics", "prompts", "evaluate", "report", "cli"):
        assert m in text.split("## Imports")[1], f"docs/design.md's import section does not list {m}"
