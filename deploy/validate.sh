#!/usr/bin/env bash
# Validate the stackgate deployment kit without kubectl or docker.
#
#   bash deploy/validate.sh          (from the repository root, or anywhere)
#
# What it checks:
#   - every YAML file under deploy/ parses (PyYAML; installed with pip if missing)
#   - Kubernetes manifests: apiVersion/kind/metadata.name, no hard-coded namespace,
#     kustomization resources, Deployment hardening, probes on /healthz and
#     /readyz at the admin port, secretKeyRefs vs secret.example.yaml, selectors,
#     Service target ports, ConfigMap/volume wiring
#   - stackgate.toml inside the ConfigMap: only SPEC §5 keys (and §10's
#     [cluster]), consistent with the Deployment (ports, env vars, snapshot
#     volume, grace period)
#   - deploy/kubernetes/redis/: the optional Redis kustomization for cluster mode
#   - Prometheus rules and Grafana dashboard: only SPEC §7 and §10 metric names
#     and labels, severity/summary/description on every alert
#   - promtool check rules / check config / test rules (promtool is installed
#     from Debian's `prometheus` package when missing and running as root)
#   - optional schema validation with kubernetes-validate (PyPI), best effort
#   - `stackgate check --config <extracted toml>` when a binary is built
#
# Environment:
#   STACKGATE_SPEC=PATH               SPEC.md to cross-check metric names against
#                                     (default: ../shared/SPEC.md next to the repo)
#   STACKGATE_VALIDATE_NO_INSTALL=1   never install anything (apt/pip)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

NO_INSTALL="${STACKGATE_VALIDATE_NO_INSTALL:-}"
PASSED=0
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

pass() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; exit 1; }
note() { echo "skip $*"; }

# ---------------------------------------------------------------------------
# PyYAML
# ---------------------------------------------------------------------------
command -v python3 >/dev/null 2>&1 || fail "python3 is required"
if ! python3 -c 'import yaml' 2>/dev/null; then
  [ -z "$NO_INSTALL" ] || fail "PyYAML missing and STACKGATE_VALIDATE_NO_INSTALL is set"
  echo "installing PyYAML"
  pip install --quiet --retries 1 --timeout 20 pyyaml || python3 -m pip install --quiet --retries 1 --timeout 20 pyyaml
  python3 -c 'import yaml' || fail "could not install PyYAML"
fi
python3 -c 'import tomllib' 2>/dev/null || fail "python3 >= 3.11 is required (tomllib)"

SPEC_PATH="${STACKGATE_SPEC:-$(cd "$REPO/.." && pwd)/shared/SPEC.md}"

# ---------------------------------------------------------------------------
# Static checks (Python). Each passed check prints "ok ..." to stdout; the
# number of passed checks is written to $TMP/count.
# ---------------------------------------------------------------------------
python3 - "$REPO" "$TMP" "$SPEC_PATH" <<'PY'
import json, os, re, sys, tomllib
import yaml

repo, tmp, spec_path = sys.argv[1], sys.argv[2], sys.argv[3]
deploy = os.path.join(repo, "deploy")
count = 0

def ok(msg):
    global count
    count += 1
    print(f"ok   {msg}", flush=True)

def die(msg):
    print(f"FAIL {msg}", file=sys.stderr, flush=True)
    sys.exit(1)

def rel(p):
    return os.path.relpath(p, repo)

# --- SPEC §7 metrics: name -> (labels, is_histogram) ------------------------
METRICS = {
    "requests_total": ({"stack", "token", "route", "outcome"}, False),
    "rejections_total": ({"stack", "reason"}, False),
    "upstream_duration_seconds": ({"route"}, True),
    "request_duration_seconds": ({"route"}, True),
    "active_sessions": ({"stack", "token"}, False),
    "sessions_dropped_total": ({"stack", "cause"}, False),
    "revocation_seconds": (set(), True),
    "registry_tokens": ({"stack"}, False),
    "registry_version": ({"stack"}, False),
    "registry_last_success_timestamp_seconds": ({"stack"}, False),
    "registry_sync_failures_total": ({"stack"}, False),
    "registry_held_back_removals": ({"stack"}, False),
    "snapshot_write_failures_total": ({"stack"}, False),
}
# SPEC §10 (cluster mode): "Metrics added: ..."
CLUSTER_METRICS = {
    "cluster_redis_up": (set(), False),
    "cluster_leader": ({"stack"}, False),
    "cluster_nodes": (set(), False),
    "cluster_propagation_seconds": (set(), True),
    "cluster_fallback": ({"stack"}, False),
}
# Labels Prometheus attaches to every scraped series (see prometheus.yml).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "node"}

if os.path.isfile(spec_path):
    spec = open(spec_path, encoding="utf-8").read()
    def spec_metrics(pattern, section):
        m = re.search(pattern, spec, re.S)
        if not m:
            die(f"{spec_path}: cannot find the metric list of {section}")
        block = m.group(1)
        found = {}
        items = list(re.finditer(r"`([a-z_]+)(?:\{([a-z_,]*)\})?`", block))
        for i, it in enumerate(items):
            tail = block[it.end(): items[i + 1].start() if i + 1 < len(items) else len(block)]
            labels = set(filter(None, (it.group(2) or "").split(",")))
            hist = "histogram" in tail
            by = re.search(r"\bby (\w+)\)", tail)
            if by:
                labels.add(by.group(1))
            found[it.group(1)] = (labels, hist)
        return found
    found = spec_metrics(r"Metric names, all prefixed `stackgate_`:(.*?)The `token` label", "§7")
    if found != METRICS:
        die("SPEC §7 metric list differs from the one in deploy/validate.sh: "
            f"spec={sorted(found.items())} script={sorted(METRICS.items())}; update the deploy kit")
    ok(f"metric list matches {spec_path} §7 ({len(METRICS)} metrics)")
    if "## 10. Cluster mode" in spec:
        found = spec_metrics(r"Metrics added:(.*?)`stackgate demo --cluster", "§10")
        if found != CLUSTER_METRICS:
            die("SPEC §10 metric list differs from the one in deploy/validate.sh: "
                f"spec={sorted(found.items())} script={sorted(CLUSTER_METRICS.items())}; update the deploy kit")
        ok(f"cluster metric list matches {spec_path} §10 ({len(CLUSTER_METRICS)} metrics)")
else:
    print(f"skip SPEC cross-check: {spec_path} not found (using the built-in metric list)")

METRICS.update(CLUSTER_METRICS)
ALLOWED = {}
for base, (labels, hist) in METRICS.items():
    name = "stackgate_" + base
    if hist:
        ALLOWED[name + "_bucket"] = labels | {"le"}
        ALLOWED[name + "_sum"] = set(labels)
        ALLOWED[name + "_count"] = set(labels)
    else:
        ALLOWED[name] = set(labels)
ALL_LABELS = set().union(*ALLOWED.values()) | TARGET_LABELS

KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "bool", "offset", "inf", "nan", "atan2", "start", "end"}

def metric_names(expr):
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "0", expr)          # Grafana variables
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # ranges / subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in KEYWORDS:
            continue
        names.add(word)
    return names

def check_expr(where, expr, extra_metrics=frozenset()):
    names = metric_names(expr)
    bad = {n for n in names if n not in ALLOWED and n not in extra_metrics}
    if bad:
        die(f"{where}: unknown metric name(s) {sorted(bad)} in: {expr}")
    if not names:
        die(f"{where}: no metric referenced in: {expr}")
    # label names inside selectors of stackgate metrics
    for m in re.finditer(r"(stackgate_\w+)\s*\{([^}]*)\}", expr):
        allowed = ALLOWED.get(m.group(1), set()) | TARGET_LABELS
        for lm in re.finditer(r"(\w+)\s*(=~|!~|!=|=)", m.group(2)):
            if lm.group(1) not in allowed:
                die(f"{where}: {m.group(1)} has no label {lm.group(1)!r} in: {expr}")
    # grouping labels
    for m in re.finditer(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        for lab in filter(None, (x.strip() for x in m.group(2).split(","))):
            if lab not in ALL_LABELS:
                die(f"{where}: grouping label {lab!r} is not a stackgate/target label in: {expr}")
    return names

# --- 1. every YAML under deploy/ parses ------------------------------------
yaml_docs = {}
for root, _dirs, files in os.walk(deploy):
    for f in sorted(files):
        if f.endswith((".yaml", ".yml")):
            p = os.path.join(root, f)
            try:
                with open(p, encoding="utf-8") as fh:
                    docs = [d for d in yaml.safe_load_all(fh) if d is not None]
            except yaml.YAMLError as e:
                die(f"{rel(p)}: YAML parse error: {e}")
            if not docs:
                die(f"{rel(p)}: no YAML document")
            yaml_docs[rel(p)] = docs
            ok(f"{rel(p)}: parses ({len(docs)} document(s))")

# --- 2. Kubernetes manifests -------------------------------------------------
kdir = "deploy/kubernetes"
kust = yaml_docs.get(f"{kdir}/kustomization.yaml", [None])[0]
if not kust:
    die(f"{kdir}/kustomization.yaml missing")
# deploy/kubernetes/redis/ is a separate, optional kustomization (a Redis to
# try cluster mode with); it is checked on its own below.
rdir = f"{kdir}/redis"
manifest_files = sorted(p for p in yaml_docs if p.startswith(kdir + "/") and not p.endswith("kustomization.yaml")
                        and not p.startswith(rdir + "/"))
objs = {}   # (kind, name) -> doc
for p in manifest_files:
    for d in yaml_docs[p]:
        for key in ("apiVersion", "kind"):
            if not isinstance(d.get(key), str) or not d[key]:
                die(f"{p}: document without {key}")
        name = (d.get("metadata") or {}).get("name")
        if not name:
            die(f"{p}: {d['kind']} without metadata.name")
        if "namespace" in d["metadata"]:
            die(f"{p}: {d['kind']}/{name} hard-codes metadata.namespace (manifests must be namespace-agnostic)")
        if (d["kind"], name) in objs:
            die(f"{p}: duplicate {d['kind']}/{name}")
        objs[(d["kind"], name)] = d
        objs[(d["kind"], name)]["__file"] = p
ok(f"{kdir}: {len(objs)} objects have apiVersion, kind and metadata.name, no namespace")

resources = kust.get("resources") or []
for r in resources:
    if not os.path.isfile(os.path.join(repo, kdir, r)):
        die(f"{kdir}/kustomization.yaml lists missing resource {r}")
listed = {f"{kdir}/{r}" for r in resources}
for p in manifest_files:
    if p.endswith("secret.example.yaml"):
        if p in listed:
            die(f"{kdir}/kustomization.yaml must not list secret.example.yaml (placeholders would overwrite the real Secret)")
    elif p not in listed:
        die(f"{kdir}/kustomization.yaml does not list {os.path.basename(p)}")
ok(f"{kdir}/kustomization.yaml lists every manifest except secret.example.yaml")

rkust = (yaml_docs.get(f"{rdir}/kustomization.yaml") or [None])[0]
if rkust:
    rfiles = sorted(p for p in yaml_docs if p.startswith(rdir + "/") and not p.endswith("kustomization.yaml"))
    rlisted = {f"{rdir}/{r}" for r in rkust.get("resources") or []}
    if set(rfiles) != rlisted:
        die(f"{rdir}/kustomization.yaml lists {sorted(rlisted)}, the directory has {sorted(rfiles)}")
    rkinds = set()
    for p in rfiles:
        for d in yaml_docs[p]:
            if not d.get("apiVersion") or not d.get("kind") or not (d.get("metadata") or {}).get("name"):
                die(f"{p}: document without apiVersion, kind or metadata.name")
            if "namespace" in d["metadata"]:
                die(f"{p}: hard-codes metadata.namespace")
            rkinds.add(d["kind"])
    if not {"Service"} <= rkinds:
        die(f"{rdir}: expected a Service for Redis")
    ok(f"{rdir}: optional Redis kustomization ({', '.join(sorted(rkinds))})")

def one(kind):
    found = [d for (k, _n), d in objs.items() if k == kind]
    if len(found) != 1:
        die(f"expected exactly one {kind}, found {len(found)}")
    return found[0]

dep = one("Deployment")
cm = one("ConfigMap")
secret = one("Secret")
pdb = one("PodDisruptionBudget")
services = [d for (k, _n), d in objs.items() if k == "Service"]

spec = dep["spec"]
pod = spec["template"]["spec"]
pod_labels = spec["template"]["metadata"].get("labels") or {}
if (spec.get("replicas") or 1) < 2:
    die("Deployment: replicas must be >= 2")
sel = spec["selector"]["matchLabels"]
if any(pod_labels.get(k) != v for k, v in sel.items()):
    die("Deployment: selector does not match the pod template labels")
ok(f"Deployment: {spec['replicas']} replicas, selector matches pod labels")

containers = pod["containers"]
if len(containers) != 1:
    die("Deployment: expected one container")
c = containers[0]
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}

def probe_port(probe_name):
    pr = c.get(probe_name) or die(f"Deployment: no {probe_name}")
    hg = pr.get("httpGet") or die(f"Deployment: {probe_name} is not httpGet")
    port = hg["port"]
    return hg["path"], ports.get(port, port) if isinstance(port, str) else port

lp, lport = probe_port("livenessProbe")
rp, rport = probe_port("readinessProbe")
if lp != "/healthz":
    die(f"Deployment: livenessProbe path is {lp}, want /healthz")
if rp != "/readyz":
    die(f"Deployment: readinessProbe path is {rp}, want /readyz")
if lport != 9090 or rport != 9090:
    die(f"Deployment: probes must target the admin port 9090 (got {lport}, {rport})")
ok("Deployment: liveness GET /healthz and readiness GET /readyz on admin port 9090")

sec_keys = set((secret.get("stringData") or {}).keys()) | set((secret.get("data") or {}).keys())
sec_name = secret["metadata"]["name"]
env_names = set()
refs = 0
for e in c.get("env", []):
    env_names.add(e["name"])
    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
    if ref:
        refs += 1
        if ref["name"] != sec_name:
            die(f"Deployment: env {e['name']} refers to Secret {ref['name']!r}, example Secret is {sec_name!r}")
        if ref["key"] not in sec_keys:
            die(f"Deployment: env {e['name']} refers to key {ref['key']!r}, not in secret.example.yaml ({sorted(sec_keys)})")
for ef in c.get("envFrom", []):
    if "secretRef" in ef and ef["secretRef"]["name"] != sec_name:
        die(f"Deployment: envFrom refers to Secret {ef['secretRef']['name']!r}")
if refs == 0:
    die("Deployment: no secretKeyRef env")
ok(f"Deployment: {refs} secretKeyRef(s) name keys present in secret.example.yaml")

psc = pod.get("securityContext") or {}
csc = c.get("securityContext") or {}
run_as_non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
uid = csc.get("runAsUser", psc.get("runAsUser"))
if run_as_non_root is not True or not uid:
    die("Deployment: must set runAsNonRoot: true and a non-zero runAsUser")
if csc.get("readOnlyRootFilesystem") is not True:
    die("Deployment: readOnlyRootFilesystem must be true")
if csc.get("allowPrivilegeEscalation") is not False:
    die("Deployment: allowPrivilegeEscalation must be false")
if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
    die("Deployment: capabilities must drop ALL")
if (c.get("securityContext") or {}).get("privileged"):
    die("Deployment: privileged container")
res = c.get("resources") or {}
if not res.get("requests") or not res.get("limits"):
    die("Deployment: resources requests and limits are required")
if not (pod.get("topologySpreadConstraints") or (pod.get("affinity") or {}).get("podAntiAffinity")):
    die("Deployment: needs topologySpreadConstraints or podAntiAffinity")
ann = spec["template"]["metadata"].get("annotations") or {}
if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != "9090":
    die("Deployment: prometheus.io/scrape and prometheus.io/port=9090 annotations required")
ok(f"Deployment: non-root uid {uid}, read-only root fs, no privilege escalation, caps drop ALL, resources, spread, scrape annotations")

mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
vols = {v["name"]: v for v in pod.get("volumes", [])}
for path in ("/etc/stackgate", "/var/lib/stackgate"):
    if path not in mounts:
        die(f"Deployment: nothing mounted at {path}")
    if mounts[path] not in vols:
        die(f"Deployment: mount {path} uses undefined volume {mounts[path]}")
cfgvol = vols[mounts["/etc/stackgate"]]
if (cfgvol.get("configMap") or {}).get("name") != cm["metadata"]["name"]:
    die("Deployment: /etc/stackgate is not the stackgate ConfigMap")
items = (cfgvol["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]])
if not any(i["path"] == "stackgate.toml" and i["key"] in cm["data"] for i in items):
    die("Deployment: the ConfigMap volume does not provide stackgate.toml")
args = c.get("args") or []
if "--config" in args and args[args.index("--config") + 1] != "/etc/stackgate/stackgate.toml":
    die("Deployment: --config must point at /etc/stackgate/stackgate.toml")
ok("Deployment: ConfigMap at /etc/stackgate/stackgate.toml, writable volume at /var/lib/stackgate")

for s in services:
    ssel = s["spec"]["selector"]
    if any(pod_labels.get(k) != v for k, v in ssel.items()):
        die(f"Service {s['metadata']['name']}: selector does not match the pods")
    for p in s["spec"]["ports"]:
        tp = p.get("targetPort", p["port"])
        if isinstance(tp, str) and tp not in ports:
            die(f"Service {s['metadata']['name']}: targetPort {tp!r} is not a container port name")
        if isinstance(tp, int) and tp not in ports.values():
            die(f"Service {s['metadata']['name']}: targetPort {tp} is not a container port")
svc_ports = {(p["port"], ports.get(p.get("targetPort"), p.get("targetPort"))) for s in services for p in s["spec"]["ports"]}
if (80, 8080) not in svc_ports or (9090, 9090) not in svc_ports:
    die(f"Services must expose 80->8080 and 9090->9090 (have {sorted(svc_ports)})")
ok(f"Services: {', '.join(s['metadata']['name'] for s in services)} select the pods; 80->8080 and 9090->9090")

psel = pdb["spec"]["selector"]["matchLabels"]
if any(pod_labels.get(k) != v for k, v in psel.items()):
    die("PodDisruptionBudget: selector does not match the pods")
if pdb["spec"].get("minAvailable") != 1:
    die("PodDisruptionBudget: minAvailable must be 1")
ok("PodDisruptionBudget: minAvailable 1, selects the pods")

# --- 3. stackgate.toml in the ConfigMap --------------------------------------
toml_text = cm["data"].get("stackgate.toml") or die("ConfigMap has no stackgate.toml")
try:
    cfg = tomllib.loads(toml_text)
except tomllib.TOMLDecodeError as e:
    die(f"ConfigMap stackgate.toml: TOML error: {e}")
with open(os.path.join(tmp, "stackgate.toml"), "w", encoding="utf-8") as fh:
    fh.write(toml_text)
ok("ConfigMap stackgate.toml parses as TOML")

LIMIT = {"rate", "burst"}
SCHEMA = {
    "listen": {"http", "https", "admin"},
    "tls": {"cert", "key"},
    "admin": {"token_env"},
    "server": {"header_timeout", "idle_timeout", "max_connections", "max_body_bytes", "grace_period"},
    "upstream": {"connect_timeout", "request_timeout", "ca_file"},
    "cluster": {"redis_url_env", "node_id", "key_prefix", "lease"},
}
ROUTE = {"kind", "hosts", "path_prefix", "upstream", "region"}
STACK = {"name", "api_key", "registry", "limits"}
REGISTRY = {"cma_url", "auth", "credential_env", "sync_interval", "tokens_file", "snapshot",
            "max_removal_ratio", "max_staleness"}
LIMITS = {"per_token", "origin", "failed_auth_per_ip", "overrides"}
OVERRIDE = {"token", "rate", "burst"}

def keys_in(where, table, allowed):
    if not isinstance(table, dict):
        die(f"stackgate.toml: {where} must be a table")
    extra = set(table) - allowed
    if extra:
        die(f"stackgate.toml: unknown key(s) {sorted(extra)} in {where} (SPEC §5 allows {sorted(allowed)})")

keys_in("top level", cfg, set(SCHEMA) | {"routes", "stacks"})
for t, allowed in SCHEMA.items():
    if t in cfg:
        keys_in(f"[{t}]", cfg[t], allowed)
dur = re.compile(r"^(0|(\d+(ns|us|ms|s|m|h|d))+)$")
def check_dur(where, v):
    if not isinstance(v, str) or not dur.match(v):
        die(f"stackgate.toml: {where} = {v!r} is not a duration string like \"10s\"")
for t in ("server", "upstream"):
    for k, v in cfg.get(t, {}).items():
        if k.endswith("_timeout") or k == "grace_period":
            check_dur(f"{t}.{k}", v)
if "https" in cfg.get("listen", {}) and "tls" not in cfg:
    die("stackgate.toml: listen.https needs [tls]")
if not cfg.get("listen", {}).get("http") and not cfg.get("listen", {}).get("https"):
    die("stackgate.toml: listen.http or listen.https is required")
routes = cfg.get("routes") or die("stackgate.toml: no [[routes]]")
for i, r in enumerate(routes):
    keys_in(f"[[routes]] #{i}", r, ROUTE)
    if r.get("kind") not in ("delivery", "preview", "graphql", "graphql_preview"):
        die(f"stackgate.toml: routes #{i}: bad kind {r.get('kind')!r}")
    if r.get("region", "na") not in ("na", "eu", "au", "azure-na", "azure-eu", "gcp-na", "gcp-eu"):
        die(f"stackgate.toml: routes #{i}: bad region {r.get('region')!r}")
    if not r.get("hosts"):
        die(f"stackgate.toml: routes #{i}: hosts is required")
stacks = cfg.get("stacks") or die("stackgate.toml: no [[stacks]]")
needed_env = set()
if "admin" in cfg:
    needed_env.add(cfg["admin"]["token_env"])
if "cluster" in cfg:
    needed_env.add(cfg["cluster"].get("redis_url_env") or die("stackgate.toml: [cluster] needs redis_url_env"))
    if "lease" in cfg["cluster"]:
        check_dur("cluster.lease", cfg["cluster"]["lease"])
snapshots = []
for i, s in enumerate(stacks):
    keys_in(f"[[stacks]] #{i}", s, STACK)
    for k in ("name", "api_key", "registry"):
        if k not in s:
            die(f"stackgate.toml: stacks #{i}: {k} is required")
    reg = s["registry"]
    keys_in(f"[stacks.registry] of {s['name']}", reg, REGISTRY)
    if ("cma_url" in reg) == ("tokens_file" in reg):
        die(f"stackgate.toml: stack {s['name']}: exactly one of cma_url or tokens_file")
    if "cma_url" in reg:
        if reg.get("auth") not in ("authtoken", "bearer"):
            die(f"stackgate.toml: stack {s['name']}: auth must be authtoken or bearer")
        needed_env.add(reg.get("credential_env") or die(f"stackgate.toml: stack {s['name']}: credential_env required with cma_url"))
    for k in ("sync_interval", "max_staleness"):
        if k in reg:
            check_dur(f"stacks.{s['name']}.registry.{k}", reg[k])
    if "snapshot" in reg:
        snapshots.append(reg["snapshot"])
    lim = s.get("limits", {})
    keys_in(f"[stacks.limits] of {s['name']}", lim, LIMITS)
    for k in ("per_token", "origin", "failed_auth_per_ip"):
        if k in lim:
            keys_in(f"stacks.limits.{k} of {s['name']}", lim[k], LIMIT)
    for o in lim.get("overrides", []):
        keys_in(f"[[stacks.limits.overrides]] of {s['name']}", o, OVERRIDE)
ok(f"stackgate.toml: only SPEC §5 keys; {len(routes)} route(s), {len(stacks)} stack(s)")

missing = needed_env - env_names
if missing:
    die(f"Deployment does not set env var(s) {sorted(missing)} named by stackgate.toml")
def port_of(addr):
    return int(addr.rsplit(":", 1)[1])
listen = cfg["listen"]
if not listen.get("admin", "").startswith("0.0.0.0:") or port_of(listen["admin"]) != 9090:
    die("stackgate.toml: listen.admin must be 0.0.0.0:9090 so probes and Prometheus reach it")
if listen.get("http") and port_of(listen["http"]) != ports.get("http"):
    die("stackgate.toml: listen.http port differs from the container port 'http'")
for snap in snapshots:
    if not any(snap.startswith(mp.rstrip("/") + "/") for mp, n in mounts.items() if not any(
            v.get("configMap") or v.get("secret") for v in [vols[n]])):
        die(f"stackgate.toml: snapshot {snap} is not on a writable volume")
grace = cfg.get("server", {}).get("grace_period", "30s")
gm = re.fullmatch(r"(\d+)(ms|s|m)", grace)
grace_s = int(gm.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[gm.group(2)] if gm else 30
if pod.get("terminationGracePeriodSeconds", 30) <= grace_s:
    die(f"Deployment: terminationGracePeriodSeconds must exceed grace_period {grace}")
ok(f"stackgate.toml and Deployment agree: env {sorted(needed_env)}, ports, snapshot volume, grace {grace} < {pod['terminationGracePeriodSeconds']}s")

# --- 4. Prometheus -------------------------------------------------------------
prom = yaml_docs.get("deploy/prometheus/prometheus.yml", [None])[0] or die("deploy/prometheus/prometheus.yml missing")
for rf in prom.get("rule_files") or die("prometheus.yml: no rule_files"):
    if not os.path.isfile(os.path.join(deploy, "prometheus", rf)):
        die(f"prometheus.yml: rule file {rf} not found")
jobs = {j["job_name"] for j in prom.get("scrape_configs", [])}
if "stackgate" not in jobs:
    die("prometheus.yml: no scrape job named stackgate")
ok("prometheus.yml: rule_files exist, scrape job 'stackgate'")

alerts = yaml_docs.get("deploy/prometheus/alerts.yml", [None])[0] or die("deploy/prometheus/alerts.yml missing")
seen = set()
n_alerts = 0
used_in_alerts = set()
for g in alerts["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        n_alerts += 1
        a = r["alert"]
        if a in seen:
            die(f"alerts.yml: duplicate alert {a}")
        seen.add(a)
        if (r.get("labels") or {}).get("severity") not in ("info", "warning", "critical"):
            die(f"alerts.yml: {a}: severity label must be info, warning or critical")
        for k in ("summary", "description"):
            if not (r.get("annotations") or {}).get(k):
                die(f"alerts.yml: {a}: missing {k} annotation")
        used_in_alerts |= check_expr(f"alerts.yml {a}", r["expr"], extra_metrics={"up"})
        for m in re.finditer(r'job\s*=\s*"([^"]*)"', r["expr"]):
            if m.group(1) not in jobs:
                die(f"alerts.yml: {a}: job {m.group(1)!r} is not scraped by prometheus.yml")
ok(f"alerts.yml: {n_alerts} alerts with severity, summary, description; only SPEC metric names and labels")
for must in ("stackgate_registry_sync_failures_total", "stackgate_registry_last_success_timestamp_seconds",
             "stackgate_registry_held_back_removals", "stackgate_revocation_seconds_bucket",
             "stackgate_rejections_total", "stackgate_snapshot_write_failures_total", "up",
             "stackgate_cluster_leader", "stackgate_cluster_redis_up", "stackgate_cluster_fallback",
             "stackgate_registry_version"):
    if must not in used_in_alerts:
        die(f"alerts.yml: no alert uses {must}")
ok("alerts.yml: covers sync failures, staleness, held-back removals, snapshot write failures, revocation latency, rejections, instance down")

# Copy of the rules without annotations for `promtool test rules` (its
# alert tests compare annotations verbatim; the tests assert labels only).
stripped = json.loads(json.dumps(alerts))
for g in stripped["groups"]:
    for r in g["rules"]:
        r.pop("annotations", None)
with open(os.path.join(tmp, "alerts.yml"), "w", encoding="utf-8") as fh:
    yaml.safe_dump(stripped, fh, sort_keys=False)

# --- 5. Grafana dashboard --------------------------------------------------------
gpath = os.path.join(deploy, "grafana", "stackgate-dashboard.json")
try:
    with open(gpath, encoding="utf-8") as fh:
        dash = json.load(fh)
except (OSError, ValueError) as e:
    die(f"{rel(gpath)}: {e}")
ok(f"{rel(gpath)}: parses as JSON")
if dash.get("schemaVersion") != 39:
    die("dashboard: schemaVersion must be 39")
tvars = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if tvars.get("DS_PROMETHEUS", {}).get("type") != "datasource" and not any(
        i.get("name") == "DS_PROMETHEUS" for i in dash.get("__inputs", [])):
    die("dashboard: needs a DS_PROMETHEUS datasource variable or input")
sv = tvars.get("stack") or die("dashboard: no 'stack' variable")
q = sv.get("query")
q = q.get("query") if isinstance(q, dict) else q
if (q or "").replace(" ", "") != "label_values(stackgate_registry_tokens,stack)":
    die(f"dashboard: stack variable query is {q!r}")
ok("dashboard: schemaVersion 39, DS_PROMETHEUS datasource variable, stack variable from label_values(stackgate_registry_tokens, stack)")

def walk_panels(ps):
    for p in ps:
        yield p
        yield from walk_panels(p.get("panels", []))
ids, used, n_expr = set(), set(), 0
for p in walk_panels(dash.get("panels", [])):
    if p["id"] in ids:
        die(f"dashboard: duplicate panel id {p['id']}")
    ids.add(p["id"])
    if p["type"] == "row":
        continue
    if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
        die(f"dashboard: panel {p['title']!r} does not use ${{DS_PROMETHEUS}}")
    if not p.get("targets"):
        die(f"dashboard: panel {p['title']!r} has no query")
    for t in p["targets"]:
        if (t.get("datasource") or {}).get("uid", "${DS_PROMETHEUS}") != "${DS_PROMETHEUS}":
            die(f"dashboard: panel {p['title']!r} target uses another datasource")
        n_expr += 1
        used |= check_expr(f"dashboard panel {p['title']!r}", t["expr"])
gp_ok = all("gridPos" in p for p in walk_panels(dash["panels"]))
if not gp_ok:
    die("dashboard: panel without gridPos")
unused = {"stackgate_" + b + ("_bucket" if h else "") for b, (_l, h) in METRICS.items()} - used
if unused:
    die(f"dashboard: no panel shows {sorted(unused)}")
ok(f"dashboard: {len(ids)} panels, {n_expr} queries, only SPEC metric names and labels, every SPEC metric shown")

# --- 6. Dockerfile (static: no docker daemon needed) ---------------------------
dpath = os.path.join(deploy, "Dockerfile")
lines, cur = [], ""
for raw in open(dpath, encoding="utf-8").read().splitlines():
    st = raw.strip()
    if not cur and (not st or st.startswith("#")):
        continue
    if st.endswith("\\"):
        cur += st[:-1] + " "
        continue
    lines.append((cur + st).strip())
    cur = ""
instr = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
froms = [a for i, a in instr if i == "FROM"]
if len(froms) < 2 or not froms[0].startswith("rust:1-bookworm"):
    die("Dockerfile: must be multi-stage with a rust:1-bookworm builder")
final = froms[-1].split()[0]
if final not in ("gcr.io/distroless/cc-debian12:nonroot", "debian:bookworm-slim"):
    die(f"Dockerfile: unexpected runtime image {final}")
last_stage = instr[max(k for k, (i, _a) in enumerate(instr) if i == "FROM"):]
def last(name):
    vals = [a for i, a in last_stage if i == name]
    return vals[-1] if vals else None
if not any(i == "RUN" and "cargo build --release --locked" in a for i, a in instr):
    die("Dockerfile: no `cargo build --release --locked`")
if last("USER") != "65532:65532":
    die("Dockerfile: runtime stage must set USER 65532:65532")
if set((last("EXPOSE") or "").split()) != {"8080", "8443", "9090"}:
    die("Dockerfile: EXPOSE 8080 8443 9090 expected")
if json.loads(last("ENTRYPOINT") or "null") != ["/usr/local/bin/stackgate"]:
    die("Dockerfile: ENTRYPOINT must be [\"/usr/local/bin/stackgate\"]")
cmd = json.loads(last("CMD") or "null")
if not cmd or cmd[:3] != ["run", "--config", "/etc/stackgate/stackgate.toml"]:
    die(f"Dockerfile: CMD must run with --config /etc/stackgate/stackgate.toml (got {cmd})")
copies = [a for i, a in last_stage if i == "COPY"]
if len(copies) != 1 or not copies[0].startswith("--from=") or not copies[0].endswith("/usr/local/bin/stackgate"):
    die(f"Dockerfile: the runtime stage must copy only the binary to /usr/local/bin/stackgate (got {copies})")
if c.get("args") and c["args"][:3] != cmd[:3]:
    die("Dockerfile CMD and Deployment args disagree on the config path")
ign = os.path.join(deploy, "Dockerfile.dockerignore")
if not os.path.isfile(ign) or "target/" not in open(ign).read().split():
    die("deploy/Dockerfile.dockerignore must exclude target/")
ok(f"Dockerfile: {len(froms)} stages, rust:1-bookworm -> {final}, USER 65532:65532, EXPOSE 8080 8443 9090, binary only")

# --- 7. README documents every file and alert --------------------------------------
readme = open(os.path.join(deploy, "README.md"), encoding="utf-8").read()
for root, _dirs, files in os.walk(deploy):
    for f in files:
        r = os.path.relpath(os.path.join(root, f), deploy)
        if r != "README.md" and r not in readme:
            die(f"deploy/README.md does not mention {r}")
for a in sorted(seen):
    if a not in readme:
        die(f"deploy/README.md does not explain alert {a}")
ok(f"deploy/README.md mentions every file and all {len(seen)} alerts")

with open(os.path.join(tmp, "count"), "w") as fh:
    fh.write(str(count))
PY
PASSED=$((PASSED + $(cat "$TMP/count")))

# ---------------------------------------------------------------------------
# promtool
# ---------------------------------------------------------------------------
if ! command -v promtool >/dev/null 2>&1 && [ -z "$NO_INSTALL" ] && [ "$(id -u)" = 0 ] \
   && command -v apt-get >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get update -qq >"$TMP/apt.log" 2>&1 \
     && apt-get install -y -qq --no-install-recommends prometheus >>"$TMP/apt.log" 2>&1; then
    :
  else
    echo "warning: could not install prometheus:"; tail -n 5 "$TMP/apt.log" || true
  fi
fi
if command -v promtool >/dev/null 2>&1; then
  promtool check rules deploy/prometheus/alerts.yml >"$TMP/out" 2>&1 \
    || { cat "$TMP/out"; fail "promtool check rules deploy/prometheus/alerts.yml"; }
  pass "promtool check rules deploy/prometheus/alerts.yml"
  if promtool check config deploy/prometheus/prometheus.yml >"$TMP/out" 2>&1; then
    pass "promtool check config deploy/prometheus/prometheus.yml"
  elif grep -q 'field kubernetes_sd_configs not found' "$TMP/out"; then
    # Debian's promtool is built without Kubernetes service discovery. Check
    # the rest of the file (relabel rules, rule_files) with the SD block
    # swapped for a static target.
    python3 - "$REPO/deploy/prometheus" "$TMP/prometheus.yml" <<'PY'
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
cfg = yaml.safe_load(open(os.path.join(src, "prometheus.yml")))
for job in cfg.get("scrape_configs", []):
    if job.pop("kubernetes_sd_configs", None) is not None:
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
cfg["rule_files"] = [os.path.join(src, f) for f in cfg.get("rule_files", [])]
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
    promtool check config "$TMP/prometheus.yml" >"$TMP/out" 2>&1 \
      || { cat "$TMP/out"; fail "promtool check config deploy/prometheus/prometheus.yml (kubernetes_sd swapped for static)"; }
    pass "promtool check config deploy/prometheus/prometheus.yml (this promtool lacks kubernetes_sd; checked with a static target in its place)"
  else
    cat "$TMP/out"; fail "promtool check config deploy/prometheus/prometheus.yml"
  fi
  if [ -f deploy/prometheus/alerts_test.yml ]; then
    cp deploy/prometheus/alerts_test.yml "$TMP/alerts_test.yml"
    (cd "$TMP" && promtool test rules alerts_test.yml) >"$TMP/out" 2>&1 \
      || { cat "$TMP/out"; fail "promtool test rules deploy/prometheus/alerts_test.yml"; }
    pass "promtool test rules deploy/prometheus/alerts_test.yml (alerts fire as intended)"
  fi
else
  note "promtool not available (not root, or apt-get failed): rules/config not checked by promtool"
fi

# ---------------------------------------------------------------------------
# Kubernetes schemas (best effort: kubernetes-validate from PyPI)
# ---------------------------------------------------------------------------
if ! python3 -c 'import kubernetes_validate' 2>/dev/null && [ -z "$NO_INSTALL" ]; then
  pip install --quiet --retries 1 --timeout 20 kubernetes-validate >/dev/null 2>&1 \
    || python3 -m pip install --quiet --retries 1 --timeout 20 kubernetes-validate >/dev/null 2>&1 || true
fi
if python3 -c 'import kubernetes_validate' 2>/dev/null; then
  python3 - <<'PY' || fail "kubernetes-validate: manifests do not match the Kubernetes schemas"
import glob, sys, yaml, kubernetes_validate as kv
version = kv.latest_version()
bad = 0
for p in sorted(glob.glob("deploy/kubernetes/*.yaml")):
    if p.endswith("kustomization.yaml"):
        continue
    for d in yaml.safe_load_all(open(p)):
        if not d:
            continue
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as e:
            bad += 1
            print(f"{p}: {d['kind']}/{d['metadata']['name']}: {e.message} at {'/'.join(map(str, e.path))}", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - unknown kind/version etc.
            bad += 1
            print(f"{p}: {e}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
  pass "kubernetes-validate (strict) accepts every manifest"
else
  note "kubernetes-validate not available: Kubernetes schemas not checked"
fi

# ---------------------------------------------------------------------------
# stackgate check --config <ConfigMap's stackgate.toml>
# ---------------------------------------------------------------------------
BIN=""
for b in target/release/stackgate target/debug/stackgate; do
  if [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; }; then BIN="$b"; fi
done
if [ -n "$BIN" ]; then
  if STACKGATE_ADMIN_TOKEN=x STACKGATE_CMA_AUTHTOKEN=y STACKGATE_REDIS_URL=redis://redis:6379/ timeout 60 "$BIN" check --config "$TMP/stackgate.toml" >"$TMP/out" 2>&1; then
    pass "$BIN check --config <ConfigMap stackgate.toml> exits 0"
  else
    cat "$TMP/out"; fail "$BIN check rejected the ConfigMap's stackgate.toml"
  fi
  # Sanity: a broken config must be refused, or the check above proves nothing.
  sed 's/^kind = "delivery"/kind = "no-such-kind"/' "$TMP/stackgate.toml" >"$TMP/broken.toml"
  if STACKGATE_ADMIN_TOKEN=x STACKGATE_CMA_AUTHTOKEN=y STACKGATE_REDIS_URL=redis://redis:6379/ timeout 60 "$BIN" check --config "$TMP/broken.toml" >/dev/null 2>&1; then
    echo "warning: $BIN check also accepted a config with kind = \"no-such-kind\"; is the binary a stub or out of date?"
  fi
else
  note "no target/release/stackgate or target/debug/stackgate: 'stackgate check' not run (cargo build first)"
fi

echo "deploy: $PASSED checks passed"
