"""Helpers of scripts/check-k8s.sh: reads rendered manifests, the Dockerfile and the Grafana
dashboard. Run with the Python of check-k8s.sh's virtualenv (it has PyYAML).

  configs RENDERED OUTDIR           write the rendered syncar ConfigMap's files to OUTDIR
  consistency RENDERED DOCKERFILE   what no schema checks: the listeners and probes against
                                    the config, PodMonitor and Service against the
                                    Deployment, mounts against the config and Dockerfile
  dashboard DASHBOARD SCRAPE RULES  every metric queried is in the scrape; writes each query
                                    as a recording rule, for `promtool check rules`

Prints what is wrong and exits 1.
"""

import ipaddress
import json
import os
import re
import sys
import tomllib

import yaml

# Where syncar reads its config in the image (Dockerfile ENTRYPOINT) and its Secret.
CONFIG_DIR = "/etc/syncar"
SECRETS_DIR = "/var/run/secrets/syncar"
SECRET = "syncar-backends"
# The container port of server.admin_listen: probes, Service and PodMonitor use it.
ADMIN_PORT = "admin"

problems = []


def bad(message):
    problems.append(message)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        sys.exit(f"check-k8s: expected one {kind}, found {len(found)}")
    return found[0]


def is_loopback(addr):
    host = addr.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def syncar_configmap(docs):
    return next(d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].startswith("syncar-config"))


def configs(rendered, outdir):
    """Writes every file of the syncar ConfigMap (syncar.toml) to outdir."""
    for name, text in syncar_configmap(load(rendered))["data"].items():
        with open(f"{outdir}/{name}", "w") as f:
            f.write(text)


def consistency(rendered, dockerfile):
    docs = load(rendered)
    deploy = one(docs, "Deployment")
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    sidecar = next((c for c in spec.get("initContainers", []) if c["name"] == "syncar"), None)
    if sidecar is None:
        sys.exit("check-k8s: no init container named syncar")
    if sidecar.get("restartPolicy") != "Always":
        bad("syncar: restartPolicy must be Always (a native sidecar)")
    ports = {p["name"]: p["containerPort"] for c in spec.get("initContainers", [])
             + spec["containers"] for p in c.get("ports", [])}
    sidecar_ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    cm = syncar_configmap(docs)
    config = tomllib.loads(cm["data"]["syncar.toml"])

    # The listeners: the API on loopback (the app is in the pod, and no token is configured),
    # probes and metrics on the admin listener, whose port is the container's only one.
    server = config.get("server", {})
    listen = server.get("listen", "127.0.0.1:7070")
    if not is_loopback(listen):
        bad(f"server.listen = {listen!r} is not loopback: the API is for the app in the pod")
    for key in ("auth_token_file", "allow_unauthenticated_non_loopback"):
        if server.get(key):
            bad(f"server.{key} is set: the API is on loopback and needs no token")
    admin = server.get("admin_listen")
    if admin is None:
        bad("server.admin_listen is not set: the probes and Prometheus need it")
        admin_port = None
    else:
        admin_port = int(admin.rsplit(":", 1)[1])
    if ports.get(ADMIN_PORT) != admin_port:
        bad(f"container port {ADMIN_PORT} is {ports.get(ADMIN_PORT)}, "
            f"server.admin_listen's is {admin_port}")
    if list(sidecar_ports) != [ADMIN_PORT]:
        bad(f"syncar declares ports {list(sidecar_ports)}, expected only {ADMIN_PORT} "
            "(the API is loopback-only)")
    for env in sidecar.get("env", []):
        if env["name"] == "SYNCAR_AUTH_TOKEN":
            bad("syncar: SYNCAR_AUTH_TOKEN is set: the API is on loopback and needs no token")
    for d in docs:
        if "syncar-auth" in json.dumps(d):
            bad(f"{d['kind']}/{d['metadata']['name']} refers to the Secret syncar-auth: "
                "syncar takes no token (its API is on loopback)")
    if spec.get("hostNetwork"):
        bad("hostNetwork: true would put syncar's unauthenticated API on the node's loopback")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        get = sidecar.get(probe, {}).get("httpGet")
        if get is None:
            bad(f"{probe} is not an httpGet probe")
            continue
        if get.get("path") != path:
            bad(f"{probe} gets {get.get('path')!r}, expected {path}")
        if get.get("port") not in (ADMIN_PORT, admin_port):
            bad(f"{probe} targets port {get.get('port')!r}, not the admin port")
        if get.get("httpHeaders"):
            bad(f"{probe} sends headers: the admin listener needs none")

    # The files: the config where the image reads it, the URLs in the mounted Secret.
    mounts = {m["mountPath"]: m["name"] for m in sidecar.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_volume = volumes.get(mounts.get(CONFIG_DIR, ""), {})
    if config_volume.get("configMap", {}).get("name") != cm["metadata"]["name"]:
        bad(f"{CONFIG_DIR} is not where the syncar ConfigMap is mounted")
    if set(cm["data"]) != {"syncar.toml"}:
        bad(f"the syncar ConfigMap holds {sorted(cm['data'])}, expected only syncar.toml")
    secrets_volume = volumes.get(mounts.get(SECRETS_DIR, ""), {})
    sources = [s["secret"] for s in secrets_volume.get("projected", {}).get("sources", [])
               if "secret" in s]
    if "secret" in secrets_volume:
        sources.append({"name": secrets_volume["secret"]["secretName"],
                        "items": secrets_volume["secret"].get("items", [])})
    secret_files = {}
    for secret in sources:
        if secret["name"] != SECRET:
            bad(f"the Secret {secret['name']} is mounted: syncar needs only {SECRET}")
        for item in secret.get("items", []):
            secret_files[f"{SECRETS_DIR}/{item['path']}"] = (secret["name"], item["key"])
    for key, path in [("postgres.url_file", config["postgres"].get("url_file")),
                      ("redis.url_file", config["redis"].get("url_file"))]:
        if path not in secret_files:
            bad(f"{key} = {path!r} is not a file of the Secret mounted at {SECRETS_DIR}")

    # The image: the config path, the user the pod runs as, the admin port.
    text = open(dockerfile).read()
    if f'"--config", "{CONFIG_DIR}/syncar.toml"' not in text:
        bad(f"the Dockerfile's ENTRYPOINT does not read {CONFIG_DIR}/syncar.toml")
    user = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    ctx = spec.get("securityContext", {})
    if not user or (int(user[-1][0]), int(user[-1][1])) != (ctx.get("runAsUser"),
                                                            ctx.get("runAsGroup")):
        bad(f"the Dockerfile's USER {user} is not the pod's runAsUser/runAsGroup")
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.*)$", text, re.M)
               for p in re.findall(r"\d+", line)}
    if admin_port is not None and admin_port not in exposed:
        bad(f"the Dockerfile does not EXPOSE the admin port {admin_port} ({sorted(exposed)})")
    # Cargo fails on a [[bench]] whose file is missing, even when building only the binary:
    # the dependency layer's stand-ins (and the second build's) must cover every one.
    with open(os.path.join(os.path.dirname(dockerfile) or ".", "Cargo.toml"), "rb") as f:
        cargo = tomllib.load(f)
    for bench in cargo.get("bench", []):
        path = bench.get("path", f"benches/{bench['name']}.rs")
        if text.count(path) < 2:
            bad(f"the Dockerfile does not create {path} in both build steps (a [[bench]])")

    # What scrapes it: selectors match the pod, the admin port, no credentials.
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service":
            selector = d["spec"].get("selector", {})
            targets = [p.get("targetPort") for p in d["spec"]["ports"]]
        elif d["kind"] == "PodMonitor":
            selector = d["spec"]["selector"].get("matchLabels", {})
            targets = []
            for ep in d["spec"]["podMetricsEndpoints"]:
                targets.append(ep.get("port"))
                if ep.get("path") != "/metrics":
                    bad(f"{name}: path {ep.get('path')!r} is not /metrics")
                for auth in ("authorization", "bearerTokenSecret", "basicAuth", "oauth2"):
                    if auth in ep:
                        bad(f"{name}: {auth} is set: the admin listener takes no credentials")
        else:
            continue
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            bad(f"{name}: selector {selector} does not select the pods ({labels})")
        for t in targets:
            if t not in (ADMIN_PORT, admin_port):
                bad(f"{name}: port {t!r} is not the admin port ({ADMIN_PORT}, {admin_port})")


def dashboard(path, scrape, rules_out):
    board = json.load(open(path))
    exprs = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            if node.get("type") == "query" and isinstance(node.get("definition"), str):
                exprs.append(node["definition"])
            if "datasource" in node and isinstance(node["datasource"], dict) \
                    and node["datasource"].get("uid") != "${datasource}":
                bad(f"{node.get('title', node.get('name'))}: datasource is not ${{datasource}}")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(board)
    if not any(v.get("type") == "datasource" for v in board["templating"]["list"]):
        bad("the dashboard has no datasource variable")
    exported = set()
    for line in open(scrape):
        if line.strip() and not line.startswith("#"):
            exported.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    queried = set()
    for e in exprs:
        queried |= set(re.findall(r"\bsyncar_[a-z0-9_]+", e))
    for name in sorted(queried - exported):
        bad(f"the dashboard queries {name}, which syncar's /metrics does not export")
    if queried <= exported:
        print(f"check-k8s: the dashboard's {len(exprs)} queries use {len(queried)} series, "
              f"all in the scrape ({len(exported)} series)")

    # Grafana's variables, replaced by what they stand for, so promtool can parse each query.
    rules = []
    for i, e in enumerate(x for x in exprs if not x.startswith("label_values(")):
        e = (e.replace("$__rate_interval", "5m").replace("$namespace", ".*")
             .replace("$pod", ".*"))
        rules.append({"record": f"dashboard:query_{i}", "expr": e})
    for e in (x for x in exprs if x.startswith("label_values(")):
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", e)
        if not inner:
            bad(f"unexpected variable query {e!r}")
            continue
        rules.append({"record": f"dashboard:variable_{len(rules)}",
                      "expr": inner.group(1).replace("$namespace", ".*")})
    with open(rules_out, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)


def main():
    cmd, *args = sys.argv[1:]
    {"configs": configs, "consistency": consistency, "dashboard": dashboard}[cmd](*args)
    for p in problems:
        print(f"check-k8s: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
