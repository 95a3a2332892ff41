"""Replace a generated section of README.md: the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_section(name: str, markdown: str, readme: Path = README) -> None:
    text = readme.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no '{begin}' ... '{end}' markers for the generated '{name}' section")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
