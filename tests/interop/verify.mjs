// Verify requests signed by botkit-tasks with Fedify's own verifier.
//
// stdin:  {"documents": {url: jsonld, ...},
//          "requests": [{"method", "url", "headers": [[name, value], ...], "body": base64|null}, ...]}
// stdout: [{"verified": bool, "reason": null|string, "keyId": null|string}, ...]
//
// Keys are "fetched" through a document loader that serves only the given
// documents (and the JSON-LD contexts bundled with Fedify): no network.
import { verifyRequestDetailed } from "@fedify/fedify";
import { getDocumentLoader } from "@fedify/vocab-runtime";
import { readFileSync } from "node:fs";

globalThis.fetch = async (input) => {
  throw new Error(`network access is disabled in the interop test: ${input}`);
};

const input = JSON.parse(readFileSync(0, "utf8"));
const contextLoader = getDocumentLoader();
const documentLoader = async (url, options) => {
  const bare = url.split("#")[0];
  const document = input.documents[url] ?? input.documents[bare];
  if (document !== undefined) {
    return { contextUrl: null, document, documentUrl: bare };
  }
  return await contextLoader(url, options); // bundled contexts only
};

const results = [];
for (const spec of input.requests) {
  const headers = new Headers();
  for (const [name, value] of spec.headers) headers.append(name, value);
  const request = new Request(spec.url, {
    method: spec.method,
    headers,
    body: spec.body == null ? undefined : Buffer.from(spec.body, "base64"),
  });
  const result = await verifyRequestDetailed(request, { documentLoader, contextLoader });
  results.push({
    verified: result.verified,
    reason: result.verified ? null : result.reason.type,
    keyId: result.verified ? result.key.id?.href ?? null : null,
  });
}
process.stdout.write(JSON.stringify(results) + "\n");
