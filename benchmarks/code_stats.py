"""How heavy is each algorithm file to read? Code lines, the longest function, the header and the run plumbing.

    python benchmarks/code_stats.py                    # the seven algorithm files
    python benchmarks/code_stats.py algorithms/iql.py path/to/other_file.py

Code lines: lines holding a token that is not a comment, a blank line or a docstring (module, class, function).
Longest function: its code lines. Header: the module docstring's lines. Plumbing: code lines below the
"# Run plumbing:" banner (the block that is the same text in every algorithm file), and their share of the code.
"""
import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALGOS = ("iql", "cal_ql", "aca", "pex", "o2sac", "o2td3", "o2ppo")
BANNER = "# Run plumbing:"


def code_lines(src: str) -> set:
    """Line numbers that hold code (not comments, blank lines or docstrings)."""
    doc = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                doc |= set(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in skip:
            lines |= {n for n in range(tok.start[0], tok.end[0] + 1) if n not in doc}
    return lines


def stats(path: Path) -> dict:
    src = path.read_text()
    tree, code = ast.parse(src), code_lines(src)
    functions = [(len([n for n in code if f.lineno <= n <= f.end_lineno]), f.name) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    banner = src[:src.index(BANNER)].count("\n") if BANNER in src else None
    plumbing = len([n for n in code if banner is not None and n > banner])
    return {"file": str(path), "lines": src.count("\n"), "code_lines": len(code),
            "longest_function": max(functions, default=(0, "-")),
            "header_lines": len((ast.get_docstring(tree) or "").splitlines()),
            "plumbing_lines": plumbing, "plumbing_share": plumbing / max(len(code), 1)}


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or [ROOT / "algorithms" / f"{a}.py" for a in ALGOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: no such file: {', '.join(missing)}")
    print("| file | lines | code lines | longest function | header lines | plumbing (share of code) |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        s = stats(p)
        n, name = s["longest_function"]
        print(f"| {p.name} | {s['lines']} | {s['code_lines']} | {name} {n} | {s['header_lines']} | "
              f"{s['plumbing_lines']} ({100 * s['plumbing_share']:.0f}%) |")


if __name__ == "__main__":
    main()
