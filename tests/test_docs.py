"""The formats table in docs/formats.md is generated from the format descriptions."""
import re
from pathlib import Path

from qcompile.formats import markdown_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def test_formats_table_in_docs_is_current():
    text = DOCS.read_text()
    m = re.search(r"<!-- formats-table:start -->\n(.*?)\n<!-- formats-table:end -->", text, re.S)
    assert m, "docs/formats.md lost its table markers"
    assert m[1].strip() == markdown_table().strip(), (
        "docs/formats.md is out of date: regenerate the table with "
        "python -c 'from qcompile.formats import markdown_table; print(markdown_table())'")


def test_every_preset_has_a_row_in_docs():
    text = DOCS.read_text()
    from qcompile.formats import names
    missing = [n for n in names() if f"| `{n}` |" not in text]
    assert not missing
