"""Replace a generated section of README.md or a docs/ page: the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->`."""
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
DOCS = README.parent / "docs"  # the pages of the long generated sections (benchmarks.md, datasets.md, speed.md)


def replace_section(name: str, markdown: str, readme: Path = README) -> None:
    text = readme.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no '{begin}' ... '{end}' markers for the generated '{name}' section")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")


def update_readme(name: str, markdown: str, readme: Path = README) -> int:
    """replace_section for a command line: 0 when done, 2 (with the reason on stderr) when the markers are missing."""
    import sys
    try:
        replace_section(name, markdown, Path(readme))
    except ValueError as e:
        print(f"error: {e}; add the two marker lines where the section goes, then re-run", file=sys.stderr)
        return 2
    print(f"replaced the `{name}` section of {readme}")
    return 0
