"""Execute notebooks/quickstart.ipynb headless (nbclient) and check what it prints.

The kernel runs with the repository root as its working directory and on its PYTHONPATH, so
`import lca` finds the in-place build (lca/_C*.so), exactly as the test suite does.
Skipped only when nbclient / nbformat / ipykernel are not installed.
"""
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after a full headless run, and all its text output joined."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        "MPLBACKEND": "Agg",                      # headless; the notebook selects inline itself
        "MPLCONFIGDIR": str(tmp_path_factory.mktemp("mplconfig")),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)                        # the kernel inherits this environment
    try:
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", timeout=300, allow_errors=False,
            resources={"metadata": {"path": str(ROOT)}})
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:    # name the failing cell
            pytest.fail(f"notebook cell failed:\n{e}", pytrace=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                text.append(o.text)
            elif o.output_type in ("execute_result", "display_data"):
                text.append(o.get("data", {}).get("text/plain", ""))
    return nb, "".join(text)


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"cell {i} has saved outputs; clear them before committing"


def test_runs_without_errors(executed):
    nb, _ = executed
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            assert o.output_type != "error", f"cell {i}: {o.ename}: {o.evalue}"


def test_printed_results(executed):
    _, text = executed
    assert "out (1, 1024, 4, 64) float32, lse (1, 4, 1024) float32" in text
    assert "T=131072: 9152 entries kept, 93.0% smaller" in text
    assert "alpha rows sum to 1: True" in text
    assert "anchor == argmax(alpha): True" in text
    assert "kpos_bar == kpos at the anchor: True" in text
    assert "GQA out (1, 1024, 8, 32)" in text

    # exact attention (window >= L) matches dense causal attention to float32 precision
    m = re.search(r"exact \(window >= L\) vs dense causal attention: (\S+)", text)
    assert m and float(m.group(1)) < 1e-5, text
    # one row against the float64 reference; attend(condense(...)) == attention
    m = re.search(r"row t=\d+ sees \d+ condensed entries; max \|diff\| = (\S+)", text)
    assert m and float(m.group(1)) < 1e-12, text
    m = re.search(r"attend\(condense\(\.\.\.\)\) vs attention: max \|diff\| = (\S+)", text)
    assert m and float(m.group(1)) < 1e-5, text
    # the central finite difference agrees with attention_backward
    m = re.search(r"rel err (\S+)", text)
    assert m and float(m.group(1)) < 1e-6, text
    # a condensation of one's own (mean pooling) trained through gqa_attend_backward
    m = re.search(r"own condensation: .* relative difference (\S+)", text)
    assert m and float(m.group(1)) < 1e-6, text


def test_plot_rendered(executed):
    nb, _ = executed
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 1, f"expected one inline plot, got {len(images)}"
