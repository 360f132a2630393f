// syncar from TypeScript on Node.js 20+, with the built-in fetch only: a read-modify-write loop
// on ETags, read-your-writes across two instances, and retrying after a 503.
//
//   cd examples/typescript && npm ci && npm start      (tsc, then node dist/orders.js)
//   node --experimental-strip-types orders.ts           (Node.js 22.6+, no build step)
//
// SYNCAR_A and SYNCAR_B name two instances (default both http://127.0.0.1:7070). Each step
// checks that syncar behaves as its README says; the exit status is 1 if one does not, so this
// doubles as a test (scripts/run-examples.sh).

import { randomUUID } from "node:crypto";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { isDeepStrictEqual } from "node:util";

const SYNCAR_A = (process.env.SYNCAR_A ?? "http://127.0.0.1:7070").replace(/\/+$/, "");
const SYNCAR_B = (process.env.SYNCAR_B ?? "http://127.0.0.1:7070").replace(/\/+$/, "");
// Above syncar's server.request_timeout (10 s), so a slow request gets syncar's own 504 rather
// than a timeout of ours.
const TIMEOUT_MS = 15_000;

class Failed extends Error {}

function check(condition: boolean, what: string): asserts condition {
  if (!condition) throw new Failed(what);
}

const log = (message: string): void => console.log(message);

/** A response of syncar's, its body read and parsed (syncar's bodies are JSON and small). */
interface Reply {
  status: number;
  headers: Headers;
  body: unknown;
}

function parseJson(text: string): unknown {
  try {
    return text ? JSON.parse(text) : undefined;
  } catch {
    return text; // not JSON: not from syncar's API
  }
}

/** The `code` of syncar's error body, {"error": {"code": ..., "message": ...}}. */
function errorCode(reply: Reply): string | undefined {
  const body = reply.body as { error?: { code?: string } } | undefined;
  return body?.error?.code;
}

/**
 * The version in an ETag: `"42"` is version 42, and so is `"42-7"` (the same row version
 * rendered in the shape its table took at version 7, after a schema change).
 */
function versionOf(reply: Reply): number {
  const etag = (reply.headers.get("etag") ?? "").replace(/^W\//, "").replaceAll('"', "");
  return Number(etag.split("-")[0]);
}

// --- 503 and Retry-After ----------------------------------------------------------------------

// syncar answers 503 with Retry-After (seconds) and says why in the error code:
//   overloaded   too many requests in flight: turned away before anything was done;
//   starting     the schema is not loaded yet: nothing was done either;
//   unavailable  Postgres could not be reached, possibly in the middle of this very write.
const NOTHING_DONE = new Set(["overloaded", "starting"]);

interface SendOptions {
  body?: unknown; // sent as JSON
  headers?: Record<string, string>;
  maxAttempts?: number;
  maxWaitS?: number;
}

/**
 * One request to syncar, sent again after its Retry-After while that is safe.
 *
 * A read changes nothing, so a GET is retried on any 503 and on a network error. A write is
 * retried only when the error code says nothing was done. A write that failed any other way
 * (503 `unavailable`, 504 `timeout`, our own timeout, a dropped connection) has an unknown
 * outcome: it may have committed. Sending it again blindly could apply it twice, or undo a
 * change someone else made in between. A conditional write is the exception: with
 * `If-Match: "<version>"` (or `If-None-Match: *`) a second copy can only succeed if the first
 * did not, and gets 412 if it did, so retrying it is safe. (`If-Match: *` is not enough: it
 * only asks that the document exist.)
 */
async function send(method: string, url: string, options: SendOptions = {}): Promise<Reply> {
  const { maxAttempts = 4, maxWaitS = 5 } = options;
  const headers = new Headers(options.headers);
  const body = options.body === undefined ? undefined : JSON.stringify(options.body);
  if (body !== undefined) headers.set("content-type", "application/json");
  const ifMatch = headers.get("if-match");
  const conditional = (ifMatch !== null && ifMatch !== "*") || headers.get("if-none-match") === "*";
  const safe = method === "GET" || method === "HEAD" || conditional;
  for (let attempt = 1; ; attempt++) {
    const last = attempt >= maxAttempts;
    let reply: Reply;
    try {
      const signal = AbortSignal.timeout(TIMEOUT_MS);
      const resp = await fetch(url, { method, headers, body, signal });
      // Always read the body: an unread one keeps its connection from being reused.
      reply = { status: resp.status, headers: resp.headers, body: parseJson(await resp.text()) };
    } catch (err) {
      if (!safe || last) throw err; // the caller must find out what happened (read it again)
      await sleep(500 * attempt);
      continue;
    }
    const code = reply.status === 503 ? errorCode(reply) : undefined;
    if (reply.status !== 503 || last || !(safe || NOTHING_DONE.has(code ?? ""))) return reply;
    const seconds = Number(reply.headers.get("retry-after") ?? 1);
    const wait = Math.min(Number.isFinite(seconds) ? seconds : 1, maxWaitS); // syncar sends seconds
    log(`    503 ${code} (attempt ${attempt}/${maxAttempts}): retrying in ${wait} s`);
    await sleep(wait * 1000);
  }
}

// --- Read-modify-write with ETag and If-Match -------------------------------------------------

interface Order {
  status: string;
  items: string[];
  total_cents: number;
}

/**
 * Optimistic concurrency: GET the document and its ETag, apply `change` to it, PUT the result
 * with `If-Match: <ETag>`. A 412 means someone wrote in between: read it again and redo the
 * change on the new copy. `change(doc)` gets undefined when the document does not exist (it is
 * then created, with `If-None-Match: *`) and may run several times, so it must only compute.
 * Returns the version written and the document.
 */
async function update<T>(
  base: string,
  path: string,
  change: (doc: T | undefined) => T | Promise<T>,
  maxAttempts = 5,
): Promise<{ version: number; doc: T }> {
  const url = `${base}/v1/${path}`;
  let query = "";
  for (let attempt = 1; attempt <= maxAttempts; attempt++) {
    const read = await send("GET", url + query);
    let doc: T;
    let condition: Record<string, string>;
    if (read.status === 404) {
      doc = await change(undefined);
      condition = { "if-none-match": "*" };
    } else {
      check(read.status === 200, `GET ${path}: ${read.status} ${JSON.stringify(read.body)}`);
      doc = await change(read.body as T);
      condition = { "if-match": read.headers.get("etag") ?? "" };
    }
    const put = await send("PUT", url, { body: doc, headers: condition });
    if (put.status === 200 || put.status === 201) {
      return { version: (put.body as { version: number }).version, doc };
    }
    check(put.status === 412, `PUT ${path}: ${put.status} ${JSON.stringify(put.body)}`);
    check(errorCode(put) === "precondition_failed", `412 with code ${errorCode(put)}`);
    log(`    412 precondition_failed: ${path} changed since we read it; reading it again`);
    // Our copy was older than Postgres'. Read Postgres itself next, not a cached copy.
    query = "?consistency=strong";
  }
  throw new Failed(`${path}: still conflicting after ${maxAttempts} attempts`);
}

/** A change for update(): add one item to an order, creating the order if needed. */
function addItem(name: string, cents: number): (order: Order | undefined) => Order {
  return (order = { status: "open", items: [], total_cents: 0 }) => ({
    ...order,
    items: [...order.items, name],
    total_cents: order.total_cents + cents,
  });
}

// --- A stand-in that answers like an overloaded syncar ----------------------------------------

/**
 * Sits in front of syncar A: answers the next requests with syncar's own 503s, one per code in
 * `faults`, and passes every other request through. syncar answers 503 only when it is
 * overloaded or cannot reach Postgres, which this example cannot cause on demand.
 */
async function flakyFront(upstream: string) {
  const front = { faults: [] as string[], requests: 0, url: "", close: () => server.close() };
  const server = createServer(async (req, res) => {
    front.requests++;
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const fault = front.faults.shift();
    if (fault !== undefined) {
      res.writeHead(503, { "content-type": "application/json", "retry-after": "1" });
      res.end(JSON.stringify({ error: { code: fault, message: "injected by the example" } }));
      return;
    }
    try {
      const forward: Record<string, string> = {};
      for (const name of ["content-type", "if-match", "if-none-match"]) {
        const value = req.headers[name];
        if (typeof value === "string") forward[name] = value;
      }
      const up = await fetch(upstream + req.url, {
        method: req.method,
        headers: forward,
        body: chunks.length > 0 ? Buffer.concat(chunks) : undefined,
      });
      const back: Record<string, string> = {};
      for (const name of ["content-type", "etag", "retry-after", "x-cache"]) {
        const value = up.headers.get(name);
        if (value !== null) back[name] = value;
      }
      res.writeHead(up.status, back).end(Buffer.from(await up.arrayBuffer()));
    } catch (err) {
      res.writeHead(502).end(String(err));
    }
  });
  await new Promise<void>((listening) => server.listen(0, "127.0.0.1", listening));
  front.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return front;
}

// --- The walk-through -------------------------------------------------------------------------

async function main(): Promise<void> {
  // Resource kv takes any JSON; its keys may hold /.
  const path = `kv/orders/${randomUUID().slice(0, 8)}`;
  log(`syncar A = ${SYNCAR_A}, syncar B = ${SYNCAR_B}, document ${path}`);

  log("1. read-modify-write with ETag and If-Match");
  let { version, doc: order } = await update(SYNCAR_A, path, addItem("apple", 120));
  check(order.items.join() === "apple", `created ${JSON.stringify(order)}`);
  log(`    created through A (it was absent): version ${version}, items ${order.items.join(", ")}`);

  // Another client adds a plum through B after we read the order and before we write it.
  let plumVersion: number | undefined;
  ({ version, doc: order } = await update<Order>(SYNCAR_A, path, async (current) => {
    if (plumVersion === undefined) {
      plumVersion = (await update(SYNCAR_B, path, addItem("plum", 90))).version;
      log(`    meanwhile another client wrote version ${plumVersion} through B`);
    }
    return addItem("pear", 150)(current);
  }));
  check(order.items.join() === "apple,plum,pear", `lost update: ${order.items.join(", ")}`);
  check(order.total_cents === 360, `total ${order.total_cents}`);
  log(`    written through A: version ${version}, items ${order.items.join(", ")}: no update lost`);

  log("2. read-your-writes across instances with min_version");
  let reply = await send("GET", `${SYNCAR_B}/v1/${path}`); // B may now hold this copy in its L1
  check(reply.status === 200, `GET via B: ${reply.status}`);
  log(`    GET through B: version ${versionOf(reply)} (X-Cache: ${reply.headers.get("x-cache")})`);
  const { version: written, doc: paid } = await update<Order>(SYNCAR_A, path, (current) => {
    check(current !== undefined, `${path} vanished`);
    return { ...current, status: "paid" };
  });
  log(`    PUT through A: version ${written}, status paid`);
  // Without min_version, B could still answer the copy it holds, for up to about a second.
  reply = await send("GET", `${SYNCAR_B}/v1/${path}?min_version=${written}`);
  check(reply.status === 200, `GET via B: ${reply.status}`);
  check(versionOf(reply) >= written, `B answered version ${versionOf(reply)} < ${written}`);
  check(isDeepStrictEqual(reply.body, paid), `B answered ${JSON.stringify(reply.body)}`);
  log(
    `    GET through B with ?min_version=${written}: version ${versionOf(reply)},` +
      ` status ${(reply.body as Order).status} (X-Cache: ${reply.headers.get("x-cache")})`,
  );

  log("3. 503 with Retry-After (syncar's 503s injected in front of A)");
  const front = await flakyFront(SYNCAR_A);
  const url = `${front.url}/v1/${path}`;
  const inject = (...codes: string[]) => {
    front.faults = codes;
    front.requests = 0;
  };
  const expect = (r: Reply, status: number, requests: number, what: string) =>
    check(
      r.status === status && front.requests === requests,
      `${what}: ${r.status} after ${front.requests} requests`,
    );
  try {
    inject("overloaded");
    const startedAt = performance.now();
    reply = await send("GET", url);
    const elapsed = (performance.now() - startedAt) / 1000;
    expect(reply, 200, 2, "GET");
    check(elapsed >= 1, `retried after ${elapsed.toFixed(2)} s, before Retry-After`);
    log(`    GET: 200 on the second attempt, ${elapsed.toFixed(1)} s later`);

    inject("overloaded", "overloaded", "overloaded");
    reply = await send("GET", url, { maxAttempts: 2 });
    expect(reply, 503, 2, "GET");
    log(`    GET, still overloaded: gave up after 2 attempts, 503 ${errorCode(reply)}`);

    inject("unavailable");
    reply = await send("PUT", url, { body: { ...paid, status: "shipped" } });
    expect(reply, 503, 1, "PUT");
    log("    unconditional PUT, 503 unavailable: not retried, it may have committed");
    reply = await send("GET", `${url}?consistency=strong`);
    const status = (reply.body as Order).status;
    check(status === "paid", `the PUT was applied: ${JSON.stringify(reply.body)}`);
    log(`    so we read it again: status still ${status}, it did not`);

    const etag = reply.headers.get("etag") ?? "";
    inject("unavailable");
    const shipped = { ...paid, status: "shipped" };
    reply = await send("PUT", url, { body: shipped, headers: { "if-match": etag } });
    expect(reply, 200, 2, "PUT");
    log(`    PUT with If-Match: ${etag}, 503 unavailable: retried, version ${versionOf(reply)}`);

    inject("overloaded");
    reply = await send("PUT", url, { body: { ...paid, status: "delivered" } });
    expect(reply, 200, 2, "PUT");
    log(`    unconditional PUT, 503 overloaded: retried, version ${versionOf(reply)}`);
  } finally {
    front.close();
  }

  reply = await send("DELETE", `${SYNCAR_A}/v1/${path}`, {
    headers: { "if-match": reply.headers.get("etag") ?? "" },
  });
  check(reply.status === 204, `DELETE: ${reply.status} ${JSON.stringify(reply.body)}`);
  log(`4. deleted ${path} with If-Match: 204, the delete is version ${versionOf(reply)}`);
}

try {
  await main();
  log("typescript example: every step behaved as documented");
  process.exit(0); // rather than wait for idle keep-alive connections to close
} catch (err) {
  const cause = err instanceof Error && err.cause ? ` (${String(err.cause)})` : "";
  log(`FAILED: ${err instanceof Error ? err.message : String(err)}${cause}`);
  process.exit(1);
}
