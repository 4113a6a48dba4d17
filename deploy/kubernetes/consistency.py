"""What the Kubernetes schemas cannot see in deploy/kubernetes: that the manifests fit together
and fit isrgate. Run by validate.sh (with the venv that has PyYAML and jsonschema):

    python consistency.py REPOSITORY_ROOT

Checks: the kustomization lists files that exist and every other file is accounted for; the
ServiceMonitor against schemas/servicemonitor-v1.json; selectors select the pods they mean;
port names exist; Secret keys exist; the ConfigMap's keys and the ISRGATE__SECTION__KEY
variables are keys of config/isrgate.toml; the admin and public ports agree with the config;
the shutdown arithmetic (preStop + accept_grace + shutdown_grace < terminationGracePeriodSeconds,
readiness noticed within the accept grace); the pod's user is the image's. Every problem is
listed, then exit 1.
"""

import json
import pathlib
import re
import sys

import jsonschema
import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: validate.sh installs tomli
    import tomli as tomllib

ROOT = pathlib.Path(sys.argv[1])
HERE = ROOT / "deploy" / "kubernetes"
# Files deliberately not in kustomization.yaml (each says why in its header).
NOT_LISTED = {"secret.yaml", "servicemonitor.yaml", "nextjs.example.yaml"}
problems = []


def fail(where, what):
    problems.append(f"{where}: {what}")


def load():
    docs = {}
    for f in sorted(HERE.glob("*.yaml")):
        docs[f.name] = [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


DOCS = load()


def resource(kind, name):
    for file, docs in DOCS.items():
        for d in docs:
            if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
                return file, d
    fail("deploy/kubernetes", f"no {kind} named {name}")
    return "?", {}


def selects(selector, labels, where):
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail(where, f"selector {selector} does not select the pods labelled {labels}")


def seconds(text, where):
    """A humantime duration of the forms isrgate.toml uses here: 500ms, 5s, 2m, 1h."""
    m = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h)\s*", str(text))
    if not m:
        fail(where, f"{text!r}: not a duration this check reads (500ms, 5s, 2m, 1h)")
        return 0.0
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def reference_keys():
    """Section → keys of config/isrgate.toml, commented-out keys (documented defaults) too."""
    keys, section = {}, None
    for line in (ROOT / "config" / "isrgate.toml").read_text().splitlines():
        m = re.match(r"^\[([a-z_]+)\]", line)
        if m:
            section = m.group(1)
            keys.setdefault(section, set())
            continue
        m = re.match(r"^(?:# ?)?([a-z_0-9]+) = ", line)
        if m and section:
            keys[section].add(m.group(1))
    return keys


def check_kustomization():
    kust = DOCS["kustomization.yaml"][0]
    listed = set(kust.get("resources", []))
    for r in sorted(listed):
        if r not in DOCS:
            fail("kustomization.yaml", f"lists {r}, which does not exist")
    for f in DOCS:
        if f != "kustomization.yaml" and f not in listed and f not in NOT_LISTED:
            fail("kustomization.yaml", f"{f} is neither listed nor known to be left out")
    return {i["name"] for i in kust.get("images", [])}


def check_servicemonitor(admin_service):
    file, sm = resource("ServiceMonitor", "isrgate")
    schema = json.loads((HERE / "schemas" / "servicemonitor-v1.json").read_text())
    for e in jsonschema.Draft7Validator(schema).iter_errors(sm):
        fail(file, f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}")
    spec = sm.get("spec", {})
    selects(spec.get("selector", {}).get("matchLabels"), admin_service["metadata"]["labels"], file)
    names = {p["name"] for p in admin_service["spec"]["ports"]}
    for ep in spec.get("endpoints", []):
        if ep.get("port") not in names:
            fail(file, f"endpoint port {ep.get('port')!r} is not a port of the admin Service")
    return [ep["authorization"]["credentials"] for ep in spec.get("endpoints", [])
            if "authorization" in ep]


def check_secret_refs(secret, refs, where):
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for ref in refs:
        if ref.get("name") != secret["metadata"]["name"]:
            fail(where, f"refers to Secret {ref.get('name')!r}, not {secret['metadata']['name']!r}")
        elif ref.get("key") not in keys and not ref.get("optional"):
            fail(where, f"Secret key {ref.get('key')!r} is not in secret.yaml")


def env_secret_refs(container):
    return [e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]


def check_config(file, container, pod, ports):
    cm_file, cm = resource("ConfigMap", "isrgate-config")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounts = [m for m in container.get("volumeMounts", [])
              if volumes.get(m["name"], {}).get("configMap", {}).get("name") == "isrgate-config"]
    if not mounts or f"{mounts[0]['mountPath']}/isrgate.toml" != env.get("ISRGATE_CONFIG"):
        fail(file, "ISRGATE_CONFIG is not the mounted ConfigMap's isrgate.toml")
    text = cm.get("data", {}).get("isrgate.toml")
    if text is None:
        fail(cm_file, "no isrgate.toml key")
        return {}
    config = tomllib.loads(text)
    known = reference_keys()
    for section, table in config.items():
        for key in table:
            if key not in known.get(section, ()):
                fail(cm_file, f"{section}.{key} is not a key of config/isrgate.toml")
    for name in env:
        m = re.fullmatch(r"ISRGATE__([A-Z_]+?)__([A-Z_0-9]+)", name)
        if m and m.group(2).lower() not in known.get(m.group(1).lower(), ()):
            fail(file, f"{name} names no key of config/isrgate.toml")
    listen = config.get("listen", {}).get("addr", "0.0.0.0:8080")
    admin = env.get("ISRGATE__ADMIN__LISTEN") or config.get("admin", {}).get("listen", "")
    for what, addr, port in (("listen.addr", listen, "http"), ("admin listener", admin, "admin")):
        if not addr.endswith(f":{ports.get(port)}"):
            fail(file, f"{what} {addr!r} is not on the container port {port!r} ({ports.get(port)})")
    return config


def defaults():
    return tomllib.loads((ROOT / "config" / "isrgate.toml").read_text())


def check_shutdown(file, pod, container, config):
    listen = {**defaults().get("listen", {}), **config.get("listen", {})}
    accept = seconds(listen["accept_grace"], "listen.accept_grace")
    drain = seconds(listen["shutdown_grace"], "listen.shutdown_grace")
    pre = container.get("lifecycle", {}).get("preStop", {})
    command = pre.get("exec", {}).get("command", [])
    if pre.get("sleep"):
        pre_stop = pre["sleep"]["seconds"]
    elif len(command) == 2 and command[0] == "sleep":
        pre_stop = int(command[1])
    else:
        fail(file, "the preStop hook is not a sleep (it covers the endpoints' update)")
        pre_stop = 0
    total = pod.get("terminationGracePeriodSeconds", 30)
    if pre_stop + accept + drain >= total:
        fail(file, f"terminationGracePeriodSeconds {total} does not cover preStop {pre_stop} s"
                   f" + accept_grace {accept:g} s + shutdown_grace {drain:g} s")
    probe = container.get("readinessProbe", {})
    noticed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    if noticed > accept:
        fail(file, f"readiness is noticed after {noticed} s (periodSeconds x failureThreshold),"
                   f" past the accept grace ({accept:g} s)")


def check_gateway(images):
    file, dep = resource("Deployment", "isrgate")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    selects(dep["spec"]["selector"]["matchLabels"], labels, file)
    container = pod["containers"][0]
    if container["image"].split(":")[0] not in images:
        fail(file, f"image {container['image']} is not the one kustomization.yaml names")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for name in ("isrgate", "isrgate-admin"):
        svc_file, svc = resource("Service", name)
        selects(svc["spec"]["selector"], labels, svc_file)
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in ports:
                fail(svc_file, f"targetPort {p['targetPort']!r} is not a container port name")
    pdb_file, pdb = resource("PodDisruptionBudget", "isrgate")
    selects(pdb["spec"]["selector"]["matchLabels"], labels, pdb_file)
    for kind, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container.get(kind, {}).get("httpGet", {})
        if (get.get("path"), get.get("port")) != (path, "admin"):
            fail(file, f"{kind} is not GET {path} on the admin port")
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"--uid (\d+)", dockerfile)
    if not uid or pod["securityContext"].get("runAsUser") != int(uid.group(1)):
        fail(file, "runAsUser is not the Dockerfile's isrgate user")
    config = check_config(file, container, pod, ports)
    check_shutdown(file, pod, container, config)
    return container, config


def main():
    images = check_kustomization()
    container, config = check_gateway(images)
    _, admin = resource("Service", "isrgate-admin")
    credentials = check_servicemonitor(admin)
    _, secret = resource("Secret", "isrgate")
    check_secret_refs(secret, env_secret_refs(container), "deployment.yaml")
    check_secret_refs(secret, credentials, "servicemonitor.yaml")
    headless_file, headless = resource("Service", "nextjs-headless")
    if headless["spec"].get("clusterIP") != "None":
        fail(headless_file, "not headless (clusterIP: None): DNS would answer one virtual IP")
    dns = config.get("upstream", {}).get("dns_name", "")
    host, _, port = dns.rpartition(":")
    service_ports = {str(p["port"]) for p in headless["spec"]["ports"]}
    if host.split(".")[0] != headless["metadata"]["name"] or port not in service_ports:
        fail("configmap.yaml", f"upstream.dns_name {dns!r} is not the headless Service's name:port")
    example_file, example = resource("Deployment", "nextjs")
    selects(headless["spec"]["selector"], example["spec"]["template"]["metadata"]["labels"],
            headless_file)
    check_secret_refs(secret, env_secret_refs(example["spec"]["template"]["spec"]["containers"][0]),
                      example_file)
    if problems:
        print("deploy/kubernetes is inconsistent:", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)


main()
