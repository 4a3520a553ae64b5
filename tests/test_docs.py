"""The README is a front door: its tables are generated, its links lead somewhere, and every docs page is reachable."""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)#\s]+\.md)(#[\w-]+)?\)")


def _generate():
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    return generate


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return "#" + re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_generated_table_equals_what_its_committed_source_renders():
    generate = _generate()
    for page in generate.PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        _, stale = generate.render(text, page)
        assert stale == [], f"{page}: run python docs/generate.py --write ({stale})"


def test_a_stale_table_is_caught(tmp_path):
    generate = _generate()
    name = next(iter(generate.BLOCKS))
    text = f"<!-- generated: {name} -->\n| typed | by hand |\n<!-- /generated: {name} -->\n"
    new, stale = generate.render(text, "example.md")
    assert stale == [name] and "typed" not in new


def test_links_resolve_and_every_docs_page_is_linked_from_the_readme():
    generate = _generate()
    linked_from_readme = set()
    for page in generate.PAGES:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target, anchor in LINK.findall(text):
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target))
            assert os.path.isfile(path), f"{page} links to {target}, which does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", open(path, encoding="utf-8").read(), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page} links to {target}{anchor}: no such heading"
            if page == "README.md":
                linked_from_readme.add(os.path.relpath(path, ROOT))
    pages = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert pages - linked_from_readme == set()
