// Type-checks the provisioned dashboard against Grafana's published schema
// (@grafana/schema). A JSON import would widen every string to `string`, so
// the JSON is written into a TypeScript source as an object literal checked
// with `satisfies Dashboard`, where each enum-like field keeps its literal
// type; then tsc checks it. Usage: node dashboard.mjs (from any directory).
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const json = readFileSync(join(here, "../grafana/dashboards/orchestrator.json"), "utf8");
mkdirSync(join(here, "generated"), { recursive: true });
writeFileSync(
  join(here, "generated/dashboard.ts"),
  `import type { Dashboard } from "@grafana/schema";\nexport const dashboard = ${json.trim()} satisfies Dashboard;\n`,
);
execFileSync(join(here, "node_modules/.bin/tsc"), ["-p", join(here, "tsconfig.json")], { stdio: "inherit" });
console.log("dashboard: type-checks against @grafana/schema");
