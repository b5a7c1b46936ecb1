// PM2 process list of the three services, run by root's PM2:
//   pm2 start ecosystem.config.js --only inventory_app      (one VM, one app)
//   pm2 start ecosystem.config.js --env local               (./scripts/up.sh)
// Each app is `<venv>/bin/python <service>.py` with the repository as its working
// directory; the services read .env themselves (the real environment wins).
// Root's PM2 starts each one as its own system user, movie-<service>, whose
// primary group movie-shop may read .env and the logs (scripts/lib.sh makes
// them); PM2 drops supplementary groups, so only the primary group counts.
//
// Read from the environment of the `pm2` command:
//   VENV_ROOT  per-service virtualenvs, VENV_ROOT/<service> (default: ./venv;
//              the VMs use /opt/movie-shop/venv, outside the synced folder)
//   LOG_DIR    log files (default: ./logs; the VMs use /var/log/movie-shop)
const fs = require("fs");
const path = require("path");

const REPO_DIR = __dirname;
const VENV_ROOT = process.env.VENV_ROOT || path.join(REPO_DIR, "venv");
const LOG_DIR = process.env.LOG_DIR || path.join(REPO_DIR, "logs");

// `--env local`: all three services on one machine, on the loopback address.
const LOCAL_ADDRESSES = {
  GATEWAY_HOST: "127.0.0.1",
  INVENTORY_HOST: "127.0.0.1",
  BILLING_HOST: "127.0.0.1",
  RABBITMQ_HOST: "127.0.0.1",
};

const SERVICE_GROUP = "movie-shop";

function pythonApp(name, service) {
  return {
    name,
    uid: `movie-${service}`,
    gid: SERVICE_GROUP,
    script: path.join(REPO_DIR, `${service}.py`),
    interpreter: path.join(VENV_ROOT, service, "bin", "python"),
    cwd: REPO_DIR,
    exec_mode: "fork",
    instances: 1,
    autorestart: true,
    restart_delay: 2000,
    max_restarts: 50,
    // PM2 sends SIGINT, then SIGKILL after kill_timeout ms.
    kill_timeout: 5000,
    out_file: path.join(LOG_DIR, `${name}.out.log`),
    error_file: path.join(LOG_DIR, `${name}.err.log`),
    merge_logs: true,
    // Two malloc arenas instead of one per thread (up to 8 per core): the
    // threaded servers then stay ~4 MiB smaller, at no measurable speed cost.
    // The service may write nowhere: no __pycache__ in the repository.
    env: { PYTHONUNBUFFERED: "1", PYTHONDONTWRITEBYTECODE: "1", MALLOC_ARENA_MAX: "2" },
    env_local: LOCAL_ADDRESSES,
  };
}

// The users of this machine. An app whose user does not exist here (a VM has
// only its own service's) is left out: PM2 refuses the whole file over one
// unknown user, and no app may fall back to running as root.
const USERS = new Set(
  fs.readFileSync("/etc/passwd", "utf8").split("\n").map((line) => line.split(":")[0]),
);

module.exports = {
  apps: [
    pythonApp("inventory_app", "inventory"),
    pythonApp("billing_app", "billing"),
    pythonApp("api_gateway", "gateway"),
  ].filter((app) => USERS.has(app.uid)),
};
