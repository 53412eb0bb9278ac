"""The README's Python example runs as written, and its commands name options that exist."""

import re
import shutil
from pathlib import Path

import torch

README = (Path(__file__).parent.parent / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_python_example_runs():
    scope = {}
    exec(compile(EXAMPLES[0], "README.md", "exec"), scope)  # noqa: S102 -- running the README is the point
    assert scope["out"].shape == (2, 3, 64, 96) and scope["latents"].shape == (4, 4, 32, 64)
    assert torch.isfinite(scope["latents"]).all()


def test_loading_example_runs(tmp_path, monkeypatch):
    """The second example loads the demo's checkpoint: here the tiny fixture, a model of the same kind."""
    assert len(EXAMPLES) == 2
    (tmp_path / "runs" / "lego").mkdir(parents=True)
    shutil.copy(
        Path(__file__).parent / "fixtures" / "tiny_mnist.safetensors", tmp_path / "runs/lego/checkpoint.safetensors"
    )
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(EXAMPLES[1], "README.md", "exec"), scope)  # noqa: S102
    assert scope["images"].shape == (16, 1, 16, 16) and torch.equal(scope["labels"], torch.arange(16) % 10)
    assert scope["wide"].shape == (2, 1, 16, 64) and torch.isfinite(scope["wide"]).all()


def test_cli_options_in_the_readme_exist():
    import importlib

    from torch.distributed.run import get_args_parser as torchrun_parser

    modules = ("lego.train", "lego.sample", "lego.encode", "lego.convert", "lego.eval")
    parsers = [importlib.import_module(m).parser() for m in modules] + [torchrun_parser()]
    known = {a for p in parsers for action in p._actions for a in action.option_strings}
    for script in ("report.py", "static.py"):  # python -m benchmarks.report / benchmarks.static
        text = (Path(__file__).parent.parent / "benchmarks" / script).read_text()
        known |= set(re.findall(r'add_argument\(\s*"(--[a-z][a-z-]+)"', text))
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README)) - {"--no-deps", "--no-build-isolation"}  # pip's
    assert used <= known, f"README names options the CLIs lack: {sorted(used - known)}"
