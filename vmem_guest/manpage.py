"""The vmem-guest(1) man page, written from the click commands themselves.

``make man`` writes it to docs/man/vmem-guest.1 (``python -m vmem_guest.manpage
PATH``); tests/unit/test_manpage.py fails when the committed page is stale. Only
what a command declares is read (names, help, types, ``show_default`` defaults), not
click's help formatter, so the page is the same on every supported click (8.1.3 on).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import click

from vmem_guest import __version__, cli

PROG = "vmem-guest"
HELP_TEXT = "Show the help of the program or the command and exit."


def escape(text: str) -> str:
    """Text that roff prints as given: backslashes escaped, and a line that would
    start with a control character ('.' or "'") starts with a zero-width ``\\&``."""
    text = text.replace("\\", "\\e")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def literal(text: str) -> str:
    """A name, path or value typed as is: its hyphens are minus signs, which copy as
    ASCII hyphens and where roff does not break a line (groff(7), "cflags")."""
    return escape(text).replace("-", "\\-")


def paragraphs(doc: str | None) -> list[str]:
    """A docstring's paragraphs, each joined into one line (man fills them again)."""
    text = inspect.cleandoc(doc or "")
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def metavar(param: click.Parameter) -> str:
    """What follows an option's name, or an argument's name in a synopsis."""
    if param.metavar:
        return param.metavar
    if isinstance(param.type, click.Choice) and not long_choice(param.type):
        return "[" + "|".join(str(choice) for choice in param.type.choices) + "]"
    if isinstance(param, click.Argument):
        return (param.name or "").upper()
    if isinstance(param.type, click.IntRange | click.FloatRange):  # bounds: range_text
        return "INTEGER" if isinstance(param.type, click.IntRange) else "FLOAT"
    return param.type.name.upper()


def long_choice(param_type: click.ParamType[Any]) -> bool:
    """A choice too long to print as ``[a|b|c]`` (a line roff cannot break): its
    metavar is then CHOICE and the choices follow the help."""
    if not isinstance(param_type, click.Choice):
        return False
    return sum(len(str(choice)) + 1 for choice in param_type.choices) > 40


def range_text(param_type: click.ParamType[Any]) -> str | None:
    """An IntRange's or FloatRange's bounds, in words."""
    if not isinstance(param_type, click.IntRange | click.FloatRange):
        return None
    low, high = param_type.min, param_type.max
    if low is not None and high is not None:
        return f"from {low} to {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def default_text(option: click.Option) -> str | None:
    """The default the help shows (``show_default=True`` only: where it is not shown,
    click 8.1 and 8.3+ hold different placeholders, and the help says it in words)."""
    if option.show_default is not True or option.default is None:
        return None
    if option.is_flag and option.secondary_opts:
        return option.opts[0] if option.default else option.secondary_opts[0]
    return str(option.default)


def option_notes(option: click.Option) -> list[str]:
    """What the help's bracket says after the text, already in roff."""
    notes = []
    if option.required:
        notes.append("required")
    if option.multiple:
        notes.append("repeatable")
    if isinstance(option.type, click.Choice) and long_choice(option.type):
        notes.append("one of: " + ", ".join(literal(str(c)) for c in option.type.choices))
    bounds = range_text(option.type)
    if bounds is not None:
        notes.append(bounds)
    default = default_text(option)
    if default is not None:
        notes.append(f"default: {literal(default)}")
    return notes


def option_entry(option: click.Option) -> list[str]:
    """One ``.TP`` entry: the names (and value) in bold, then the help."""
    names = ", ".join(f"\\fB{literal(name)}\\fR" for name in option.opts)
    if option.secondary_opts:
        names += " / " + ", ".join(f"\\fB{literal(name)}\\fR" for name in option.secondary_opts)
    if not option.is_flag:
        names += f" \\fI{literal(metavar(option))}\\fR"
    description = escape(" ".join(paragraphs(option.help)))
    notes = option_notes(option)
    if notes:
        description += f" [{'; '.join(notes)}]"
    return [".TP", names, description]


def synopsis(path: str, params: Iterable[click.Parameter]) -> str:
    """``vmem-guest sim [OPTIONS]``, with the command's arguments."""
    words = [f"\\fB{literal(path)}\\fR", "[\\fIOPTIONS\\fR]"]
    for param in params:
        if isinstance(param, click.Argument):
            word = f"\\fI{literal(metavar(param))}\\fR"
            words.append(word if param.required else f"[{word}]")
    return " ".join(words)


def command_section(name: str, command: click.Command) -> list[str]:
    lines = [".SS " + synopsis(f"{PROG} {name}", command.params)]
    for index, text in enumerate(paragraphs(command.help)):
        lines += ([] if index == 0 else [".PP"]) + [escape(text)]
    for param in command.params:
        if isinstance(param, click.Option):
            lines += option_entry(param)
    return lines


def render(group: click.Group = cli.cli, help_names: Sequence[str] = ("-h", "--help")) -> str:
    """The whole page, roff (man macros), ending in a newline."""
    summary, *description = paragraphs(group.help)
    summary = summary.removeprefix(f"{PROG}:").strip().rstrip(".")
    lines = [
        f'.TH VMEM\\-GUEST 1 "" "{PROG} {__version__}" "User Commands"',
        # Left-aligned, unhyphenated: paths and option names stay whole.
        ".ad l",
        ".nh",
        ".SH NAME",
        f"{literal(PROG)} \\- {escape(summary)}",
        ".SH SYNOPSIS",
        f"\\fB{literal(PROG)}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
    ]
    for index, text in enumerate(description):
        lines += ([] if index == 0 else [".PP"]) + [escape(text)]
    lines += [".SH OPTIONS"]
    for param in group.params:
        if isinstance(param, click.Option):
            lines += option_entry(param)
    lines += [".TP", ", ".join(f"\\fB{literal(name)}\\fR" for name in help_names), HELP_TEXT]
    lines += [
        ".PP",
        f"Every command takes {', '.join(literal(n) for n in help_names)} too.",
        ".SH COMMANDS",
    ]
    for name in sorted(group.commands):
        lines += command_section(name, group.commands[name])
    lines += trailer()
    return "\n".join(lines) + "\n"


def trailer() -> list[str]:
    """The sections no click declaration holds: exit status, environment, files."""
    return [
        ".SH EXIT STATUS",
        ".TP",
        "0",
        "Success.",
        ".TP",
        str(cli.EXIT_FAILURE),
        "A failure: one line on stderr says what (fuzz: a mismatch was found).",
        ".TP",
        str(cli.EXIT_USAGE),
        "A usage error: something typed was wrong (one line on stderr), or no command"
        " was given (the help, on stderr).",
        ".TP",
        "3",
        "\\fBstatus\\fR: a device is broken (the agent no longer touches it).",
        ".TP",
        "4",
        "\\fBstatus\\fR: a device has not converged (plugged differs from requested, a"
        " request in flight, plugged memory not all online); 3 outranks 4.",
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBVMEM_GUEST_TRACEBACK\\fR",
        "When set, an operating-system error prints the whole traceback instead of one"
        " line (for bug reports).",
        ".TP",
        "\\fB_VMEM_GUEST_COMPLETE\\fR",
        "Shell completion: \\fB_VMEM_GUEST_COMPLETE=bash_source vmem\\-guest\\fR prints the"
        " bash script (zsh_source and fish_source for those shells).",
        ".TP",
        "\\fBNOTIFY_SOCKET\\fR",
        "Set by systemd for a Type=notify service: \\fBrun\\fR sends READY=1, STATUS= and"
        " STOPPING=1 there, and takes it out of its children's environment.",
        ".TP",
        "\\fBJOURNAL_STREAM\\fR",
        "Set by systemd when output goes to the journal: when it names the device and inode"
        " of stderr, \\fBrun\\fR starts each log line with its syslog priority (<3> error,"
        " <4> warning, <6> info, <7> debug) instead of a timestamp.",
        ".SH FILES",
        ".TP",
        f"\\fI{escape(str(cli.DEFAULT_STATE_DIR))}\\fR",
        "The default state directory: a tracker file per device and the agent's control socket.",
        ".TP",
        "\\fI/etc/default/vmem\\-guest\\fR",
        "The agent's options under systemd (VMEM_GUEST_OPTS), read by vmem\\-guest.service;"
        " its installation and settings are described in docs/systemd.md of the source.",
    ]


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vmem_guest.manpage [PATH]``: write the page to PATH, or stdout."""
    args = sys.argv[1:] if argv is None else list(argv)
    page = render()
    if args:
        Path(args[0]).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)


if __name__ == "__main__":
    main()
