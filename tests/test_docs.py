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
