#!/usr/bin/env node
// A webhook worker in Node.js handing one failed delivery to deadletter: Store over gRPC with a service token.
//
// It loads the contract straight from ../../protos (no generated code), sends the body as the raw bytes of the
// sample file (never parsed: JSON numbers above 2^53 would change) and prints the StoreResponse as JSON.
//
// Configuration (environment):
//   DEADLETTER_ADDRESS   host:port of the server (plaintext gRPC)
//   DEADLETTER_TOKEN     a bearer token of the service role (python -m server mint-token --role service ...)
//   SAMPLE_FILE          the raw webhook body to store
//   SAMPLE_PROVIDER      facebook | instagram | whatsapp
//   SAMPLE_HEADERS_JSON  the delivery's HTTP headers, a JSON object of strings
//   CORRELATION_ID       optional; a fresh one is made when unset
//   ERROR_MESSAGE        optional; why processing failed (never quote the payload in it)
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.join(__dirname, "..", "..", "protos");
const PROTO_FILE = path.join(PROTO_ROOT, "deadletter", "v1", "deadletter.proto");
const PROVIDERS = {
  facebook: "PROVIDER_FACEBOOK",
  instagram: "PROVIDER_INSTAGRAM",
  whatsapp: "PROVIDER_WHATSAPP",
};
const DEADLINE_MS = 15000;

// Store is safe to retry with the same idempotency_key: let grpc-js resend it when the server is unreachable.
const SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: "deadletter.v1.DeadLetterService", method: "Store" }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.2s",
        maxBackoff: "2s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
};

class ConfigError extends Error {}

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new ConfigError(`${name} is not set`);
  }
  return value;
}

function readConfig() {
  const address = required("DEADLETTER_ADDRESS");
  const token = required("DEADLETTER_TOKEN");
  const sampleFile = required("SAMPLE_FILE");
  const providerName = required("SAMPLE_PROVIDER");
  const provider = PROVIDERS[providerName];
  if (!provider) {
    throw new ConfigError(`SAMPLE_PROVIDER must be one of ${Object.keys(PROVIDERS).join(", ")}`);
  }
  let headers;
  try {
    headers = JSON.parse(required("SAMPLE_HEADERS_JSON"));
  } catch (error) {
    if (error instanceof ConfigError) throw error;
    throw new ConfigError("SAMPLE_HEADERS_JSON is not valid JSON");
  }
  if (headers === null || typeof headers !== "object" || Array.isArray(headers)) {
    throw new ConfigError("SAMPLE_HEADERS_JSON must be a JSON object");
  }
  for (const [name, value] of Object.entries(headers)) {
    if (typeof value !== "string") {
      throw new ConfigError(`SAMPLE_HEADERS_JSON: header ${JSON.stringify(name)} must be a string`);
    }
  }
  let payload;
  try {
    // A Buffer of the file's bytes, exactly: no decoding, no JSON.parse.
    payload = fs.readFileSync(sampleFile);
  } catch (error) {
    throw new ConfigError(`SAMPLE_FILE cannot be read: ${error.code || error.message}`);
  }
  return { address, token, sampleFile, provider, headers, payload };
}

function timestampNow() {
  const ms = Date.now();
  // longs: String, so int64 seconds travel as a decimal string.
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

function storeRequest(config) {
  return {
    // Meta's envelopes carry no single delivery id: a hash of the body identifies the delivery.
    event_id: "sha256:" + crypto.createHash("sha256").update(config.payload).digest("hex"),
    provider: config.provider,
    payload: config.payload,
    headers: config.headers,
    error_message: process.env.ERROR_MESSAGE || "CRM API answered 503 Service Unavailable",
    retry_count: 3,
    correlation_id: process.env.CORRELATION_ID || `node-worker-${crypto.randomUUID()}`,
    received_at: timestampNow(),
    // One key per delivery, kept across retries, so a Store retried after a lost answer stores nothing twice.
    idempotency_key: crypto.randomUUID(),
    failure_kind: "FAILURE_KIND_RETRYABLE",
  };
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_ROOT],
  });
  return grpc.loadPackageDefinition(definition).deadletter.v1.DeadLetterService;
}

function store(client, request, token) {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client.Store(request, metadata, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || `code ${code}`;
}

async function main() {
  let config;
  try {
    config = readConfig();
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`store-sample: ${error.message}\n`);
      return 2;
    }
    throw error;
  }
  const DeadLetterService = loadService();
  const client = new DeadLetterService(config.address, grpc.credentials.createInsecure(), {
    "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
  });
  try {
    const response = await store(client, storeRequest(config), config.token);
    process.stdout.write(JSON.stringify({ id: response.id, deduplicated: response.deduplicated }) + "\n");
    return 0;
  } catch (error) {
    if (typeof error.code === "number") {
      process.stderr.write(`store-sample: Store failed: ${statusName(error.code)} (${error.code}): ${error.details}\n`);
      return 1;
    }
    throw error;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`store-sample: ${error.stack || error}\n`);
    process.exitCode = 1;
  },
);
