"""One .env grammar: python-dotenv, scripts/lib.sh, hosts.sh and the Vagrantfile agree.

python-dotenv (what the services use) is the reference. The bash and Ruby
readers must give the same settings for every line of the grammar, and for a
line outside it either the same settings or a refusal naming the line: never a
different value in silence. No PostgreSQL or RabbitMQ needed.
"""

import subprocess
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

# Both bash readers in one process: load_env (scripts/lib.sh) in a subshell,
# then read_env_file (scripts/hosts.sh); a line with only "--" between them.
BASH_READERS = r"""
set -euo pipefail
(
  source "$1/scripts/lib.sh"
  declare -A before=()
  for name in $(compgen -e); do before[$name]=1; done
  load_env "$2"
  for name in $(compgen -e); do
    [[ -n "${before[$name]:-}" ]] || printf '%s\0%s\0' "$name" "${!name}"
  done
) || printf '\x02\0'
printf '\x03\0'  # between the two readings: no value can hold it
(
  source "$1/scripts/hosts.sh"
  read_env_file "$2"
  for name in "${VM_ENV_KEYS[@]}"; do printf '%s\0%s\0' "$name" "${VM_ENV[$name]}"; done
) || printf '\x02\0'
"""

# One Ruby for the whole module (it takes ~0.1 s to start): it reads a path
# per line and answers NAME\0VALUE\0... or \x02\0reason\0, then \x01.
RUBY_READER = r"""
source = File.read(ARGV[0])
source.scan(/^def read_env\w*\b.*?^end$/m).each { |method| eval(method) }
STDOUT.binmode
STDIN.each_line do |line|
  begin
    read_env(line.chomp).each { |name, value| print name, "\0", value, "\0" }
  rescue SystemExit => e
    print "\x02\0", e.message, "\0"
  end
  print "\x01"
  STDOUT.flush
end
"""
_RUBY = []  # the running reader, started on first use
FAILED = "\x02"  # a reader's mark for a refusal: no .env line can hold it


# The tricky cases the grammar in docs/operations.md names, one per line.
SAMPLE = (
    "# a comment line\n"
    "\n"
    "   # an indented comment\n"
    "PORT=3000  # the port\n"
    "TAB=3001\t# a tab before the comment\n"
    "HASH=a#b\n"
    "LEADING_HASH=#x\n"
    "EMPTY=\n"
    "EMPTY_COMMENT= # nothing\n"
    "SPACES = spaced out  \n"
    "export EXPORTED=yes\n"
    "SINGLE='a # kept'  # dropped\n"
    'DOUBLE="a # kept" # dropped\n'
    "SINGLE_DQ='say \"hi\"'\n"
    'DOUBLE_SQ="it\'s"\n'
    'ESCAPED="back\\\\slash \\"q\\""\n'
    "ESCAPED_SQ='it\\'s'\n"
    "BACKSLASH=C:\\dir\\n\n"
    "DOLLAR=pa$$word\n"
    "EQUALS=a=b=c\n"
    "TWICE=first\n"
    "TWICE=second\n"
    "NO_VALUE\n"
    "LAST=no newline at the end"
)

EXPECTED = {
    "PORT": "3000",
    "TAB": "3001",
    "HASH": "a#b",
    "LEADING_HASH": "#x",
    "EMPTY": "",
    "EMPTY_COMMENT": "",
    "SPACES": "spaced out",
    "EXPORTED": "yes",
    "SINGLE": "a # kept",
    "DOUBLE": "a # kept",
    "SINGLE_DQ": 'say "hi"',
    "DOUBLE_SQ": "it's",
    "ESCAPED": 'back\\slash "q"',
    "ESCAPED_SQ": "it's",
    "BACKSLASH": "C:\\dir\\n",
    "DOLLAR": "pa$$word",
    "EQUALS": "a=b=c",
    "TWICE": "second",
    "LAST": "no newline at the end",
}


def read_python(path):
    """What the services see (None means the name has no value: not set)."""
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def read_both_bash(path):
    """(load_env's reading, read_env_file's reading), each (settings, None) or
    (None, its error)."""
    done = subprocess.run(
        ["bash", "-c", BASH_READERS, "bash", str(ROOT), str(path)],
        check=False,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    fields = done.stdout.decode().split("\0")[:-1]
    cut = fields.index("\x03")  # not "--", which a value may be
    error = done.stderr.decode(errors="replace")
    return tuple(_settings(part, error) for part in (fields[:cut], fields[cut + 1 :]))


def _settings(fields, error):
    """(settings, None) from NAME, VALUE fields, or (None, error) if it failed."""
    if FAILED in fields[-1:] + fields[:1]:
        return None, error
    return dict(zip(fields[::2], fields[1::2], strict=True)), None


def read_bash(path):
    """load_env from scripts/lib.sh; (settings, None) or (None, its error)."""
    return read_both_bash(path)[0]


def read_hosts(path):
    """read_env_file from scripts/hosts.sh; (settings, None) or (None, its error)."""
    return read_both_bash(path)[1]


def read_ruby(path):
    """read_env from the Vagrantfile; (settings, None) or (None, its error)."""
    if not _RUBY:
        _RUBY.append(
            subprocess.Popen(
                ["ruby", "-e", RUBY_READER, str(ROOT / "Vagrantfile")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin"},
            )
        )
    ruby = _RUBY[0]
    ruby.stdin.write(f"{path}\n".encode())
    ruby.stdin.flush()
    answer = b""
    while not answer.endswith(b"\x01"):
        chunk = ruby.stdout.read1(65536)
        assert chunk, "the Ruby reader ended"
        answer += chunk
    fields = answer[:-1].decode().split("\0")[:-1]
    return _settings(fields, fields[1] if fields[:1] == [FAILED] else "")


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_sample_reads_the_same_in_python_bash_and_ruby(tmp_path, newline):
    path = tmp_path / "sample.env"
    path.write_bytes(SAMPLE.replace("\n", newline).encode())
    assert read_python(path) == EXPECTED
    assert read_bash(path) == (EXPECTED, None)
    assert read_hosts(path) == (EXPECTED, None)
    assert read_ruby(path) == (EXPECTED, None)


@pytest.mark.parametrize(
    "line",
    [
        "A=${HOME}",  # python-dotenv would expand it
        'A="unclosed',
        "A='x' trailing",
        'A="new\\nline"',  # python-dotenv would decode \n
        "A B=1",
        "A=caf\xe9",
        "A=a\x0bb",
        "A=1\rB=2",  # a lone CR: a line break to Python
    ],
)
def test_lines_outside_the_grammar_are_refused_with_their_number(tmp_path, line):
    path = tmp_path / "bad.env"
    path.write_bytes(f"# first\n{line}\n".encode())
    for reader in (read_bash, read_hosts, read_ruby):
        settings_read, error = reader(path)
        assert settings_read is None, f"{reader.__name__} accepted {line!r}"
        assert "line 2" in error, error


def test_committed_env_reads_the_same_everywhere():
    path = ROOT / ".env"
    assert read_bash(path) == (read_python(path), None)
    assert read_hosts(path) == (read_python(path), None)
    assert read_ruby(path) == (read_python(path), None)


NAMES = st.sampled_from(["A", "B_2", "exported", "_c"])
PLAIN = st.text(st.sampled_from("ab1 \t#=$.:/'\"\\-"), max_size=12)
SINGLE = st.lists(st.sampled_from([*list('ab #=$"\t'), "\\\\", "\\'"])).map("".join)
DOUBLE = st.lists(st.sampled_from([*list("ab #=$'\t"), "\\\\", '\\"'])).map("".join)
BLANKS = st.text(st.sampled_from(" \t"), max_size=2)
COMMENTS = st.sampled_from(["", "#", " # c", "\t#x 'y' \"z\""])


@st.composite
def grammar_lines(draw):
    """One line of the grammar: comment, blank, or [export ]NAME=value."""
    kind = draw(st.sampled_from(["plain", "single", "double", "comment", "blank"]))
    if kind == "comment":
        return draw(BLANKS) + "#" + draw(PLAIN)
    if kind == "blank":
        return draw(BLANKS)
    head = draw(BLANKS) + draw(st.sampled_from(["", "export "])) + draw(NAMES)
    head += draw(BLANKS) + "=" + draw(BLANKS)
    if kind == "plain":
        value = draw(PLAIN.filter(lambda v: not v.lstrip(" \t").startswith(("'", '"'))))
        return head + value.replace("${", "$")
    quote, body = ("'", draw(SINGLE)) if kind == "single" else ('"', draw(DOUBLE))
    return head + quote + body.replace("${", "$") + quote + draw(COMMENTS)


def write(tmp_path, lines, newline):
    path = tmp_path / "fuzz.env"
    path.write_bytes(newline.join(lines).encode())
    return path


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(grammar_lines(), max_size=8), st.sampled_from(["\n", "\r\n"]))
def test_grammar_lines_read_the_same_everywhere(tmp_path, lines, newline):
    path = write(tmp_path, lines, newline)
    expected = read_python(path)
    assert read_both_bash(path) == ((expected, None), (expected, None))
    assert read_ruby(path) == (expected, None)


ANY_LINE = st.lists(
    st.sampled_from([*list("AB=x #'\"\\$ {}\t\ré"), "export "]), max_size=14
).map("".join)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(ANY_LINE, max_size=6), st.sampled_from(["\n", "\r\n"]))
def test_any_line_is_read_the_same_or_refused(tmp_path, lines, newline):
    path = write(tmp_path, lines, newline)
    expected = read_python(path)
    for name, (settings_read, error) in zip(
        ("lib.sh", "hosts.sh", "Vagrantfile"),
        (*read_both_bash(path), read_ruby(path)),
        strict=True,
    ):
        if settings_read is None:
            assert "line" in error, error
        else:
            assert settings_read == expected, name


def test_gitattributes_keep_what_runs_in_the_vms_lf():
    """A clone with core.autocrlf=true still checks these files out with LF."""
    files = ["scripts/up.sh", "scripts/lib.sh", ".env", "sql/billing_schema.sql"]
    files += ["Vagrantfile", "gateway.py", "ecosystem.config.js"]
    done = subprocess.run(
        ["git", "check-attr", "eol", "--", *files],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert done.stdout.splitlines() == [f"{f}: eol: lf" for f in files]
