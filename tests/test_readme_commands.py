"""The README's command section matches `--help`: every command it shows exists, with every option."""

from __future__ import annotations

import re

import pytest
from federation_support import ROOT
from typer.testing import CliRunner

from facefed.client.cli.main import app as client_cli
from facefed.server.cli.main import app as server_cli

CLIS = {"facefed-server": server_cli, "facefed-client": client_cli}


def readme_commands() -> list[tuple[str, list[str], list[str]]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Command line") :]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for part in re.split(r"\n|;\s+", joined):
            part = part.split("#", 1)[0].strip()
            m = re.match(r"(facefed-(?:server|client))\s+(.*)", part)
            if not m:
                continue
            words = m.group(2).split()
            cmd = []
            for w in words:
                if w.startswith("-") or w.isupper() or "/" in w or "." in w:
                    break
                cmd.append(w)
            opts = re.findall(r"(--[a-z][a-z-]*)", m.group(2))
            out.append((m.group(1), cmd, opts))
    return out


@pytest.mark.parametrize(
    ("cli", "cmd", "opts"), readme_commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else str(x)
)
def test_readme_command_exists_with_its_options(cli, cmd, opts):
    res = CliRunner().invoke(CLIS[cli], [*cmd[:2], "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert res.exit_code == 0, f"{cli} {' '.join(cmd)}: {res.output[-500:]}"
    for opt in opts:
        assert opt in res.output, f"README shows `{cli} {' '.join(cmd)} {opt}`, which --help does not list"
