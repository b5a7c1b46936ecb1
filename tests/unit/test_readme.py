"""The commands of the README and docs/, pasted by a user with sudo rights: sudo
where root is needed, and each block says where it runs (the host, or a VM)."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documents_text():
    """Every document a reader pastes commands from, one after the other."""
    return "\n\n".join(path.read_text() for path in DOCUMENTS)


# Programs that only work as root here: root's PM2, the databases' superuser,
# the broker, the project's scripts, the packages.
ROOT_PROGRAMS = {"pm2", "runuser", "psql", "rabbitmqctl", "apt-get", "systemctl"}
# Arguments that need root: the logs and .env (0640 root:movie-shop), the
# project's scripts, a service's or the tests' virtualenv (which read .env).
ROOT_ARGUMENT = re.compile(
    r"(^|/)(logs/|\.env$|scripts/\w+\.sh$|venv/\w+/bin/python$)|^/var/log/movie-shop"
)
# What the text before a block must say about where it runs.
WHERE = re.compile(
    r"on\s+the\s+host|inside\s+a\s+vm|inside\s+billing-vm|vagrant\s+ssh", re.I
)


def sh_blocks(text):
    """[(text before the block, the block)] for each ```sh block."""
    found, last = [], 0
    for m in re.finditer(r"^```sh\n(.*?)^```", text, re.S | re.M):
        found.append((text[last : m.start()], m.group(1)))
        last = m.end()
    return found


def commands(block):
    """The block's command lines, backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip()]


def simple_commands(line):
    """Each simple command of a line as its words, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words, found = [], []
    for token in lexer:
        if token and set(token) <= set("|;&()"):
            found.append(words)
            words = []
        else:
            words.append(token)
    return [w for w in [*found, words] if w]


# The unit tier reads nothing of root's: its owner runs it without sudo.
UNIT_TIER = ["venv/dev/bin/python", "-m", "pytest", "tests/unit"]


def needs_root(words):
    """Whether a simple command (assignments skipped) needs root."""
    while words and re.fullmatch(r"\w+=.*", words[0]):
        words = words[1:]
    if words[:4] == UNIT_TIER:
        return False
    return bool(words) and (
        words[0] in ROOT_PROGRAMS or any(ROOT_ARGUMENT.search(w) for w in words)
    )


def problems(line):
    """What is wrong with one pasted line: root needed without sudo."""
    found = []
    for words in simple_commands(line):
        if words[0] == "sudo":
            continue
        if words[:2] == ["vagrant", "ssh"] and "-c" in words:
            found += problems(words[words.index("-c") + 1])
        elif needs_root(words):
            found.append(f"needs sudo: {' '.join(words)}")
    return found


@pytest.mark.parametrize(
    ("line", "bad"),
    [
        ("sudo pm2 stop billing_app", False),
        ("pm2 stop billing_app", True),
        ("./scripts/hosts.sh up   # comment", True),
        ("sudo ./scripts/hosts.sh exec billing-vm -- pm2 stop billing_app", False),
        ("vagrant ssh billing-vm -c 'pm2 list'", True),
        ("vagrant ssh billing-vm -c 'sudo pm2 list'", False),
        ("runuser -u postgres -- psql -c 'TABLE orders;'", True),
        ("grep my-order-1 logs/api_gateway.out.log", True),
        ("X=1 venv/gateway/bin/python gateway.py", True),
        ('id="$(echo "$a" | sed -n p)"; sudo grep "$id" logs/x.log', False),
        ("curl -i $G/api/movies/ | head", False),
        ("venv/dev/bin/python -m pytest tests/unit", False),
        ("venv/dev/bin/python -m pytest tests/stack", True),
    ],
)
def test_the_checker_finds_a_missing_sudo(line, bad):
    assert bool(problems(line)) == bad, problems(line)


def test_every_readme_command_has_sudo_where_it_needs_root():
    lines = [c for _, block in sh_blocks(documents_text()) for c in commands(block)]
    assert len(lines) > 40  # the blocks were found
    found = [f"{line}: {p}" for line in lines for p in problems(line)]
    assert not found, "\n".join(found)


def test_every_readme_block_says_where_it_runs():
    unsaid = []
    for path in DOCUMENTS:
        unsaid += blocks_unsaid(path.read_text())
    assert not unsaid, "where do these run?\n" + "\n".join(unsaid)


def test_the_readme_is_short_and_starts_with_its_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first_screen = "\n".join(text.splitlines()[:60])
    assert "sudo ./scripts/up.sh" in first_screen
    assert "sudo ./scripts/test.sh" in first_screen


def blocks_unsaid(text):
    """The sh blocks of text that say nowhere where they run."""
    unsaid = []
    for before, block in sh_blocks(text):
        lines = commands(block)
        if all(line.startswith("vagrant ssh ") for line in lines):
            continue
        # The paragraph just before the block, or a comment in it.
        lead = before.strip().rsplit("\n\n", 1)[-1]
        if not WHERE.search(lead + block):
            unsaid.append(block)
    return unsaid


def test_up_sh_hints_have_sudo_where_they_need_root():
    script = (ROOT / "scripts" / "up.sh").read_text()
    hints = script[script.index("cat <<TEXT") : script.index("\nTEXT\n")]
    lines = [
        re.sub(r"^.*?:\s{2,}", "", line).strip()
        for line in hints.replace("\\\\\n", " ").splitlines()
        if re.search(r"(^  |:\s{2,})(sudo|curl|pm2|psql|\./scripts)\b", line)
    ]
    assert len(lines) >= 10
    found = [f"{line}: {p}" for line in lines for p in problems(line)]
    assert not found, "\n".join(found)
