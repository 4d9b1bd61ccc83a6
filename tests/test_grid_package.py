"""The ``indistill.grid`` package: every name the former ``grid.py`` module offered is importable from the
package, and each of its modules keeps its functions short (issue 20)."""

import ast
from pathlib import Path

import indistill.grid as grid

GRID = Path(grid.__file__).parent

#: what ``from indistill.grid import ...`` gave before the module became a package
FORMER_NAMES = (
    "HEADLINE", "POWER", "COMMAND_FILE", "ORDERS", "Cell", "Grid", "add_grid_parser", "arms_on_disk", "cell_dir",
    "cmd_grid", "comparisons", "default_workers", "describe", "grid_eta", "grid_markdown", "grid_record", "paired",
    "pairs_of", "plot_grid", "reported_cells", "run_cells", "schedule", "summarise", "win_label",
)


def test_the_package_offers_every_name_of_the_former_module():
    assert [n for n in FORMER_NAMES if not hasattr(grid, n)] == []
    assert set(grid.__all__) >= set(FORMER_NAMES)


def test_no_function_of_the_grid_package_is_over_60_lines():
    long = []
    for path in sorted(GRID.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name}")
    assert long == []
