#!/usr/bin/env python3
"""Renders every overlay with `kubectl kustomize` and validates each object offline:
- built-in kinds against the Kubernetes OpenAPI schemas of the `kubernetes-validate` package (strict:
  unknown fields are errors);
- ServiceMonitor, HTTPRoute and ScaledObject against the schemas the @kubernetes-models npm packages
  generate from the Prometheus Operator, Gateway API and KEDA CRDs (validate-crds.mjs);
- InferencePool, for which no registry package carries a schema, and the whole deployment by the
  invariants that hold it together (selectors select the pods, ports and names line up, the grace
  period outlasts preStop + the drain, the metric names the HPA and the endpoint picker read are ones
  the server exports).
A negative control shows that each validator rejects a broken object.

  validate.py KUBECTL NODE_MODULES_DIR
"""
import copy
import json
import os
import re
import subprocess
import sys

import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K8S_VERSION = "1.33.0"
OVERLAYS = ["cpu", "gpu", "inference-gateway", "keda"]
CRD_KINDS = {"monitoring.coreos.com/v1/ServiceMonitor", "gateway.networking.k8s.io/v1/HTTPRoute",
             "keda.sh/v1alpha1/ScaledObject"}
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def render(kubectl, overlay):
    out = subprocess.run([kubectl, "kustomize", os.path.join(HERE, "overlays", overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def core_errors(obj):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return str(e).splitlines()[0]


def crd_results(node_modules, objs):
    script = os.path.join(node_modules, "validate-crds.mjs")
    with open(os.path.join(HERE, "validate-crds.mjs")) as src, open(script, "w") as dst:
        dst.write(src.read())  # ESM resolves packages next to the script
    r = subprocess.run(["node", script], input="".join(json.dumps(o) + "\n" for o in objs),
                       capture_output=True, text=True, cwd=node_modules)
    if r.stderr.strip():
        print(r.stderr, file=sys.stderr)
    return r.stdout.splitlines()


def server_metric_names():
    """Every llava_* / vllm:* metric name that appears as a string literal in the server's sources."""
    names = set()
    for d, _, files in os.walk(os.path.join(ROOT, "src")):
        for f in files:
            if f.endswith(".rs"):
                names |= set(re.findall(r'"((?:llava_|vllm:)[a-z0-9_:]+)"', open(os.path.join(d, f)).read()))
    return names


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def autoscaler(p, by, metric_names):
    """Exactly one autoscaler (the base's HPA, or KEDA's ScaledObject that replaces it) scales the
    Deployment on a metric the server exports."""
    hpa = by.get(("HorizontalPodAutoscaler", "llava-server"))
    scaled = by.get(("ScaledObject", "llava-server"))
    check((hpa is None) != (scaled is None), f"{p} exactly one autoscaler (HPA or KEDA ScaledObject)")
    if hpa is not None:
        check(hpa["spec"]["scaleTargetRef"]["name"] == "llava-server", f"{p} HPA scales the Deployment")
        hpa_metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        check(hpa_metric in metric_names, f"{p} HPA metric {hpa_metric} is exported by the server")
    if scaled is not None:
        target = scaled["spec"]["scaleTargetRef"]
        check((target.get("kind", "Deployment"), target["name"]) == ("Deployment", "llava-server"),
              f"{p} ScaledObject scales the Deployment")
        trigger = scaled["spec"]["triggers"][0]
        query = trigger["metadata"]["query"]
        used = set(re.findall(r"\b((?:llava_|vllm:)[a-z0-9_:]+)", query))
        check(trigger["type"] == "prometheus" and used and used <= metric_names,
              f"{p} ScaledObject queries {sorted(used)}, exported by the server")
        svc_label = re.search(r'service="([^"]+)"', query)
        check(svc_label is not None and ("Service", svc_label.group(1)) in by,
              f"{p} ScaledObject query selects the scraped Service's series")


def invariants(overlay, objs, metric_names):
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    dep = by[("Deployment", "llava-server")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    c = pod["spec"]["containers"][0]
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llava-server-config"))
    env = cm["data"]
    p = f"{overlay}:"
    check(c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"], f"{p} envFrom names the generated ConfigMap")
    port = next(x for x in c["ports"] if x["name"] == "http")["containerPort"]
    check(str(port) == env["LLAVA_SERVER_PORT"], f"{p} container port {port} is LLAVA_SERVER_PORT")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c[probe]["httpGet"]
        check(g["path"] == "/health" and g["port"] == "http", f"{p} {probe} on /health")
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    check(startup >= 1800, f"{p} startup probe allows {startup} s for a model download (>= 1800)")
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["LLAVA_SERVER_SHUTDOWN_TIMEOUT"])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    check(grace > pre_stop + drain, f"{p} grace period {grace} s > preStop {pre_stop} s + drain {drain:g} s")
    check(dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{p} Deployment selector matches its pods")
    svc = by[("Service", "llava-server")]
    check(matches(svc["spec"]["selector"], labels), f"{p} Service selects the server pods")
    check(matches(by[("PodDisruptionBudget", "llava-server")]["spec"]["selector"]["matchLabels"], labels),
          f"{p} PDB selects the server pods")
    sm = by[("ServiceMonitor", "llava-server")]
    check(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]), f"{p} ServiceMonitor selects the Service")
    check(sm["spec"]["endpoints"][0]["port"] in {x["name"] for x in svc["spec"]["ports"]}, f"{p} ServiceMonitor port is the Service's")
    autoscaler(p, by, metric_names)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "model-cache")["persistentVolumeClaim"]["claimName"]
    check(("PersistentVolumeClaim", claim) in by and mounts["model-cache"] == env["HF_HOME"], f"{p} model cache PVC mounted at HF_HOME")
    sec = pod["spec"]["securityContext"]
    check(sec["runAsNonRoot"] and sec["runAsUser"] == 1001, f"{p} runs as the image's non-root uid 1001")
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    want_gpu = overlay != "cpu"
    check(bool(gpus) == want_gpu and dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        ":cuda" if want_gpu else ":cpu"), f"{p} image flavour and GPU request agree ({c['image']}, gpu={gpus})")
    check(env["LLAVA_SERVER_DEVICE"] == ("cuda:0" if want_gpu else "cpu"), f"{p} LLAVA_SERVER_DEVICE={env['LLAVA_SERVER_DEVICE']}")
    if overlay != "inference-gateway":
        return
    pool = by[("InferencePool", "llava-server")]
    check(pool["apiVersion"] == "inference.networking.k8s.io/v1", f"{p} InferencePool is the v1 API")
    check(matches(pool["spec"]["selector"]["matchLabels"], labels), f"{p} InferencePool selects the server pods")
    check([t["number"] for t in pool["spec"]["targetPorts"]] == [port], f"{p} InferencePool targets port {port}")
    ref = pool["spec"]["endpointPickerRef"]
    epp_svc = by.get(("Service", ref["name"]))
    check(epp_svc is not None and ref["port"]["number"] in [x["port"] for x in epp_svc["spec"]["ports"]],
          f"{p} endpointPickerRef names the EPP Service and its port {ref['port']['number']}")
    check(ref.get("failureMode") in ("FailOpen", "FailClose"), f"{p} endpointPickerRef failureMode is valid")
    epp = by[("Deployment", "llava-server-epp")]
    check(matches(epp_svc["spec"]["selector"], epp["spec"]["template"]["metadata"]["labels"]), f"{p} EPP Service selects the EPP")
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    check(args[args.index("--pool-name") + 1] == pool["metadata"]["name"], f"{p} EPP --pool-name is the pool")
    route = by[("HTTPRoute", "llava-server")]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    check((backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"]), f"{p} HTTPRoute sends to the pool")
    epp_cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llava-server-epp"))
    vol = next(v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    check(vol["configMap"]["name"] == epp_cm["metadata"]["name"], f"{p} EPP mounts its generated ConfigMap")
    conf = yaml.safe_load(epp_cm["data"]["epp-config.yaml"])
    conf_file = args[args.index("--config-file") + 1]
    check(os.path.basename(conf_file) in epp_cm["data"], f"{p} EPP --config-file {conf_file} is in the ConfigMap")
    ext = next(pl for pl in conf["plugins"] if pl["type"] == "core-metrics-extractor")["parameters"]
    engine = next(e for e in ext["engineConfigs"] if e["name"] == labels.get(ext["engineLabelKey"]))
    check(engine is not None, f"{p} the pods' engine-type label names an engine config")
    for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
        check(engine[key] in metric_names, f"{p} EPP {key} {engine[key]} is exported by the server")
    refs = {r["pluginRef"] for prof in conf["schedulingProfiles"] for r in prof["plugins"]}
    check(refs <= {pl.get("name", pl["type"]) for pl in conf["plugins"]}, f"{p} EPP profiles name declared plugins")


def main():
    kubectl, node_modules = sys.argv[1], sys.argv[2]
    metric_names = server_metric_names()
    for overlay in OVERLAYS:
        objs = render(kubectl, overlay)
        print(f"== {overlay}: {len(objs)} objects")
        crds = []
        for o in objs:
            key = f"{o['apiVersion']}/{o['kind']}"
            if key in CRD_KINDS:
                crds.append(o)
            elif "." in o["apiVersion"].split("/")[0] and not o["apiVersion"].startswith(("apps/", "policy/", "autoscaling/", "rbac.authorization.k8s.io/")):
                print(f"--   {key} {o['metadata']['name']}: no registry package carries this schema; checked by invariants")
            else:
                err = core_errors(o)
                check(err is None, f"{overlay}: {key} {o['metadata']['name']} valid (Kubernetes {K8S_VERSION}, strict)" + (f": {err}" if err else ""))
        for line in crd_results(node_modules, crds):
            check(line.startswith("OK "), f"{overlay}: {line} (CRD schema)")
        invariants(overlay, objs, metric_names)
    # Negative controls: the validators reject what they should.
    objs = render(kubectl, "gpu")
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    check(core_errors(dep) is not None, "control: an unknown field in a Deployment is rejected")
    sm = copy.deepcopy(next(o for o in objs if o["kind"] == "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    check(all(not line.startswith("OK") for line in crd_results(node_modules, [sm])), "control: a malformed ServiceMonitor is rejected")
    so = copy.deepcopy(next(o for o in render(kubectl, "keda") if o["kind"] == "ScaledObject"))
    so["spec"]["minReplicaCount"] = "two"
    check(all(not line.startswith("OK") for line in crd_results(node_modules, [so])), "control: a malformed ScaledObject is rejected")
    print(f"kubernetes manifests: {len(failures)} checks failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
