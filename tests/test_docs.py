"""Every command in README.md and docs/ runs as written.

- Each `magic ...` line of a code block names a real command with options it accepts, and its
  overrides compose into a valid config (sweeps: every combination). Placeholders the text
  defines are filled in (`experiment=X` with each shipped experiment, `$C` from its `C=` line);
  lines that need the reader's own files (a model folder, a config folder) are checked for
  their command and options only.
- The README's two Python snippets run for real: the plugin and the command that trains with
  it (in a fresh folder, as a newcomer would), and the Python API pipeline.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """[(language, text)] of the fenced code blocks of a Markdown page."""
    return re.findall(r"^```(\w*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def magic_lines() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for _, text in code_blocks(page):
            variables = dict(re.findall(r'^(\w+)="([^"]*)"$', text, flags=re.M))
            for line in text.splitlines():
                line = re.sub(r"\s+#.*$", "", line.strip())
                if line.startswith("magic "):
                    for name, value in variables.items():
                        line = line.replace(f"${name}", value)
                    out.append((page.name, line))
    return out


LINES = magic_lines()


def _command_and_overrides(line: str):
    from typer.main import get_command

    from magic_cli.cli import app

    words = shlex.split(line)[1:]
    group = get_command(app)
    name = words.pop(0)
    if name == "config":
        name = f"config {words.pop(0)}"
        command = group.commands["config"].commands["show"]
    else:
        assert name in group.commands, f"no command `magic {name}`"
        command = group.commands[name]
    flags = {o: p for p in command.params for o in p.opts if o.startswith("--")}
    overrides, options, skip = [], {}, False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word.startswith("--"):
            assert word in flags, f"`magic {name}` has no option {word}"
            if not flags[word].is_flag:
                options[word], skip = words[i + 1], True
            else:
                options[word] = True
        elif word != "...":
            overrides.append(word)
    return name, options, overrides


@pytest.mark.parametrize("page, line", LINES, ids=[f"{p}:{line[:60]}" for p, line in LINES])
def test_every_documented_command_runs_as_written(page, line):
    from magic_cli.config import load
    from magic_cli.stages.smoothness import combinations, parse_sweep

    name, options, overrides = _command_and_overrides(line)
    if "--config-dir" in options or any(o.startswith(("model.path=", "dataset.path=")) for o in overrides):
        return  # the reader's own folder or files: the command and its options are checked above
    for experiment in (EXPERIMENTS if "experiment=X" in overrides else [None]):
        resolved = [f"experiment={experiment}" if o == "experiment=X" else o for o in overrides]
        if options.get("--sweep"):
            fixed, axes = parse_sweep(resolved)
            for combo in combinations(axes):
                load(fixed + combo)
        else:
            load(resolved)


def test_the_documented_lines_are_found():
    assert len(LINES) >= 20 and any(p == "README.md" for p, _ in LINES)


def _readme_python_blocks() -> list[str]:
    return [text for lang, text in code_blocks(ROOT / "README.md") if lang == "python"]


def test_readme_plugin_example_trains_as_written(tmp_path):
    """Write my_plugin.py and my_conf/ from the README, run its command in that folder."""
    plugin = next(b for b in _readme_python_blocks() if "register_module" in b)
    (tmp_path / "my_plugin.py").write_text(plugin)
    readme = (ROOT / "README.md").read_text()
    yaml_keys = re.search(r"my_conf/model/my_net\.yaml holds the model's keys:\s+(.+?)\s+and\s+(.+?)\n", readme)
    assert yaml_keys, "the README says what my_conf/model/my_net.yaml holds"
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "my_net.yaml").write_text(f"{yaml_keys.group(1)}\n{yaml_keys.group(2)}\n")
    line = next(line for page, line in LINES if page == "README.md" and "my_net" in line)
    words = shlex.split(line)
    result = subprocess.run([sys.executable, "-m", "magic_cli", *words[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "default" / "train" / "fingerprint.json").is_file()


def test_readme_python_api_runs_as_written(tmp_path):
    """As a script file, with no `if __name__ == "__main__"`: its worker processes (workers=2)
    must not import the script again (workers.py)."""
    api = next(b for b in _readme_python_blocks() if "magic_cli.compose" in b)
    assert "workers=2" in api and "__main__" not in api
    (tmp_path / "readme_api.py").write_text(api)
    result = subprocess.run([sys.executable, "readme_api.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) > 0.9  # MAGIC's LDS, printed by the snippet
