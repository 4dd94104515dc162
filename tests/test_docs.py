"""The project's documentation stands on its own: the README links the design file that ships
with the repository, and every ``docs/design.md §N`` the code cites names a section there."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_links_the_design_file_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/design.md)" in readme
    assert "shared/DESIGN" not in readme  # the team workspace is not part of a clone
    assert (ROOT / "docs" / "design.md").is_file()


def test_every_design_section_the_code_cites_exists():
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)?[a-z]?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M)
    cited = {}
    for folder in ("turbo_core", "kernels", "dags", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for section in re.findall(r"docs/design\.md §(\d+(?:\.\d+)?[a-z]?)", path.read_text()):
                cited.setdefault(section, []).append(path.relative_to(ROOT).as_posix())
    assert cited, "no code cites docs/design.md (the check would be empty)"
    missing = {s: paths for s, paths in cited.items() if s not in heads}
    assert not missing, f"cited sections not in docs/design.md (it has {heads}): {missing}"


def _links(md: Path) -> list[tuple[str, str]]:
    """(target, anchor) of every relative Markdown link and image in ``md``."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        out.append((path, anchor))
    return out


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6} (.+)$", md.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for path, anchor in _links(page):
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {path}")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {path}#{anchor} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
