"""Contract tests: openapi.yaml is valid, and the live gateway keeps to it.

Three checks, each with a real client:
- openapi-spec-validator validates openapi.yaml (no server needed);
- schemathesis generates requests from openapi.yaml and runs every check it
  has against the gateway at GATEWAY_URL;
- newman runs the Postman collection against the same gateway.

The gateway is GATEWAY_URL when set, else the suite's own test gateway
(conftest's `gateway` fixture), else http://127.0.0.1:3000. It must belong to
a stack started for the tests (gateway, inventory, RabbitMQ): schemathesis and
the collection both call DELETE /api/movies. So that a real deployment is
never wiped by mistake, only loopback addresses are accepted unless
CONTRACT_ALLOW_REMOTE=1. Other settings: CONTRACT_MAX_EXAMPLES (schemathesis
examples per operation, default 40) and CONTRACT_SEED (replay a run).

Tools: schemathesis and openapi-spec-validator from requirements-dev.txt,
newman from package.json (`npm ci --ignore-scripts` in the repo root).
"""

import ipaddress
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from openapi_spec_validator import validate

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "openapi.yaml"
COLLECTION = ROOT / "postman" / "movie-shop.postman_collection.json"
LOCAL_ENV = ROOT / "postman" / "local.postman_environment.json"
NEWMAN = ROOT / "node_modules" / ".bin" / "newman"
DEFAULT_URL = "http://127.0.0.1:3000"
MAX_EXAMPLES = int(os.environ.get("CONTRACT_MAX_EXAMPLES", "40"))
TOOL_TIMEOUT = 900  # seconds for one schemathesis or newman run

# Every operation of the gateway: the spec must document exactly these.
OPERATIONS = {
    ("/api/movies", "get"),
    ("/api/movies", "post"),
    ("/api/movies", "delete"),
    ("/api/movies/{id}", "get"),
    ("/api/movies/{id}", "put"),
    ("/api/movies/{id}", "delete"),
    ("/api/billing", "post"),
    ("/health", "get"),
    ("/openapi.yaml", "get"),
    ("/docs", "get"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _tool_env():
    """The environment for the tools: no proxy, so requests stay on GATEWAY_URL."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env["SCARF_ANALYTICS"] = "false"
    return env


def _run(cmd, what, cwd=ROOT):
    """Run a tool with its output shown as it goes; return (exit code, output)."""
    print(f"\n$ {' '.join(str(c) for c in cmd)}", flush=True)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=_tool_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except FileNotFoundError as exc:
        pytest.fail(f"cannot run {what}: {exc}")
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    try:
        code = proc.wait(timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} did not finish within {TOOL_TIMEOUT} s")
    sys.stdout.flush()
    return code, "".join(lines)


@pytest.fixture(scope="module")
def spec():
    """openapi.yaml, parsed."""
    return yaml.safe_load(SPEC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def gateway_url(request):
    """The gateway under test; fail with a hint when it is not up.

    GATEWAY_URL when set; otherwise the suite's own test gateway (conftest's
    `gateway` fixture: free port, movies_test, a queue of its own); without
    that fixture, http://127.0.0.1:3000.
    """
    url = os.environ.get("GATEWAY_URL")
    if not url:
        try:
            url = request.getfixturevalue("gateway").url
        except pytest.FixtureLookupError:
            url = DEFAULT_URL
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        pytest.fail(f"GATEWAY_URL={url!r} is not an http(s) URL")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and os.environ.get("CONTRACT_ALLOW_REMOTE") != "1":
        pytest.fail(
            f"GATEWAY_URL={url} is not a loopback address. These tests delete every "
            "movie; set CONTRACT_ALLOW_REMOTE=1 to run them against that gateway."
        )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/health", timeout=10) as resp:
            health = resp.read().decode()
    except urllib.error.HTTPError as exc:
        pytest.fail(
            f"gateway at {url} is up but not healthy ({exc.code}): "
            f"{exc.read().decode(errors='replace')}; start inventory and RabbitMQ"
        )
    except OSError as exc:
        pytest.fail(
            f"no gateway at GATEWAY_URL={url} ({exc}). Start the stack "
            "(./scripts/test.sh does it for the whole suite, ./scripts/up.sh for "
            "port 3000) or export GATEWAY_URL pointing at a running gateway."
        )
    print(f"\ngateway {url}: {health}")
    return url


# --- The document ---


def test_openapi_document_is_valid(spec):
    """openapi-spec-validator accepts openapi.yaml."""
    validate(spec)


def test_every_operation_is_documented(spec):
    """Exactly the gateway's operations, each with summary, description, 2xx."""
    found = {
        (path, method)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert found == OPERATIONS
    for path, method in sorted(found):
        operation = spec["paths"][path][method]
        assert operation.get("summary"), f"{method} {path}: no summary"
        assert operation.get("description"), f"{method} {path}: no description"
        codes = set(operation["responses"])
        assert any(code.startswith("2") for code in codes), f"{method} {path}: no 2xx"
        assert "500" in codes, f"{method} {path}: 500 not documented"


def test_errors_use_the_shared_error_schema(spec):
    """Every 4xx/5xx answer of the movie and billing API is a JSON Error."""
    responses = spec["components"]["responses"]
    for path, item in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            for code, response in operation["responses"].items():
                if code[0] not in "45":
                    continue
                if "$ref" in response:
                    response = responses[response["$ref"].rsplit("/", 1)[1]]
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (
                    f"{method} {path} {code}"
                )


def test_postman_collection_covers_every_api_operation(spec):
    """The collection has a request for each operation and error status."""
    collection = json.loads(COLLECTION.read_text(encoding="utf-8"))
    folders = {folder["name"]: folder["item"] for folder in collection["item"]}
    assert set(folders) == {"Inventory (movies)", "Billing", "Health"}
    seen = set()
    statuses = set()
    for item in (i for items in folders.values() for i in items):
        request = item["request"]
        path = "/" + "/".join(request["url"]["path"]).rstrip("/")
        path = re.sub(r"^/api/movies/[^/]+$", "/api/movies/{id}", path)
        seen.add((path, request["method"].lower()))
        tests = "\n".join(
            line for event in item.get("event", []) for line in event["script"]["exec"]
        )
        statuses.update(int(c) for c in re.findall(r"to\.have\.status\((\d+)\)", tests))
        assert "pm.test(" in tests, f"{item['name']}: no test"
    assert seen >= OPERATIONS
    assert {200, 201, 400, 404, 405, 415} <= statuses


# --- The live gateway ---


def test_gateway_serves_this_openapi_document(gateway_url):
    """GET /openapi.yaml answers the committed file, as YAML."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"{gateway_url}/openapi.yaml", timeout=10
    ) as resp:
        assert resp.headers.get_content_type() == "application/yaml"
        assert resp.read() == SPEC.read_bytes()


def test_schemathesis_finds_no_failure(gateway_url, tmp_path):
    """Schemathesis, all checks and all phases, reports no failure."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(SPEC),
        "--url",
        gateway_url,
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",  # DELETE /api/movies must not race the other operations
        "--max-redirects",
        "0",
        "--request-timeout",
        "15",
        "--generation-database",
        "none",
        "--no-color",
    ]
    if os.environ.get("CONTRACT_SEED"):
        cmd += ["--seed", os.environ["CONTRACT_SEED"]]
    # In tmp_path: schemathesis keeps a crash cache in ./.schemathesis.
    code, output = _run(cmd, "schemathesis", cwd=tmp_path)
    match = re.search(r"(\d+) generated", output)
    cases = int(match.group(1)) if match else 0
    print(f"schemathesis: {cases} test cases, exit code {code}")
    assert code == 0, "schemathesis found failures (see its report above)"
    assert cases > 0, "schemathesis ran no test case"


def test_postman_collection_passes_with_newman(gateway_url, tmp_path):
    """Newman runs the collection in order with no failed assertion."""
    if not NEWMAN.exists():
        pytest.fail(f"{NEWMAN} is missing: run `npm ci --ignore-scripts` in {ROOT}")
    report = tmp_path / "newman.json"
    code, _ = _run(
        [
            NEWMAN,
            "run",
            COLLECTION,
            "-e",
            LOCAL_ENV,
            "--env-var",
            f"gateway_url={gateway_url}",
            "--color",
            "off",
            "--reporters",
            "cli,json",
            "--reporter-json-export",
            report,
        ],
        "newman",
    )
    stats = json.loads(report.read_text())["run"]["stats"]
    failures = json.loads(report.read_text())["run"]["failures"]
    print(
        f"newman: {stats['requests']['total']} requests, "
        f"{stats['assertions']['total']} assertions, "
        f"{stats['assertions']['failed']} failed"
    )
    assert code == 0 and not failures, f"newman: {len(failures)} failures (see above)"
    assert stats["assertions"]["total"] > 0
