// Sign requests with Fedify's signer, for botkit-tasks to verify.
//
// stdin:  {"actorId": url, "keyId": url,
//          "requests": [{"method", "url", "headers": [[name, value], ...],
//                        "body": base64|null, "spec": "draft-cavage-http-signatures-12"|"rfc9421"}]}
// stdout: {"publicKeyPem": PEM, "actor": the actor document as Fedify serialises it,
//          "requests": [{"method", "url", "headers": [[name, value], ...], "body": base64|null}]}
import { generateCryptoKeyPair, signRequest } from "@fedify/fedify";
import { CryptographicKey, Person } from "@fedify/vocab";
import { getDocumentLoader } from "@fedify/vocab-runtime";
import { readFileSync } from "node:fs";

globalThis.fetch = async (input) => {
  throw new Error(`network access is disabled in the interop test: ${input}`);
};

const input = JSON.parse(readFileSync(0, "utf8"));
const contextLoader = getDocumentLoader();
const { privateKey, publicKey } = await generateCryptoKeyPair("RSASSA-PKCS1-v1_5");

const spki = Buffer.from(await crypto.subtle.exportKey("spki", publicKey)).toString("base64");
const publicKeyPem =
  "-----BEGIN PUBLIC KEY-----\n" + spki.match(/.{1,64}/g).join("\n") + "\n-----END PUBLIC KEY-----\n";

const actor = new Person({
  id: new URL(input.actorId),
  preferredUsername: "fedify",
  inbox: new URL(input.actorId + "/inbox"),
  publicKey: new CryptographicKey({
    id: new URL(input.keyId),
    owner: new URL(input.actorId),
    publicKey,
  }),
});

const requests = [];
for (const spec of input.requests) {
  const body = spec.body == null ? undefined : Buffer.from(spec.body, "base64");
  const unsigned = new Request(spec.url, { method: spec.method, headers: spec.headers, body });
  const signed = await signRequest(unsigned, privateKey, new URL(input.keyId), { spec: spec.spec });
  const sentBody = body === undefined ? null : Buffer.from(await signed.arrayBuffer()).toString("base64");
  requests.push({ method: signed.method, url: signed.url, headers: [...signed.headers], body: sentBody });
}
process.stdout.write(
  JSON.stringify({
    publicKeyPem,
    actor: await actor.toJsonLd({ format: "compact", contextLoader }),
    requests,
  }) + "\n",
);
