"""The rule table of docs/spec-oracle.md, written from :data:`~.rules.RULES`.

``python -m vmem_guest.conformance.rules_doc`` prints it; a unit test checks
that the page holds exactly this text, so the page and the table never part.
"""

from __future__ import annotations

from vmem_guest.conformance.rules import RULES, Rule, Side


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _device_row(rule: Rule) -> str:
    how = "**yes**" if rule.checked else f"no: {rule.unchecked}"
    if rule.source == "description":
        how += " (descriptive text)"
    return (
        f"| `{rule.id}` | {rule.section} | {rule.level} | {_cell(how)} | {_cell(rule.sentence)} |"
    )


def _driver_row(rule: Rule) -> str:
    return (
        f"| `{rule.id}` | {rule.section} | {rule.level} | {_cell(rule.kept_by)} |"
        f" {_cell(rule.sentence)} |"
    )


def table() -> str:
    """Both tables, device rules then driver rules, in the order of :data:`RULES`."""
    lines = [
        "### Device rules",
        "",
        "| rule | section | level | checked by the oracle | the spec's sentence |",
        "|---|---|---|---|---|",
        *(_device_row(rule) for rule in RULES if rule.side is Side.DEVICE),
        "",
        "### Driver rules (the agent's own obligations; not checked by the oracle)",
        "",
        "| rule | section | level | where the agent keeps it | the spec's sentence |",
        "|---|---|---|---|---|",
        *(_driver_row(rule) for rule in RULES if rule.side is Side.DRIVER),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
