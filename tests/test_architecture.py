"""The packages' import rules (README's Architecture): a model family knows nothing of parallelism, training or checkpoint
formats (those are applied to it from outside; pytrain.specs, above both, bundles a family with its checkpoint
adapters), nor of the config; the config nothing of the model package (both read the model fields from
pytrain.model_args, which imports nothing of pytrain); and pytrain.kernels, which other projects import alone,
nothing of pytrain outside itself; the layout (pytrain.parallel) no optimizer, data, checkpoint or monitor;
and no piece the assembly (pytrain.train, pytrain.initialize). Read from the sources, so an import inside a function counts too."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "pytrain"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """The absolute names of the modules `path` (a file under `root`) imports, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pytrain import parallel`
    return names


def within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


# package folder or module file: (the modules it must not import, the exceptions among them)
RULES = {
    "model": (
        (
            "pytrain.parallel",
            "pytrain.checkpoint",
            "pytrain.train",
            "pytrain.initialize",
            "pytrain.solver",
            "pytrain.data",
            "pytrain.monitor",
            "pytrain.config",
            "pytrain.specs",
            "torch.distributed",
        ),
        (),
    ),
    "config.py": (("pytrain.model", "pytrain.specs"), ()),
    "model_args.py": (("pytrain",), ()),
    "kernels": (("pytrain",), ("pytrain.kernels", "pytrain.triton", "pytrain._C", "pytrain._C_cuda")),
    # the layout and its application know no optimizer, data, checkpoint format or family registry
    "parallel": (
        (
            "pytrain.train",
            "pytrain.initialize",
            "pytrain.solver",
            "pytrain.data",
            "pytrain.checkpoint",
            "pytrain.monitor",
            "pytrain.specs",
        ),
        (),
    ),
    # the pieces a run is assembled from know nothing of the assembly
    **{
        where: (("pytrain.train", "pytrain.initialize"), ())
        for where in ("solver", "data", "monitor", "checkpoint", "specs.py")
    },
}


@pytest.mark.parametrize("where", list(RULES))
def test_a_package_imports_only_what_its_layer_may(where):
    forbidden, allowed = RULES[where]
    path = PACKAGE / where
    broken = {
        f"{source.relative_to(ROOT)}: {name}"
        for source in ([path] if path.is_file() else sorted(path.rglob("*.py")))
        for name in imported_modules(source)
        if within(name, forbidden) and not within(name, allowed)
    }
    assert not broken, sorted(broken)


def test_the_rule_reader_resolves_relative_and_function_level_imports(tmp_path):
    path = tmp_path / "pytrain" / "model" / "example.py"
    path.parent.mkdir(parents=True)
    path.write_text(
        "from .decoder import Decoder\n\ndef f():\n    from .. import parallel\n    import torch.distributed\n"
    )
    names = imported_modules(path, root=tmp_path)
    assert {"pytrain.model.decoder", "pytrain.parallel", "torch.distributed"} <= names
    forbidden, allowed = RULES["model"]
    assert {name for name in names if within(name, forbidden) and not within(name, allowed)} == {
        "pytrain.parallel",
        "torch.distributed",
    }
