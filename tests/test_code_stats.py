"""benchmarks/code_stats.py counts code lines as the readability goals do, and the algorithm files keep them: no
function over 120 code lines, a header of at most 60 lines, train() before the run plumbing."""
import pytest

from conftest import ROOT
import code_stats


def test_code_lines_skip_comments_blank_lines_and_docstrings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""Module\ndocstring."""\n# a comment\n\ndef f(x):\n    """Doc."""\n    y = (x +\n         1)  # c\n'
                    '    return y\n')
    s = code_stats.stats(path)
    assert code_stats.code_lines(path.read_text()) == {5, 7, 8, 9}
    assert s["longest_function"] == (4, "f") and s["header_lines"] == 2 and s["plumbing_lines"] == 0


@pytest.mark.parametrize("name", code_stats.ALGOS)
def test_algorithm_files_stay_readable(name):
    s = code_stats.stats(ROOT / "algorithms" / f"{name}.py")
    assert s["longest_function"][0] <= 120, f"{name}.py: {s['longest_function'][1]} has {s['longest_function'][0]} " \
                                            "code lines (at most 120: split it into named steps)"
    assert s["header_lines"] <= 60, f"{name}.py: a header of {s['header_lines']} lines (at most 60: move the " \
                                    f"long explanations to docs/{name}.md)"
    assert s["plumbing_lines"] > 0
