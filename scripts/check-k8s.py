"""Helpers of scripts/check-k8s.sh: reads rendered manifests, the Dockerfile and the Grafana
dashboard. Run with the Python of check-k8s.sh's virtualenv (it has PyYAML).

  configs RENDERED OUTDIR           write the rendered syncar ConfigMap's files to OUTDIR
  consistency RENDERED DOCKERFILE   what no schema checks: the listeners and probes of every
                                    syncar container (the sidecar, and `syncar relay` where a
                                    Deployment runs it) against the config, PodMonitor and
                                    Service against the Deployments, mounts against the
                                    config and Dockerfile, the Unix socket's volume and mode
                                    against the pod, the relay against the sidecar
  dashboard DASHBOARD SCRAPE RULES  every metric queried is in the scrape; writes each query
                                    as a recording rule, for `promtool check rules`

Prints what is wrong and exits 1.
"""

import ipaddress
import json
import os
import posixpath
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
# scheme://user:password@
PASSWORD_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"]*:[^/\s@\"]+@")

problems = []


def bad(message):
    problems.append(message)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


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


def syncar_containers(deploy):
    """The syncar containers of a Deployment's pods, as (role, container): the native sidecar
    (the init container named syncar) and `syncar relay` (a container whose args are relay)."""
    spec = deploy["spec"]["template"]["spec"]
    found = [("sidecar", c) for c in spec.get("initContainers", []) if c["name"] == "syncar"]
    found += [("relay", c) for c in spec.get("initContainers", []) + spec["containers"]
              if c.get("args", [])[:1] == ["relay"]]
    return found


def env_value(container, name):
    """The literal value of an environment variable, None if unset."""
    for env in container.get("env", []):
        if env["name"] == name:
            if "value" not in env:
                bad(f"{container['name']}: {name} is not a literal value")
            return env.get("value")
    return None


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def consistency(rendered, dockerfile):
    docs = load(rendered)
    cm = syncar_configmap(docs)
    config = tomllib.loads(cm["data"]["syncar.toml"])
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    runs = [(d, role, c) for d in deployments for role, c in syncar_containers(d)]
    sidecars = [r for r in runs if r[1] == "sidecar"]
    relays = [r for r in runs if r[1] == "relay"]
    if len(sidecars) != 1:
        sys.exit(f"check-k8s: expected one Deployment with the syncar sidecar, "
                 f"found {len(sidecars)}")
    sidecar_deploy, _, sidecar = sidecars[0]
    if sidecar.get("restartPolicy") != "Always":
        bad("syncar: restartPolicy must be Always (a native sidecar)")

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
    if set(cm["data"]) != {"syncar.toml"}:
        bad(f"the syncar ConfigMap holds {sorted(cm['data'])}, expected only syncar.toml")

    # No credentials anywhere: the URLs come from the Secret, created outside the repo. The
    # config is checked by its values: its comments show URLs with a placeholder password.
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if "syncar-auth" in json.dumps(d):
            bad(f"{name} refers to the Secret syncar-auth: syncar takes no token (its API is "
                "on loopback)")
        if d["kind"] == "Secret":
            bad(f"{name}: a Secret in the manifests; create it outside the repo")
        text = json.dumps(config if d is cm else d)
        if PASSWORD_IN_URL.search(text):
            bad(f"{name} holds a URL with a password: put it in the Secret {SECRET}")

    # The image: the config path, the user the pods run as, the admin port.
    text = open(dockerfile).read()
    if f'"--config", "{CONFIG_DIR}/syncar.toml"' not in text:
        bad(f"the Dockerfile's ENTRYPOINT does not read {CONFIG_DIR}/syncar.toml")
    user = re.findall(r"^USER\s+(\d+):(\d+)\s*$", text, re.M)
    user = (int(user[-1][0]), int(user[-1][1])) if user else None
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

    check_socket(sidecar_deploy, sidecar, server)

    # Every syncar container, sidecar or relay: the admin port only, probes on it, the
    # config and Secret mounted where the config reads them, the image's user.
    for deploy, _, c in runs:
        check_container(f"Deployment/{deploy['metadata']['name']}: {c['name']}", deploy, c,
                        cm, config, admin_port, user)

    # The relay of the wal source: a Deployment of its own, like the sidecar but for its
    # command, and then the sidecar must never stand for election.
    feeds = config.get("feeds", {})
    wal = feeds.get("postgres", True) and feeds.get("postgres_source", "auto") in ("auto", "wal")
    # The environment overrides feeds.relay, and syncar accepts only these two values.
    env_relay = env_value(sidecar, "SYNCAR_RELAY")
    if env_relay not in (None, "true", "false"):
        bad(f"syncar: SYNCAR_RELAY = {env_relay!r} is neither \"true\" nor \"false\"")
    candidate = feeds.get("relay", True) if env_relay is None else env_relay == "true"
    for deploy, _, c in relays:
        name = f"Deployment/{deploy['metadata']['name']}: {c['name']}"
        spec = deploy["spec"]["template"]["spec"]
        if c.get("args") != ["relay"]:
            bad(f"{name}: args {c.get('args')} are not [relay]")
        if c in spec.get("initContainers", []):
            bad(f"{name}: `syncar relay` is an init container; it belongs in containers")
        if deploy["spec"].get("replicas", 1) < 2:
            bad(f"{name}: {deploy['spec'].get('replicas', 1)} replica(s): with one, no "
                "standby takes over within feeds.relay_lease when it dies")
        if c.get("image") != sidecar.get("image"):
            bad(f"{name}: image {c.get('image')} is not the sidecar's {sidecar.get('image')}")
        if c.get("securityContext") != sidecar.get("securityContext"):
            bad(f"{name}: securityContext differs from the sidecar's")
        ctx = spec.get("securityContext", {})
        sidecar_ctx = sidecar_deploy["spec"]["template"]["spec"].get("securityContext", {})
        for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"):
            if ctx.get(key) != sidecar_ctx.get(key):
                bad(f"{name}: the pod's securityContext.{key} is {ctx.get(key)!r}, the "
                    f"sidecar's pod has {sidecar_ctx.get(key)!r}")
        if not wal:
            bad(f"{name}: the config never uses the wal source (feeds.postgres_source = "
                f"{feeds.get('postgres_source', 'auto')!r}, feeds.postgres = "
                f"{feeds.get('postgres', True)}): the relay would never stream")
        if candidate:
            bad(f"{name} runs `syncar relay`, but the sidecar still stands for election "
                "(and would open a replication connection in the app's pod): set "
                "SYNCAR_RELAY=false on it, as k8s/components/relay does")
    if not relays and wal and not candidate:
        bad("the sidecar never relays (SYNCAR_RELAY=false or feeds.relay = false) and no "
            "Deployment runs `syncar relay`: nothing would stream the WAL")

    # Each Deployment owns its pods: no selector takes another's.
    for d in deployments:
        selector = d["spec"]["selector"].get("matchLabels", {})
        for other in deployments:
            labels = other["spec"]["template"]["metadata"].get("labels", {})
            if (other is d) != selects(selector, labels):
                bad(f"Deployment/{d['metadata']['name']}: selector {selector} "
                    f"{'does not select' if other is d else 'also selects'} the pods of "
                    f"Deployment/{other['metadata']['name']}")

    # What scrapes them: selectors match every pod running syncar and no other, the admin
    # port, no credentials.
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
        for deploy in deployments:
            labels = deploy["spec"]["template"]["metadata"].get("labels", {})
            runs_syncar = any(r[0] is deploy for r in runs)
            if selects(selector, labels) != runs_syncar:
                bad(f"{name}: selector {selector} "
                    f"{'does not select' if runs_syncar else 'selects'} the pods of "
                    f"Deployment/{deploy['metadata']['name']} ({labels})")
        for t in targets:
            if t not in (ADMIN_PORT, admin_port):
                bad(f"{name}: port {t!r} is not the admin port ({ADMIN_PORT}, {admin_port})")


def check_socket(deploy, sidecar, server):
    """server.listen_unix: in an emptyDir that syncar and the app both mount at the socket's
    directory, with a mode that lets the app connect whatever user it runs as."""
    name = f"Deployment/{deploy['metadata']['name']}"
    spec = deploy["spec"]["template"]["spec"]
    path = server.get("listen_unix")
    if not path:
        bad("server.listen_unix is not set: the base serves the API on a Unix socket too, in "
            "the emptyDir syncar-socket, and apps may call it there")
        return
    directory = posixpath.dirname(path)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    # syncar creates the socket: a writable mount of the whole volume at its directory (it
    # creates no directories).
    mount = next((m for m in sidecar.get("volumeMounts", []) if m["mountPath"] == directory),
                 None)
    if mount is None:
        bad(f"{name}: syncar mounts nothing at {directory}, where server.listen_unix = "
            f"{path!r} is created")
        return
    volume = mount["name"]
    if mount.get("readOnly") or mount.get("subPath") or mount.get("subPathExpr"):
        bad(f"{name}: syncar's mount of {volume} at {directory} is read-only or a subPath: "
            "syncar creates the socket there")
    if "emptyDir" not in volumes.get(volume, {}):
        bad(f"{name}: the volume {volume} at {directory} is not an emptyDir: the socket "
            "belongs in a volume of the pod's own")
    # The app: every container mounting the volume sees the socket at the same path, and one
    # at least (an app container, not an init container) does.
    others = [c for c in spec.get("initContainers", []) + spec["containers"] if c is not sidecar]
    mounting = []
    for c in others:
        for m in c.get("volumeMounts", []):
            if m["name"] != volume:
                continue
            mounting.append(c["name"])
            if m["mountPath"] != directory or m.get("subPath") or m.get("subPathExpr"):
                bad(f"{name}: {c['name']} mounts {volume} at {m['mountPath']}"
                    f"{' (subPath)' if m.get('subPath') or m.get('subPathExpr') else ''}, "
                    f"syncar at {directory}: the socket's path differs between them")
        socket_env = env_value(c, "SYNCAR_SOCKET")
        if socket_env is not None and socket_env != path:
            bad(f"{name}: {c['name']} has SYNCAR_SOCKET = {socket_env!r}, server.listen_unix "
                f"is {path!r}")
        if socket_env is not None and c["name"] not in mounting:
            bad(f"{name}: {c['name']} has SYNCAR_SOCKET but does not mount {volume}")
    if not any(c["name"] in mounting for c in spec["containers"]):
        bad(f"{name}: no app container mounts {volume}: the app cannot reach the socket "
            f"{path}")
    # Connecting takes write permission on the socket. Its group is the pod's fsGroup (the
    # kubelet makes the volume's directory setgid to it), which every container has as a
    # supplementary group: with group write, the app connects whatever user it runs as.
    mode = server.get("listen_unix_mode", "0600")
    try:
        bits = int(mode, 8)
    except ValueError:
        bits = 0
    if not bits & 0o020:
        bad(f"server.listen_unix_mode = {mode!r} does not let the group connect (\"0660\"): "
            "only an app running as syncar's user could use the socket")
    if spec.get("securityContext", {}).get("fsGroup") is None:
        bad(f"{name}: the pod sets no fsGroup: the socket's group would be syncar's, which "
            "the app's user need not have")


def check_container(name, deploy, c, cm, config, admin_port, user):
    """One syncar container (sidecar or relay) against the config and the image."""
    spec = deploy["spec"]["template"]["spec"]
    if spec.get("hostNetwork"):
        bad(f"{name}: hostNetwork: true would put syncar's unauthenticated API on the "
            "node's loopback")
    ports = {p["name"]: p["containerPort"] for k in spec.get("initContainers", [])
             + spec["containers"] for p in k.get("ports", [])}
    if ports.get(ADMIN_PORT) != admin_port:
        bad(f"{name}: container port {ADMIN_PORT} is {ports.get(ADMIN_PORT)}, "
            f"server.admin_listen's is {admin_port}")
    declared = [p["name"] for p in c.get("ports", [])]
    if declared != [ADMIN_PORT]:
        bad(f"{name} declares ports {declared}, expected only {ADMIN_PORT} "
            "(the API is loopback-only)")
    if any(e["name"] == "SYNCAR_AUTH_TOKEN" for e in c.get("env", [])):
        bad(f"{name}: SYNCAR_AUTH_TOKEN is set: the API is on loopback and needs no token")
    for env in ("SYNCAR_POSTGRES_URL", "SYNCAR_REDIS_URL"):
        if any(e["name"] == env for e in c.get("env", [])):
            bad(f"{name}: {env} is set: the URLs come from the files of the Secret {SECRET}")
    instance = next((e for e in c.get("env", []) if e["name"] == "SYNCAR_INSTANCE"), {})
    if instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
        bad(f"{name}: SYNCAR_INSTANCE is not the pod's name (metadata.name)")
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet")
        if get is None:
            bad(f"{name}: {probe} is not an httpGet probe")
            continue
        if get.get("path") != path:
            bad(f"{name}: {probe} gets {get.get('path')!r}, expected {path}")
        if get.get("port") not in (ADMIN_PORT, admin_port):
            bad(f"{name}: {probe} targets port {get.get('port')!r}, not the admin port")
        if get.get("httpHeaders"):
            bad(f"{name}: {probe} sends headers: the admin listener needs none")
    resources = c.get("resources", {})
    memory = resources.get("requests", {}).get("memory")
    if memory is None or memory != resources.get("limits", {}).get("memory"):
        bad(f"{name}: memory request {memory} is not its limit "
            f"{resources.get('limits', {}).get('memory')}")

    # The files: the config where the image reads it, the URLs in the mounted Secret.
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_volume = volumes.get(mounts.get(CONFIG_DIR, ""), {})
    if config_volume.get("configMap", {}).get("name") != cm["metadata"]["name"]:
        bad(f"{name}: {CONFIG_DIR} is not where the syncar ConfigMap is mounted")
    secrets_volume = volumes.get(mounts.get(SECRETS_DIR, ""), {})
    sources = [s["secret"] for s in secrets_volume.get("projected", {}).get("sources", [])
               if "secret" in s]
    if "secret" in secrets_volume:
        sources.append({"name": secrets_volume["secret"]["secretName"],
                        "items": secrets_volume["secret"].get("items", [])})
    secret_files = {}
    for secret in sources:
        if secret["name"] != SECRET:
            bad(f"{name}: the Secret {secret['name']} is mounted: syncar needs only {SECRET}")
        for item in secret.get("items", []):
            secret_files[f"{SECRETS_DIR}/{item['path']}"] = (secret["name"], item["key"])
    for key, path in [("postgres.url_file", config["postgres"].get("url_file")),
                      ("redis.url_file", config["redis"].get("url_file"))]:
        if path not in secret_files:
            bad(f"{name}: {key} = {path!r} is not a file of the Secret mounted at "
                f"{SECRETS_DIR}")

    # The user the container runs as is the image's.
    pod_ctx, ctx = spec.get("securityContext", {}), c.get("securityContext", {})
    runs_as = (ctx.get("runAsUser", pod_ctx.get("runAsUser")),
               ctx.get("runAsGroup", pod_ctx.get("runAsGroup")))
    if user != runs_as:
        bad(f"{name}: the Dockerfile's USER {user} is not the runAsUser/runAsGroup {runs_as}")


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
