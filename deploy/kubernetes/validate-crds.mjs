// Validates custom resources (one JSON object per line on stdin) against the schemas that the
// @kubernetes-models npm packages generate from each project's CRDs. Prints one line per object;
// exits 1 when any is invalid. Called by validate.py.
import { createInterface } from "node:readline";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { HTTPRoute } from "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";

const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "gateway.networking.k8s.io/v1/HTTPRoute": HTTPRoute,
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
};
let failed = false;
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const obj = JSON.parse(line);
  const key = `${obj.apiVersion}/${obj.kind}`;
  const Model = models[key];
  if (!Model) {
    console.log(`NOSCHEMA ${key} ${obj.metadata.name}`);
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`OK ${key} ${obj.metadata.name}`);
  } catch (e) {
    failed = true;
    console.log(`INVALID ${key} ${obj.metadata.name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
