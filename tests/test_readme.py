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
    from lego.eval import parser as eval_parser
    from lego.sample import parser as sample_parser
    from lego.train import parser as train_parser

    parsers = (train_parser(), sample_parser(), eval_parser())
    known = {a for p in parsers for action in p._actions for a in action.option_strings}
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", README)) - {"--no-deps", "--no-build-isolation"}  # pip's
    assert used <= known, f"README names options the CLIs lack: {sorted(used - known)}"
