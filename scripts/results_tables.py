"""Renders the measured tables of README.md and docs/*.md from benchmarks/results/*.json.

A table is a marker in a page, then what the script writes under it, then an end marker::

    <!-- table: benchmarks/results/step_h200.json | rows: rows | where: precision=bf16 |
         columns: model, batch, length, train_ms=train (ms):.2f -->
    (the rendered table and its source line)
    <!-- end table -->

(one line in the page). ``rows`` is the path (``/``-separated keys) to a list of objects, or to
an object of objects (each key but ``provenance`` becomes the column ``_key``); ``where`` keeps rows whose values
(as text) equal the given ones; ``columns`` lists keys (``/`` for nested ones) with an optional
``=header`` and ``:format`` (a Python format spec; ``pm`` prints ``[mean, std]`` or
``{"mean", "std"}`` as ``mean ± std`` with 4 decimals, the mean alone when std is null).
Missing values print as ``-``. ``pivot: ROWKEY, COLKEY`` makes one line per value of ROWKEY and
one column per value of COLKEY listed in ``columns``, each cell the ``cell`` keys of the row with
both values. Each table ends with a line naming its JSON file, which holds the provenance
(hardware, versions, commit, date, command).

    python scripts/results_tables.py          # rewrite the tables in place
    python scripts/results_tables.py --check  # exit 1 and name each table that differs
"""

import argparse
import glob
import json
import os
import re
import sys
from typing import Any, Dict, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"^<!-- table: (?P<spec>.+?) -->\n(?P<body>.*?)^<!-- end table -->$", re.M | re.S)


class TableError(ValueError):
    pass


def pages() -> List[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def parse_spec(spec: str) -> Dict[str, str]:
    parts = [part.strip() for part in spec.split("|")]
    fields = {"file": parts[0]}
    for part in parts[1:]:
        name, _, value = part.partition(":")
        fields[name.strip()] = value.strip()
    if "columns" not in fields:
        raise TableError(f"table of {parts[0]} names no columns")
    return fields


def lookup(node: Any, path: str) -> Any:
    for key in path.split("/") if path else []:
        if isinstance(node, list) and key.isdigit():
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return None
    return node


def rows_of(data: Any, path: str) -> List[Dict[str, Any]]:
    node = lookup(data, path)
    if isinstance(node, dict):
        return [
            {"_key": key, **value} for key, value in node.items() if isinstance(value, dict) and key != "provenance"
        ]
    if not isinstance(node, list):
        raise TableError(f"rows: {path!r} is not a list or an object of objects")
    return node


def columns_of(text: str) -> List[Tuple[str, str, str]]:
    """``key=header:format`` items -> (key, header, format)."""
    columns = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, equals, rest = item.partition("=")
        if not equals:  # key:format
            key, _, fmt = item.rpartition(":") if ":" in item else (item, "", "")
            columns.append((key.strip(), key.strip(), fmt.strip()))
            continue
        header, fmt = rest, ""
        if ":" in rest:
            header, _, fmt = rest.rpartition(":")
        columns.append((key.strip(), header.strip() or key.strip(), fmt.strip()))
    return columns


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "pm":
        mean, std = (value["mean"], value["std"]) if isinstance(value, dict) else value
        return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError as error:
            raise TableError(f"format {fmt!r} of {value!r}: {error}") from None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value).replace("|", "/")


def render(spec: str) -> str:
    fields = parse_spec(spec)
    path = os.path.join(ROOT, fields["file"])
    if not os.path.isfile(path):
        raise TableError(f"table source {fields['file']} does not exist")
    with open(path) as f:
        data = json.load(f)
    rows = rows_of(data, fields.get("rows", ""))
    for condition in filter(None, (c.strip() for c in fields.get("where", "").split(","))):
        key, _, wanted = condition.partition("=")
        rows = [row for row in rows if str(lookup(row, key.strip())) == wanted.strip()]
    if not rows:
        raise TableError(f"table of {fields['file']} selects no rows ({spec})")
    if "pivot" in fields:
        lines = pivot(rows, fields)
    else:
        columns = columns_of(fields["columns"])
        lines = ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            lines.append("| " + " | ".join(cell(lookup(row, key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + f"\n\nSource: `{fields['file']}`.\n"


def pivot(rows: List[Dict[str, Any]], fields: Dict[str, str]) -> List[str]:
    """``pivot: ROWKEY[=header], COLKEY`` with ``columns: value, ...`` (COLKEY's values, in order) and
    ``cell: key:format, ...`` (joined by " / "): one line per ROWKEY value, "-" where no row has
    that column."""
    row_spec, col_key = (part.strip() for part in fields["pivot"].split(","))
    row_key, _, label = row_spec.partition("=")
    order = [name.strip() for name in fields["columns"].split(",")]
    cells = columns_of(fields.get("cell", ""))
    lines = ["| " + " | ".join([label or row_key] + order) + " |", "|" + "---|" * (len(order) + 1)]
    for name in dict.fromkeys(lookup(row, row_key) for row in rows if lookup(row, row_key) is not None):
        mine = {lookup(row, col_key): row for row in rows if lookup(row, row_key) == name}
        values = [
            " / ".join(cell(lookup(mine[column], key), fmt) for key, _, fmt in cells) if column in mine else "-"
            for column in order
        ]
        lines.append("| " + " | ".join([str(name)] + values) + " |")
    return lines


def rewrite(text: str) -> str:
    return MARKER.sub(lambda m: f"<!-- table: {m['spec']} -->\n{render(m['spec'])}<!-- end table -->", text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        with open(page) as f:
            text = f.read()
        try:
            new = rewrite(text)
        except TableError as error:
            print(f"{os.path.relpath(page, ROOT)}: {error}", file=sys.stderr)
            return 2
        if new == text:
            continue
        stale.append(os.path.relpath(page, ROOT))
        if not args.check:
            with open(page, "w") as f:
                f.write(new)
    if args.check and stale:
        print(f"tables differ from their JSON in: {', '.join(stale)}; run python scripts/results_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
