"""The README's Python example runs as written, and its commands name options that exist."""

import re
from pathlib import Path

import torch

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_python_example_runs():
    (code,) = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- running the README is the point
    assert scope["out"].shape == (2, 3, 64, 96) and scope["latents"].shape == (4, 4, 32, 64)
    assert torch.isfinite(scope["latents"]).all()


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
